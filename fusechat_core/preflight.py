"""Checks that need the registries, run before any work: a bad merge parameter
or an unknown fusion function fails in the first second, not after a week of
training. Errors are ``ConfigError`` lines naming the field, like the config's own.

The registries import torch and mergekit (seconds). A check guards the stages it is
about, so it runs only while one of them is still to be made: the rerun of a finished
run imports neither. The fields checked are part of those stages' addresses, so a
changed field always means an unfinished stage, and the check runs.
"""

from __future__ import annotations

from fusechat_core.config import ConfigError, RunConfig


def _to_make(cfg: RunConfig, addresses: list[str]) -> bool:
    """Whether any of these artifacts is not complete in the run's store (unknown: yes)."""
    from fusechat_core.store import ArtifactStore

    try:
        store = ArtifactStore(cfg.store)
        return not all(store.is_complete(a) for a in addresses)
    except Exception:  # an unreachable store is reported by whoever needs it; check anyway
        return True


def preflight(cfg: RunConfig) -> None:
    from fusechat_core.plan import RunPlan

    plan = RunPlan(cfg)
    if _to_make(cfg, [plan.train(t) for t in plan.target_names()]):
        from fusechat_core.fuse import FUSION_FUNCTIONS

        if cfg.train.fusion_function not in FUSION_FUNCTIONS:
            raise ConfigError(f"train.fusion_function: unknown {cfg.train.fusion_function!r} "
                              f"(known: {', '.join(FUSION_FUNCTIONS.names())})")
    if _to_make(cfg, [plan.merge(m) for m in plan.merge_methods()]):
        from fusechat_core.merge.translate import MergeError, check_merge_config

        try:
            check_merge_config(cfg.merge, [s.name for s in cfg.sources])
        except MergeError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
