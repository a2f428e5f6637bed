"""Alignment tasks: the vocabulary map per source, one task per source × shard, then the stage artifact.

The flow runs ``build_vocab_map`` and, per shard, ``align_shard`` once the
pivot's and that source's representation shard of the same index exist; a
shard's task depends on nothing else, so shards of several sources run side
by side and a rerun redoes only missing shards. ``finish_align`` writes the
stage artifact (manifest listing every shard) after the last shard.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from fusechat_core.config import RunConfig
from fusechat_core.plan import RunPlan
from tasks._stage import open_store, run_name, stage_done, stage_ref, stage_task


def _logger() -> Any:
    # ``task.fn(...)`` (tests, a debugger) runs outside any Prefect run context.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fusechat.align")


def _check(address: str, expected: str, what: str) -> None:
    # The cache key is the address argument: a wrongly wired one would cache the wrong artifact.
    if address != expected:
        from fusechat_core.align import AlignError

        raise AlignError(f"{what}: address {address!r} is not the plan's {expected!r}")


@stage_task(name="vocab_map", task_run_name=run_name("vocab_map", "source"), retries=1, retry_delay_seconds=10)
def build_vocab_map(config: dict, address: str, store: str, source: str) -> dict:
    """The source → pivot vocabulary map (exact match, else MinED)."""
    from fusechat_core.align import build_vocab_map_artifact

    started = time.monotonic()
    logger = _logger()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.vocab_map(spec), f"vocab_map[{source}]")
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        build_vocab_map_artifact(cfg, st, address, spec, progress=logger.info)
    return stage_done(st, address, f"Vocabulary map `{source}` → `{cfg.pivot.name}`", started, computed=computed)


@stage_task(name="align_shard", task_run_name=run_name("align", "source", shard="index"), retries=1,
            retry_delay_seconds=10)
def align_shard(config: dict, address: str, store: str, source: str, index: int) -> dict:
    """One ALIGNED shard: the source's shard ``index`` at the pivot's rows, in pivot ids."""
    from fusechat_core.align import align_shard_artifact

    logger = _logger()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.align_shard(spec, index), f"align[{source}] shard {index}")
    st = open_store(store)
    if not st.is_complete(address):
        align_shard_artifact(cfg, st, spec, index, progress=logger.info)
    return stage_ref(st, address)


@stage_task(name="align", task_run_name=run_name("align", "source"), retries=1, retry_delay_seconds=10)
def finish_align(config: dict, address: str, store: str, source: str) -> dict:
    """The stage artifact of one source, once all its shards are complete."""
    from fusechat_core.align import finish_align_artifact

    started = time.monotonic()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.align(spec), f"align[{source}]")
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        finish_align_artifact(cfg, st, spec)
    s = st.require(address).meta
    details = (f"| rows | 1-to-1 | fallback | top-k mass exact | MinED | unmapped | method |\n"
               f"|---:|---:|---:|---:|---:|---:|---|\n"
               f"| {s['rows']} | {s['share_one_to_one']:.1%} | {s['share_fallback']:.1%} | {s['mass_exact']:.1%} "
               f"| {s['mass_mined']:.1%} | {s['mass_unmapped']:.1%} | {', '.join(s['sequence_alignment'])} |")
    return stage_done(st, address, f"Alignment `{source}` → `{cfg.pivot.name}`", started, computed=computed,
                      details=details)
