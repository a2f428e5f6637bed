"""VaRM weights at layer or model granularity (the granularity ablation of the paper).

A group (one decoder layer, or the whole model) is treated as one concatenated
parameter vector: W_{j,g} = Σ_{m∈g} Σ Δ_{j,m}² / Σ_k Σ_{m∈g} Σ Δ_{k,m}² (the
element count is the same for every target and cancels). Tensors outside the
decoder layers (embeddings, final norm, LM head) are each their own group at
layer granularity.

Unlike the matrix level, this needs one statistics pass over the weights before
the merge, one tensor at a time through mergekit's lazy loaders.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mergekit.common import ModelReference

from fusechat_core.merge.varm import varm_weights

_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


def group_of(tensor_name: str, granularity: str) -> str:
    """The group a tensor's weight is shared with; also a substring filter that selects
    exactly that group's tensors in a mergekit parameter (hence the trailing dot)."""
    if granularity == "model":
        return "*"
    if granularity == "layer":
        m = _LAYER.match(tensor_name)
        return m.group(1) + "." if m else tensor_name
    raise ValueError(f"granularity {granularity!r} has no groups (use layer or model)")


def group_sum_sq(pivot: str, targets: list[str], granularity: str,
                 progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """{group: [Σ Δ_j² for each target]} over every floating-point tensor of the pivot."""
    from fusechat_core.merge.varm import _sum_sq_deltas

    base_loader = ModelReference.parse(pivot).lazy_loader(lazy_unpickle=True)
    loaders = [ModelReference.parse(t).lazy_loader(lazy_unpickle=True) for t in targets]
    names = sorted(base_loader.index.tensor_paths)
    for t, loader in zip(targets, loaders):
        missing = set(names) - set(loader.index.tensor_paths)
        if missing:
            raise ValueError(f"target {t}: no tensor {sorted(missing)[0]} (not a fine-tune of the pivot?)")
    sums: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        base = base_loader.get_tensor(name)
        if not base.is_floating_point():
            continue
        base = base.float()
        row = sums.setdefault(group_of(name, granularity), [0.0] * len(targets))
        for j, loader in enumerate(loaders):
            tensor = loader.get_tensor(name)
            if tensor.shape != base.shape:
                raise ValueError(f"target {targets[j]}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the pivot's is {tuple(base.shape)}")
            row[j] += _sum_sq_deltas(base, [tensor.float()])[0]
            del tensor
        if progress and (i + 1) % 50 == 0:
            progress(f"VaRM statistics: {i + 1}/{len(names)} tensors")
    return sums


def group_weights(pivot: str, targets: list[str], granularity: str,
                  progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """{group filter: [W_j]}: the VaRM formula applied to each group."""
    return {g: varm_weights(s) for g, s in group_sum_sq(pivot, targets, granularity, progress).items()}


def weight_parameter(weights: dict[str, list[float]], j: int) -> float | list[dict]:
    """Target j's ``weight`` as a mergekit parameter: a scalar for the whole model, else
    one filtered value per group (mergekit takes the first filter that matches)."""
    if set(weights) == {"*"}:
        return weights["*"][j]
    return [{"filter": g, "value": w[j]} for g, w in weights.items()]


