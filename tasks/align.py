"""Alignment tasks: the vocabulary map per source, one task per source × shard, then the stage artifact.

The flow runs ``build_vocab_map`` and, per shard, ``align_shard`` once the
pivot's and that source's representation shard of the same index exist; a
shard's task depends on nothing else, so shards of several sources run side
by side and a rerun redoes only missing shards. ``finish_align`` writes the
stage artifact (manifest listing every shard) after the last shard.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError

from fusechat_core.align import (AlignError, align_shard_artifact, build_vocab_map_artifact,
                                 finish_align_artifact)
from fusechat_core.config import RunConfig
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tasks._stage import STAGE_TASK_OPTIONS, stage_ref


def _logger() -> Any:
    # ``task.fn(...)`` (tests, a debugger) runs outside any Prefect run context.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fusechat.align")


def _check(address: str, expected: str, what: str) -> None:
    # The cache key is the address argument: a wrongly wired one would cache the wrong artifact.
    if address != expected:
        raise AlignError(f"{what}: address {address!r} is not the plan's {expected!r}")


@task(name="vocab_map", task_run_name="vocab_map-{source}", retries=1, retry_delay_seconds=10,
      **STAGE_TASK_OPTIONS)
def build_vocab_map(config: dict, address: str, store: str, source: str) -> dict:
    """The source → pivot vocabulary map (exact match, else MinED)."""
    logger = _logger()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.vocab_map(spec), f"vocab_map[{source}]")
    st = ArtifactStore(store)
    if not st.is_complete(address):
        build_vocab_map_artifact(cfg, st, address, spec, progress=logger.info)
    return stage_ref(st, address)


@task(name="align_shard", task_run_name="align-{source}-{index}", retries=1, retry_delay_seconds=10,
      **STAGE_TASK_OPTIONS)
def align_shard(config: dict, address: str, store: str, source: str, index: int) -> dict:
    """One ALIGNED shard: the source's shard ``index`` at the pivot's rows, in pivot ids."""
    logger = _logger()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.align_shard(spec, index), f"align[{source}] shard {index}")
    st = ArtifactStore(store)
    if not st.is_complete(address):
        align_shard_artifact(cfg, st, spec, index, progress=logger.info)
    return stage_ref(st, address)


@task(name="align", task_run_name="align-{source}", retries=1, retry_delay_seconds=10, **STAGE_TASK_OPTIONS)
def finish_align(config: dict, address: str, store: str, source: str) -> dict:
    """The stage artifact of one source, once all its shards are complete."""
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(source)
    _check(address, plan.align(spec), f"align[{source}]")
    st = ArtifactStore(store)
    if not st.is_complete(address):
        finish_align_artifact(cfg, st, spec)
    if TaskRunContext.get() is not None:
        s = st.require(address).meta
        create_markdown_artifact(
            f"# Alignment `{source}` → `{cfg.pivot.name}`\n\n"
            f"| rows | 1-to-1 | fallback | top-k mass exact | MinED | unmapped | method |\n"
            f"|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {s['rows']} | {s['share_one_to_one']:.1%} | {s['share_fallback']:.1%} | {s['mass_exact']:.1%} "
            f"| {s['mass_mined']:.1%} | {s['mass_unmapped']:.1%} | {', '.join(s['sequence_alignment'])} |",
            key=f"align-{source.replace('_', '-')}", description=f"token alignment statistics of source {source}")
    return stage_ref(st, address)
