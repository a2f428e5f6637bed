"""The fusion objective computed sparsely over the teachers' kept top-k ids.

    L = λ·L_CLM + (1-λ)·L_fuse,   L_fuse = -Σ_v p_fused(v) · log q_student(v)

at supervised positions only. The teacher distributions live as (ids, probs)
pairs of width k, so the only vocabulary-wide tensor is the student's own
log-softmax at the supervised positions, which plain CLM needs as well: the
fusion term adds a gather of width k, never a batch × length × vocab target
(the original code scattered every teacher into a dense one).

Because the loss is linear in the target probabilities, a sparse distribution
may hold the same id more than once (AvgCE simply concatenates the teachers'
entries): the duplicates add up exactly as they would in a dense vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusechat_core.registry import Registry


@dataclass(frozen=True)
class SparseDist:
    """A distribution over the pivot vocabulary at P positions, kept sparse.

    ``ids`` int64 [P, m], ``probs`` float32 [P, m]; each row's probs sum to 1
    (ids may repeat within a row; absent entries have prob 0).
    """

    ids: Tensor
    probs: Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.probs.shape or self.ids.dim() != 2:
            raise ValueError(f"SparseDist: ids {tuple(self.ids.shape)} and probs "
                             f"{tuple(self.probs.shape)} must be the same [P, m] shape")


# fn(teachers, metric_ce) -> fused: ``teachers[j]`` is teacher j's distribution
# at the P supervised positions; ``metric_ce`` [P, J] is teacher j's per-sequence
# cross-entropy repeated at each supervised position of that sequence.
FusionFunction = Callable[[Sequence[SparseDist], Tensor], SparseDist]
FUSION_FUNCTIONS: Registry[FusionFunction] = Registry("fusion function")


def teacher_dist(ids: Tensor, logprobs: Tensor, temperature: float = 1.0) -> SparseDist:
    """softmax(top-k log-probs / T), renormalised over the kept k.

    Padding entries (log-prob -inf) get probability exactly 0. A row with no
    finite entry has no distribution at all: that is corrupt input, not a
    zero-loss position, so it is an error.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lp = logprobs.float()
    if torch.isnan(lp).any():
        raise ValueError("teacher top-k log-probs contain NaN")
    empty = torch.isneginf(lp).all(dim=-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"teacher distribution at supervised row {row} has no finite log-prob")
    return SparseDist(ids.long(), torch.softmax(lp / temperature, dim=-1))


def stack_teachers(teachers: Sequence[SparseDist]) -> tuple[Tensor, Tensor]:
    """ids, probs [J, P, m] with m the widest teacher; narrower ones padded with prob 0."""
    if not teachers:
        raise ValueError("a fusion function needs at least one teacher")
    m = max(t.ids.shape[1] for t in teachers)
    ids, probs = [], []
    for t in teachers:
        pad = m - t.ids.shape[1]
        ids.append(torch.nn.functional.pad(t.ids, (0, pad), value=0))
        probs.append(torch.nn.functional.pad(t.probs, (0, pad), value=0.0))
    return torch.stack(ids), torch.stack(probs)


def sparse_cross_entropy(student_logprobs: Tensor, target: SparseDist) -> Tensor:
    """-Σ_i p_i · log q(id_i) per row: [P]. ``student_logprobs`` is [P, V] log-softmax."""
    gathered = student_logprobs.gather(-1, target.ids)
    return -(target.probs * gathered).sum(dim=-1)


def clm_and_fusion_sums(
    student_logits: Tensor,
    labels: Tensor,
    teachers: Sequence[SparseDist] | None,
    metric_ce: Tensor | None,
    fusion: FusionFunction | None,
) -> tuple[Tensor, Tensor | None]:
    """Summed CLM and fusion cross-entropies over the P supervised positions.

    ``student_logits`` [P, V] are the student's logits at the positions that
    predict each supervised token (t-1 for target t); ``labels`` [P] the
    tokens. Sums, not means: the caller divides by the supervised-token count
    of the whole optimizer step, so micro-batches and ranks weigh every token
    equally. With no teachers (λ = 1) the fusion sum is None.
    """
    logp = torch.log_softmax(student_logits.float(), dim=-1)
    if not teachers:
        return -logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1).sum(), None
    if fusion is None or metric_ce is None:
        raise ValueError("fusion needs a fusion function and the teachers' metric_ce")
    fused = fusion(teachers, metric_ce)
    # One gather for both terms (the label column, then the teachers' columns):
    # each gather's backward writes a [P, V] gradient, the one cost here that
    # grows with the vocabulary, so the fusion term must not add a second.
    picked = logp.gather(-1, torch.cat([labels.long().unsqueeze(-1), fused.ids], dim=1))
    return -picked[:, 0].sum(), -(fused.probs * picked[:, 1:]).sum()
