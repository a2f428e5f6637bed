"""The merge methods a run can name, and how each becomes a mergekit configuration.

Each entry says how the pivot and the targets enter mergekit's method: whether
the pivot is the base (the methods that merge task vectors Δ = θ_target − θ_pivot),
how many targets the method takes, and the defaults we fill in where mergekit
has none. Everything else (parameter names, types, validation) is mergekit's own
method spec, so a parameter mergekit renames is caught here, not silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusechat_core.registry import Registry


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mergekit_method: str
    pivot_is_base: bool
    exact_targets: int | None = None
    # Defaults for per-target parameters mergekit leaves required; a callable gets n.
    target_defaults: dict[str, Any | Callable[[int], Any]] = field(default_factory=dict)
    shared_defaults: dict[str, Any] = field(default_factory=dict)
    reserved: tuple[str, ...] = ()  # parameters set by us, not by users
    note: str = ""


MERGE_METHODS: Registry[MethodSpec] = Registry("merge method", addressed=True)


def _add(spec: MethodSpec, *, version: int = 1) -> None:
    MERGE_METHODS.register(spec.name, version=version)(spec)


# varm 2: θ_pivot + Σ W·Δ as written, in float32 at least (bfloat16 inputs are widened first)
_add(MethodSpec(
    "varm", "varm", pivot_is_base=True, reserved=("weight", "granularity"),
    note="per-matrix weights from each target's mean squared change against the pivot"), version=2)
# The paper's baselines merge the targets; the pivot is their common base where the
# method works on task vectors.
_add(MethodSpec(
    "linear", "linear", pivot_is_base=False, target_defaults={"weight": 1.0},
    note="weighted mean of the targets (equal weights by default)"))
_add(MethodSpec(
    "slerp", "slerp", pivot_is_base=False, exact_targets=2, shared_defaults={"t": 0.5},
    note="spherical interpolation between the two targets (t=0: the first)"))
_add(MethodSpec(
    "task_arithmetic", "task_arithmetic", pivot_is_base=True,
    target_defaults={"weight": lambda n: 1.0 / n},
    note="pivot + Σ weight_j·Δ_j (default weight 1/n: the mean task vector)"))
_add(MethodSpec(
    "ties", "ties", pivot_is_base=True, target_defaults={"weight": 1.0, "density": 0.5},
    note="trim to the largest 50% of each Δ, elect signs, average the agreeing entries"))
_add(MethodSpec(
    "dare_linear", "dare_linear", pivot_is_base=True,
    target_defaults={"weight": lambda n: 1.0 / n, "density": 0.5},
    note="drop 50% of each Δ at random, rescale the rest, weighted sum"))
# The note is the card's text only: not a version (the weights are the same, and a version
# would buy an sce merge's paid evaluation again)
_add(MethodSpec(
    "sce", "sce", pivot_is_base=True,
    note="mergekit's SCE: keep the select_topk share of entries by variance (default 1.0: all), weight "
         "targets by mean squared change (uniform where the targets' sum of it is under 1e-6, as for "
         "most matrices of a full fine-tune at a small learning rate), erase minority signs"))


# The paper's baselines (Table 1), as released with FuseChat: the mergekit configs in
# FuseAI/FuseChat at FuseChat/merge/mergekit_configs/fusechat-{slerp,ta,ties,dare}.yml, and
# linear from FuseChat/merge/VaRM/merge.py run with --linear_weights "1,2" (weights
# normalised to 1/3, 2/3: what mergekit's linear does with normalize on). Per-target
# values are lists in the paper's target order: [Mixtral target, SOLAR target], so a
# run's first source must be the Mixtral-like one. Differences from the released files:
# none in values; SLERP's released config names the pivot as base_model, which mergekit's
# slerp cannot use (the base must be one of the two inputs), so ours interpolates from the
# first target (t = 0: the Mixtral target), which is what the slices list implies.
PAPER_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"weight": [1.0, 2.0], "normalize": True},
    "slerp": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5}]},
    "task_arithmetic": {"weight": [0.25, 0.5], "density": [0.5, 0.5], "normalize": True},
    "ties": {"weight": [0.25, 0.5], "density": [0.5, 0.5], "normalize": True},
    "dare_linear": {"weight": [0.25, 0.5], "density": [0.5, 0.5], "normalize": True},
}
PAPER_TARGETS = 2  # the paper merges two targets; the per-target lists above have two values

MERGE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {"paper": PAPER_PARAMETERS}


def method_parameters(merge: Any, method: str) -> dict[str, Any]:
    """The parameters merge ``method`` runs with under the run's ``MergeConfig``.

    The preset's values for the method (none without a preset: our defaults apply), then,
    for the main method, the config's own ``parameters`` on top, key by key.
    """
    params = dict(MERGE_PRESETS[merge.preset].get(method, {})) if merge.preset else {}
    if method == merge.method:
        params.update(merge.parameters)
    return params
