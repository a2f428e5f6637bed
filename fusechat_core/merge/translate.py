"""Our merge settings → a mergekit ``MergeConfiguration``.

Per-target parameters (``weight``, ``density``...) may be given as one value for
every target, a list in target order, or a mapping from target name; shared
parameters (``t``, ``normalize``, ``select_topk``...) pass through as mergekit
takes them (filters and gradients included). A user's own mergekit YAML is used
as given, with ``${pivot}`` and ``${<target name>}`` replaced by local paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import ParameterScope

from fusechat_core.config import ConfigError, load_yaml
from fusechat_core.merge import varm as _varm  # noqa: F401  (registers VaRM with mergekit)
from fusechat_core.merge.methods import MERGE_METHODS, PAPER_TARGETS, MethodSpec, method_parameters


class MergeError(ValueError):
    """A merge that cannot be set up or run; ``str`` is one line naming the field or model."""


def method_spec(name: str) -> MethodSpec:
    try:
        return MERGE_METHODS.get(name)
    except KeyError as exc:
        raise MergeError(f"merge.method: {exc.args[0]}") from None


def _per_target(key: str, value: Any, names: list[str]) -> list[Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise MergeError(f"merge.parameters.{key}: no target named {unknown[0]!r} (targets: {', '.join(names)})")
        missing = [n for n in names if n not in value]
        if missing:
            raise MergeError(f"merge.parameters.{key}: no value for target {missing[0]!r}")
        return [value[n] for n in names]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(names):
            raise MergeError(f"merge.parameters.{key}: {len(value)} values for {len(names)} targets "
                             f"({', '.join(names)})")
        return list(value)
    return [value] * len(names)


def build_configuration(method: str, pivot: str, targets: Mapping[str, str], *,
                        parameters: Mapping[str, Any] | None = None, dtype: str = "float32",
                        target_weights: list[Any] | None = None,
                        granularity: str = "matrix") -> MergeConfiguration:
    """The mergekit configuration for merging ``targets`` (name → path) onto ``pivot``.

    ``target_weights`` are VaRM's precomputed group weights (layer/model granularity).
    Arithmetic always runs in float32; ``dtype`` is what the merged model is saved in.
    """
    spec = method_spec(method)
    names = list(targets)
    if not names:
        raise MergeError("merge: no targets to merge")
    if spec.exact_targets is not None and len(names) != spec.exact_targets:
        raise MergeError(f"merge.method: {method} merges exactly {spec.exact_targets} targets, "
                         f"this run has {len(names)} ({', '.join(names)})")
    mk = merge_methods.get(spec.mergekit_method)
    known = {p.name: p for p in mk.spec.parameters}
    given = dict(parameters or {})
    for key in given:
        if key in spec.reserved:
            raise MergeError(f"merge.parameters.{key}: set by {method} itself, not a parameter")
        if key not in known:
            allowed = sorted(set(known) - set(spec.reserved))
            raise MergeError(f"merge.parameters.{key}: unknown parameter for {method} "
                             f"(known: {', '.join(allowed) or 'none'})")

    shared: dict[str, Any] = {}
    per_target: list[dict[str, Any]] = [{} for _ in names]
    for key, p in known.items():
        if key in spec.reserved:
            continue
        if p.scope == ParameterScope.SHARED:
            if key in given:
                shared[key] = given[key]
            elif key in spec.shared_defaults:
                shared[key] = spec.shared_defaults[key]
            continue
        if key in given:
            values = _per_target(key, given[key], names)
        elif key in spec.target_defaults:
            default = spec.target_defaults[key]
            values = [default(len(names)) if callable(default) else default] * len(names)
        else:
            continue
        for row, v in zip(per_target, values):
            row[key] = v

    for key, value in [*shared.items(), *((k, v) for row in per_target for k, v in row.items())]:
        _check_value(method, key, value, known[key])

    if method == "varm" or spec.mergekit_method == "varm":
        shared["granularity"] = granularity
        if granularity != "matrix":
            if target_weights is None or len(target_weights) != len(names):
                raise MergeError(f"merge.granularity: {granularity} needs precomputed VaRM weights")
            for row, w in zip(per_target, target_weights):
                row["weight"] = w
    elif granularity != "matrix":
        raise MergeError(f"merge.granularity: {granularity!r} applies to varm only, not {method}")

    raw: dict[str, Any] = {
        "merge_method": spec.mergekit_method,
        "dtype": "float32",
        "out_dtype": dtype,
        "models": [{"model": targets[n], **({"parameters": per_target[i]} if per_target[i] else {})}
                   for i, n in enumerate(names)],
    }
    if spec.pivot_is_base:
        raw["base_model"] = pivot
    elif spec.exact_targets == 2:
        raw["base_model"] = targets[names[0]]  # SLERP interpolates from the first target
    if shared:
        raw["parameters"] = shared
    return _validate(raw, f"merge ({method})")


def _check_value(method: str, key: str, value: Any, param: Any) -> None:
    # Plain values are checked against mergekit's own parameter type now; filtered
    # or gradient settings are mergekit's to resolve per tensor.
    if isinstance(value, (list, dict)):
        return
    try:
        param.validate(value)
    except Exception:
        raise MergeError(f"merge.parameters.{key}: {value!r} is not a valid value for {method} "
                         f"(expects {getattr(param.value_type, '__name__', param.value_type)})") from None


_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_\-]+)\}")


def configuration_from_yaml(text: str, pivot: str, targets: Mapping[str, str], *,
                            where: str = "merge.mergekit_yaml") -> MergeConfiguration:
    """A user's mergekit YAML, with ``${pivot}`` / ``${<target>}`` bound to local paths."""
    paths = {"pivot": pivot, **targets}

    def sub(m: re.Match) -> str:
        if m.group(1) not in paths:
            raise MergeError(f"{where}: unknown placeholder ${{{m.group(1)}}} "
                             f"(known: {', '.join('${' + k + '}' for k in paths)})")
        return paths[m.group(1)]

    try:  # strictly: an alias bomb or a duplicate key is refused before anything expands
        raw = load_yaml(_PLACEHOLDER.sub(sub, text), where)
    except ConfigError as exc:
        raise MergeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    if not isinstance(raw, dict):
        raise MergeError(f"{where}: a mergekit configuration is a mapping")
    try:
        merge_methods.get(str(raw.get("merge_method")))
    except RuntimeError:
        known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
        raise MergeError(f"{where}: merge_method: unknown method {raw.get('merge_method')!r} "
                         f"(mergekit knows: {known})") from None
    return _validate(raw, where)


def _validate(raw: dict[str, Any], where: str) -> MergeConfiguration:
    try:
        return MergeConfiguration.model_validate(raw)
    except Exception as exc:  # pydantic ValidationError or mergekit's RuntimeError
        errors = getattr(exc, "errors", None)
        if callable(errors):
            err = errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise MergeError(f"{where}: {loc}: {err['msg']}") from None
        raise MergeError(f"{where}: {str(exc).splitlines()[0]}") from None


def check_merge_config(merge: Any, target_names: list[str]) -> None:
    """Fail before training, not after it: every merge of the run translates cleanly.

    ``merge`` is the run's ``MergeConfig``. Paths are placeholders; nothing is read.
    """
    fake = {n: f"/targets/{n}" for n in target_names}
    if merge.preset == "paper" and len(target_names) != PAPER_TARGETS:
        raise MergeError(f"merge.preset: paper holds the released configs' values for the paper's "
                         f"{PAPER_TARGETS} targets (Mixtral, then SOLAR); this run has {len(target_names)} "
                         f"({', '.join(target_names)})")
    methods = [merge.method] + [x for x in merge.methods_extra if x != merge.method]
    for method in methods:
        main = method == merge.method
        if main and merge.mergekit_yaml is not None:
            configuration_from_yaml(merge.mergekit_yaml, "/pivot", fake)
            continue
        granularity = merge.granularity if method == "varm" else "matrix"
        weights = [0.0] * len(target_names) if granularity != "matrix" else None
        build_configuration(method, "/pivot", fake, parameters=method_parameters(merge, method),
                            dtype=merge.dtype, target_weights=weights, granularity=granularity)
