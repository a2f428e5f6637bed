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


MERGE_METHODS: Registry[MethodSpec] = Registry("merge method")


def _add(spec: MethodSpec) -> None:
    MERGE_METHODS.register(spec.name)(spec)


_add(MethodSpec(
    "varm", "varm", pivot_is_base=True, reserved=("weight", "granularity"),
    note="per-matrix weights from each target's mean squared change against the pivot"))
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
_add(MethodSpec(
    "sce", "sce", pivot_is_base=True,
    note="select high-variance entries (select_topk), VaRM-like weights, erase minority signs"))
