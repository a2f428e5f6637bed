"""Checks that need the registries, run before any work: a bad merge parameter
or an unknown fusion function fails in the first second, not after a week of
training. Errors are ``ConfigError`` lines naming the field, like the config's own."""

from __future__ import annotations

from fusechat_core.config import ConfigError, RunConfig


def preflight(cfg: RunConfig) -> None:
    from fusechat_core.fuse import FUSION_FUNCTIONS
    from fusechat_core.merge.translate import MergeError, check_merge_config

    if cfg.train.fusion_function not in FUSION_FUNCTIONS:
        raise ConfigError(f"train.fusion_function: unknown {cfg.train.fusion_function!r} "
                          f"(known: {', '.join(FUSION_FUNCTIONS.names())})")
    try:
        check_merge_config(cfg.merge, [s.name for s in cfg.sources])
    except MergeError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
