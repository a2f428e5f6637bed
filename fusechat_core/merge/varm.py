"""VaRM (Variation Ratio Merge; FuseChat, Wan et al. 2024; SPEC §1.5) as a mergekit merge method.

For each parameter matrix m and target j, with Δ_{j,m} = θ_{j,m} − θ_{pivot,m}:

    W_{j,m} = mean(Δ_{j,m}²) / Σ_k mean(Δ_{k,m}²)
    θ_merged,m = θ_pivot,m + Σ_j W_{j,m} · Δ_{j,m}

Registered in mergekit's own registry as ``varm``, so it runs on mergekit's
out-of-core engine (one tensor at a time, lazily loaded) like its own methods.
At matrix granularity the weights come from the very tensors being merged: no
pass over the weights beyond the merge itself. At layer or model granularity the
weight of one matrix depends on others, so ``statistics.py`` computes the group
weights first and they reach the kernel as ordinary per-target ``weight``
parameters (visible in the saved mergekit config).

The two defects of the released reference script (an empty exclude pattern that
skipped every parameter; one statistics file read for every model) cannot occur
here: every tensor goes through the kernel, and each target's Δ is its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup, merge_method

from fusechat_core import stopping

NAME = "varm"
Granularity = Literal["matrix", "layer", "model"]


def varm_weights(mean_sq: list[float]) -> list[float]:
    """Normalised VaRM weights; all zero when no target changed the matrix.

    Zero change means the merged matrix is the pivot's: no fallback to uniform
    weights (mergekit's SCE does that below a 1e-6 threshold, which would also
    misweight legitimately tiny deltas).
    """
    total = sum(mean_sq)
    if total == 0.0:
        return [0.0] * len(mean_sq)
    return [m / total for m in mean_sq]


@merge_method(
    name=NAME,
    pretty_name="VaRM",
    reference_url="https://arxiv.org/abs/2402.16107",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def varm_merge(
    group: TensorGroup,
    weight: PerNonBase[float | None] = None,
    granularity: Granularity = "matrix",
) -> torch.Tensor:
    stopping.check()
    base = group.base.tensor
    targets = group.non_base
    if not targets:
        return base
    name = group.metadata.name or "?"
    if granularity == "matrix":
        n = max(base.numel(), 1)
        mean_sq = [s / n for s in _sum_sq_deltas(base, [e.tensor for e in targets])]
        weights = varm_weights(mean_sq)
    else:
        given = weight.values_for(targets) if weight is not None else [None] * len(targets)
        if any(w is None for w in given):
            raise ValueError(f"VaRM at {granularity} granularity: no precomputed weight for tensor {name}")
        weights = [float(w) for w in given]
        mean_sq = None

    merged = _combine(base, [e.tensor for e in targets], weights)
    _record(group, name, weights, mean_sq)
    return merged


# Δ is formed a slice at a time: a full-size Δ per target would add a matrix-sized
# temporary per input (merging must cost no more memory than a linear merge). Slices
# of 4M elements keep the number of kernel launches / parallel regions small.
_CHUNK = 1 << 22


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 at least: float64 stays, narrower floats are widened."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _wide_slices(base: torch.Tensor, tensors: list[torch.Tensor]
                 ) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """(start, the pivot's slice, each target's slice) over the flattened tensors, in float32
    at least (float64 stays): a bfloat16 slice is widened into a buffer of its own, so a Δ
    formed from them keeps what bfloat16 arithmetic would round away. Slices, not whole
    copies: a merge costs what a linear merge costs."""
    work = _work_dtype(base)
    flat = [base.reshape(-1), *(t.reshape(-1) for t in tensors)]
    n = min(_CHUNK, flat[0].numel())
    bufs = [None if x.dtype == work else torch.empty(n, dtype=work, device=x.device) for x in flat]
    for lo in range(0, flat[0].numel(), _CHUNK):
        parts = [x[lo:lo + _CHUNK] if buf is None else buf[:min(_CHUNK, x.numel() - lo)].copy_(x[lo:lo + _CHUNK])
                 for x, buf in zip(flat, bufs)]
        yield lo, parts[0], parts[1:]


def _combine(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """θ_pivot + Σ_j W_j·Δ_j, as the formula says it: an entry no target changed is the
    pivot's, bit for bit, and the update is added to it, not rebuilt from Σ_j W_j·θ_j (which
    moved 3% of a float32 matrix's untouched entries by an ulp). Computed in float32 at least
    (``_wide_slices``); the sum is rounded once to the inputs' precision.
    """
    used = [(t, w) for t, w in zip(tensors, weights) if w != 0.0]
    if not used:
        return base
    work = _work_dtype(base)
    merged = torch.empty(base.shape, dtype=work, device=base.device)
    out = merged.view(-1)
    d = torch.empty(min(_CHUNK, out.numel()), dtype=work, device=base.device)
    for lo, b_c, t_cs in _wide_slices(base, [t for t, _ in used]):
        o_c = out[lo:lo + _CHUNK]
        for j, (t_c, (_, w)) in enumerate(zip(t_cs, used)):
            if j == 0:  # θ_p + W·(θ_j − θ_p) in one pass; exactly θ_p where θ_j = θ_p
                torch.lerp(b_c, t_c, w, out=o_c)
            else:
                o_c.add_(torch.sub(t_c, b_c, out=d[:t_c.numel()]), alpha=w)
    # in the inputs' precision again (rounded once, from the wide sum): mergekit casts only to
    # out_dtype, and a user's YAML loading bfloat16 wrote float32 tensors beside bf16 ones
    return merged if merged.dtype == base.dtype else merged.to(base.dtype)


def _sum_sq_deltas(base: torch.Tensor, tensors: list[torch.Tensor]) -> list[float]:
    """[Σ (θ_j − θ_pivot)² for each j], in one sweep over the pivot: each slice of the pivot
    is read once for all targets. Each Δ is formed in float32 at least (``_wide_slices``) and
    slices are summed in float64 (fine-tuning deltas are small and a matrix can hold ~1e9
    elements; one float32 sum would lose digits)."""
    work = _work_dtype(base)
    buf = torch.empty(min(_CHUNK, base.numel()), dtype=work, device=base.device)
    # accumulated on the tensors' device: one host sync per matrix, not per slice
    totals = torch.zeros(len(tensors), dtype=torch.float64, device=base.device)
    for _, b_c, t_cs in _wide_slices(base, tensors):
        d = buf[:b_c.numel()]
        for j, t_c in enumerate(t_cs):
            torch.sub(t_c, b_c, out=d)
            totals[j] += torch.dot(d, d).double()
    return totals.tolist()


# -- the per-matrix weights table --------------------------------------------------------
# The kernel runs inside mergekit's executor (this process, possibly several threads),
# which returns only tensors; the weights it chose are collected here for the merge
# that asked for them, keyed by that merge's inputs.
_LOCK = threading.Lock()
_TABLES: dict[tuple, dict[str, Any]] = {}


def _inputs_key(base: str, targets: list[str]) -> tuple:
    return (base, tuple(sorted(targets)))


def _record(group: TensorGroup, name: str, weights: list[float], mean_sq: list[float] | None) -> None:
    ids = [str(e.id) for e in group.non_base]
    key = _inputs_key(str(group.base.id), ids)
    with _LOCK:
        table = _TABLES.get(key)
        if table is None:
            return
        row: dict[str, Any] = {"weights": dict(zip(ids, weights))}
        if mean_sq is not None:
            row["mean_sq_delta"] = dict(zip(ids, mean_sq))
        row["numel"] = group.base.tensor.numel()
        table[name] = row


@contextmanager
def recording(base: str, targets: list[str]) -> Iterator[dict[str, Any]]:
    """Collect ``{tensor name: {"weights": {model: W}, ...}}`` for one VaRM merge."""
    key = _inputs_key(base, targets)
    with _LOCK:
        if key in _TABLES:
            raise RuntimeError("a VaRM merge of these same models is already running in this process")
        table: dict[str, Any] = {}
        _TABLES[key] = table
    try:
        yield table
    finally:
        with _LOCK:
            _TABLES.pop(key, None)


def register() -> None:
    """Make ``varm`` a mergekit method (idempotent: importing twice is harmless)."""
    if NAME not in {m.spec.name for m in merge_methods.registered_methods()}:
        merge_methods.register(varm_merge)


register()
