"""Training batches read from the REPRESENTATION and ALIGNED shard contracts.

The pivot's representation shards hold the training sequences themselves
(``input_ids``, ``sup_positions``) and the pivot's own top-k teacher; a
source's aligned shards hold that source's teacher mapped into the pivot's
vocabulary at the same supervised rows. Both are opened by their stages' own
readers (``represent.open_shard``, ``align.open_aligned``), which memory-map
them: a step reads the rows of its sequences and nothing else, so a
95k-conversation run does not load gigabytes of top-k tables into memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fusechat_core.align import ALIGNED_FILE, AlignError, open_aligned
from fusechat_core.represent import REPRESENTATION_FILE, RepresentError, bad_logprob, open_shard


class ContractError(ValueError):
    """A representation or aligned shard does not follow its contract; one line naming file and field."""


def _rows(array: np.ndarray, start: int, stop: int, dtype: type | None = None) -> Tensor:
    """Rows [start, stop) of a memory-mapped array, copied out (only they are read) as a tensor."""
    return torch.from_numpy(np.array(array[start:stop], dtype=dtype))


@dataclass
class Batch:
    """One micro-batch: padded token ids and the supervised rows with their teachers."""

    input_ids: Tensor  # [B, L] int64, right-padded
    attention_mask: Tensor  # [B, L] int64
    sup_batch: Tensor  # [P] int64: which sequence of the batch
    sup_pos: Tensor  # [P] int64: target position t (predicted from t-1)
    labels: Tensor  # [P] int64: input_ids[b, t]
    teachers: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (ids [P,k], logprobs [P,k])
    metric_ce: Tensor | None = None  # [P, J]: teacher j's CE of the row's sequence
    n_tokens: int = 0  # real (unpadded) tokens

    def to(self, device: torch.device | str) -> Batch:
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.sup_batch), mv(self.sup_pos),
                     mv(self.labels), [(mv(i), mv(lp)) for i, lp in self.teachers],
                     None if self.metric_ce is None else mv(self.metric_ce), self.n_tokens)


class FusionData:
    """The training sequences of one target, in dataset order across shards.

    ``pivot_shards``: folders of the pivot's representation shards, in shard
    order. ``aligned_shards``: folders of source j's aligned shards (same
    count), or None for the CLM baseline (λ = 1), which needs no teacher.
    Sequences longer than ``max_length`` are truncated, with their supervised
    rows beyond it dropped.
    """

    def __init__(self, pivot_shards: Sequence[str | Path], aligned_shards: Sequence[str | Path] | None = None,
                 *, max_length: int | None = None):
        if not pivot_shards:
            raise ContractError("no pivot representation shards given")
        if aligned_shards is not None and len(aligned_shards) != len(pivot_shards):
            raise ContractError(f"{len(aligned_shards)} aligned shards for {len(pivot_shards)} pivot shards")
        self.max_length = max_length
        self.pivot_paths = [str(Path(p) / REPRESENTATION_FILE) for p in pivot_shards]
        self.aligned_paths = None if aligned_shards is None else [str(Path(p) / ALIGNED_FILE) for p in aligned_shards]
        try:  # the stages' own readers: memory-mapped, checked against the contracts
            self.pivot = [open_shard(p) for p in pivot_shards]
            self.aligned = None if aligned_shards is None else [open_aligned(p) for p in aligned_shards]
        except (RepresentError, AlignError) as exc:
            raise ContractError(str(exc)) from None

        self._seq_off: list[np.ndarray] = []
        self._sup_off: list[np.ndarray] = []
        self._ce: list[list[np.ndarray]] = []
        shard_of, local_of, lengths, n_sup = [], [], [], []
        for i, ps in enumerate(self.pivot):
            seq_off = np.array(ps.seq_offsets, dtype=np.int64)
            sup_off = np.array(ps.sup_offsets, dtype=np.int64)
            n = ps.n_seq
            ces = [np.array(ps.metric_ce, dtype=np.float32)]
            paths = [self.pivot_paths[i]]
            if self.aligned is not None:
                al, paths = self.aligned[i], paths + [self.aligned_paths[i]]  # type: ignore[index]
                if not np.array_equal(np.asarray(al.sup_offsets, dtype=np.int64), sup_off):
                    raise ContractError(f"{paths[1]}: sup_offsets differ from the pivot shard's ({paths[0]}); "
                                        "the aligned shard was made from other pivot positions")
                if ps.topk_ids.shape[1] < 1 or al.topk_ids.shape[1] < 1:
                    raise ContractError(f"{paths[1]}: topk_ids has no columns")
                ces.append(np.array(al.metric_ce, dtype=np.float32))
            has_sup = np.diff(sup_off) > 0
            for path, ce in zip(paths, ces):
                if not np.isfinite(ce[has_sup]).all():
                    s = int(np.nonzero(has_sup & ~np.isfinite(ce))[0][0])
                    raise ContractError(f"{path}: metric_ce of sequence {s} is not finite")
            seq_len = np.diff(seq_off)
            kept_sup = np.diff(sup_off)
            if max_length is not None and (seq_len > max_length).any():
                # only now read the positions: rows at t >= max_length are cut
                pos = np.asarray(ps.sup_positions, dtype=np.int64)
                seq_id = np.repeat(np.arange(n), kept_sup)
                kept_sup = np.bincount(seq_id[pos < max_length], minlength=n)
                seq_len = np.minimum(seq_len, max_length)
            self._seq_off.append(seq_off)
            self._sup_off.append(sup_off)
            self._ce.append(ces)
            shard_of.append(np.full(n, i, dtype=np.int64))
            local_of.append(np.arange(n, dtype=np.int64))
            lengths.append(seq_len)
            n_sup.append(kept_sup)
        self._shard_of = np.concatenate(shard_of)
        self._local_of = np.concatenate(local_of)
        self.lengths = np.concatenate(lengths)
        self.n_supervised = np.concatenate(n_sup)
        self.row_ids = [r for ps in self.pivot for r in ps.meta.get("row_ids", [])]
        self.vocab_size = self.pivot[0].meta.get("vocab_size")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_teachers(self) -> int:
        return 0 if self.aligned is None else 2

    def teacher_summary(self, domains: Sequence[str], fusion_function: str) -> dict[str, Any]:
        """What the source gave this target, per data source (``domains[g]``: sequence g's).

        ``coverage``: the share of supervised rows whose source teacher is the source's own
        distribution (aligned 1-to-1) rather than the label (the alignment's fallback);
        ``source_chosen`` (MinCE only): the share of sequences for which MinCE takes the
        source over the pivot, by the rule ``mince`` applies (``mince_choice``). None for the
        CLM baseline, which has no source.
        """
        if self.aligned is None:
            return {}
        if len(domains) != len(self):
            raise ContractError(f"{len(domains)} data sources given for {len(self)} training sequences")
        from fusechat_core.fuse.mince import mince_choice

        rows = np.concatenate([np.diff(o) for o in self._sup_off])
        covered = []
        for al, o in zip(self.aligned, self._sup_off):
            c = np.concatenate([[0], np.cumsum(~np.asarray(al.fallback, dtype=bool), dtype=np.int64)])
            covered.append(c[o[1:]] - c[o[:-1]])  # 1-to-1 rows per sequence
        covered = np.concatenate(covered)
        ce = torch.from_numpy(np.concatenate([np.stack(c, axis=1) for c in self._ce]))  # [n, 2]
        chosen = (mince_choice(ce) == 1).numpy() if fusion_function == "mince" else None
        domains = np.asarray(domains)
        per: dict[str, dict[str, Any]] = {}
        for d in sorted(set(domains.tolist())):
            mine = (domains == d) & (rows > 0)
            per[d] = {"sequences": int(mine.sum()), "rows": int(rows[mine].sum()),
                      "coverage": float(covered[mine].sum() / max(rows[mine].sum(), 1))}
            if chosen is not None:
                per[d]["source_chosen"] = float(chosen[mine].mean()) if mine.any() else None
        out: dict[str, Any] = {"fusion_function": fusion_function, "rows": int(rows.sum()),
                               "coverage": float(covered.sum() / max(rows.sum(), 1)), "domains": per}
        if chosen is not None:
            out["source_chosen"] = float(chosen[rows > 0].mean())
        return out

    def collate(self, indices: Sequence[int], pad_id: int, *, teachers: bool = True) -> Batch:
        """The micro-batch of the given sequence indices, in that order."""
        if not len(indices):
            raise ValueError("empty micro-batch")
        width = int(max(self.lengths[g] for g in indices))
        input_ids = torch.full((len(indices), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(indices), width), dtype=torch.int64)
        sup_b, sup_t, t_ids, t_lps, ces = [], [], [[], []], [[], []], []
        use_teachers = teachers and self.aligned is not None
        for b, g in enumerate(indices):
            i, s = int(self._shard_of[g]), int(self._local_of[g])
            ps = self.pivot[i]
            a, z = self._seq_off[i][s], self._seq_off[i][s + 1]
            n = int(self.lengths[g])
            input_ids[b, :n] = _rows(ps.input_ids, int(a), int(a) + n, np.int64)
            mask[b, :n] = 1
            r0, r1 = int(self._sup_off[i][s]), int(self._sup_off[i][s + 1])
            pos = _rows(ps.sup_positions, r0, r1, np.int64)
            keep = pos < n
            if bool(((pos < 1) | (pos >= z - a)).any()):
                raise ContractError(f"{self.pivot_paths[i]}: sequence {s} has a supervised position outside "
                                    f"[1, {z - a})")
            pos = pos[keep]
            sup_b.append(torch.full((len(pos),), b, dtype=torch.int64))
            sup_t.append(pos)
            if use_teachers:
                for j, sh in enumerate((ps, self.aligned[i])):  # type: ignore[index]
                    t_ids[j].append(_rows(sh.topk_ids, r0, r1, np.int64)[keep])
                    lp = _rows(sh.topk_logprobs, r0, r1)
                    if (bad := bad_logprob(lp.numpy())) is not None:
                        path = self.pivot_paths[i] if j == 0 else self.aligned_paths[i]  # type: ignore[index]
                        raise ContractError(f"{path}: topk_logprobs row {r0 + bad[0]} (sequence {s}) is "
                                            f"{bad[1]}")
                    t_lps[j].append(lp[keep])
                ce = torch.tensor([self._ce[i][0][s], self._ce[i][1][s]], dtype=torch.float32)
                ces.append(ce.expand(len(pos), 2))
        sup_batch, sup_pos = torch.cat(sup_b), torch.cat(sup_t)
        batch = Batch(input_ids, mask, sup_batch, sup_pos, input_ids[sup_batch, sup_pos],
                      n_tokens=int(mask.sum()))
        if use_teachers:
            batch.teachers = [(torch.cat(t_ids[j]), torch.cat(t_lps[j])) for j in range(2)]
            batch.metric_ce = torch.cat(ces)
        return batch
