"""Representation tasks: one per (model, shard), then one that commits each model's stage artifact.

Shards × models are separate mapped tasks, so they spread over workers (give them the
pool's GPU tag); each is keyed by its shard address, so a rerun after a kill computes
only the shards whose manifests are missing. Each shard reports tokens/s to the log
and its progress to a Prefect progress artifact.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from fusechat_core.config import RunConfig
from fusechat_core.plan import RunPlan
from tasks._stage import (
    PROGRESS_EVERY_S,
    open_store,
    run_config,
    run_name,
    stage_done,
    stage_ref,
    stage_task,
    unwalked,
)


class _Reporter:
    """Turns collection events into a progress artifact and tokens/s log lines."""

    def __init__(self, model: str, shard: int, shards: int, logger: Any):
        self.model, self.shard, self.shards, self.logger = model, shard, shards, logger
        self.artifact_id: Any = None
        self.last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "shard_done":
            if self.artifact_id is not None:
                update_progress_artifact(self.artifact_id, progress=100.0)
            return
        pct = 100.0 * event["seqs_done"] / max(event["seqs_total"], 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, description=f"Representations of {self.model}, shard {self.shard + 1} of "
                                          f"{self.shards}: sequences done")
            self.last = time.monotonic()
        elif time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            update_progress_artifact(self.artifact_id, progress=pct)
            self.logger.info("represent %s shard %d/%d: %d/%d sequences, %.0f tokens/s", self.model,
                             self.shard + 1, self.shards, event["seqs_done"], event["seqs_total"],
                             event["tokens_per_s"])


@stage_task(name="represent-shard", task_run_name=run_name("represent", "model", shard="shard"), retries=1,
            retry_delay_seconds=10)
def represent_shard(config: dict, model: str, shard: int, address: str, store: str) -> dict:
    """Top-k representations of one model over one shard of the fusion data."""
    from fusechat_core.represent import RepresentError, represent_model

    logger = get_run_logger()
    cfg = run_config(config)
    plan = RunPlan(cfg)
    spec = plan.model(model)
    if plan.represent_shard(spec, shard) != address:
        raise RepresentError(f"represent {model} shard {shard}: address {address!r} is not this run's "
                             f"({plan.represent_shard(spec, shard)!r})")
    st = open_store(store)
    [summary] = represent_model(cfg, st, plan, spec, shard,
                                progress=_Reporter(model, shard, cfg.represent.shards, logger))
    n = cfg.represent.shards
    done = sum(st.is_complete(plan.represent_shard(spec, i)) for i in range(n))
    if summary["computed"]:
        logger.info("represent %s shard %d/%d: %d sequences, %d supervised tokens, %.0f tokens/s; "
                    "%d of %d shards of %s done", model, shard + 1, n, summary["n_seq"], summary["n_supervised"],
                    summary["n_tokens"] / max(summary["seconds"], 1e-9), done, n, model)
    else:
        logger.info("represent %s shard %d/%d: already complete; %d of %d shards of %s done", model,
                    shard + 1, n, done, n, model)
    return stage_ref(st, address, model=model, shard=shard)


@stage_task(name="represent", task_run_name=run_name("represent", "model"), retries=1, retry_delay_seconds=5)
def commit_represent(config: dict, model: str, address: str, store: str, shards: list[dict]) -> dict:
    """The model's stage artifact, once all its shards are complete (``shards``: their refs,
    passed so Prefect runs this after them)."""
    from fusechat_core.represent import RepresentError, commit_representation, release_model

    started = time.monotonic()
    cfg = RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    spec = plan.model(model)
    if plan.represent(spec) != address:
        raise RepresentError(f"represent {model}: address {address!r} is not this run's ({plan.represent(spec)!r})")
    st = open_store(store)
    # Every shard of this model is done: its weights need not hold the GPU for later stages.
    release_model(spec)
    computed = not st.is_complete(address)
    if computed:
        man = commit_representation(cfg, st, plan, spec)
        get_run_logger().info("represent %s: %d shards, %d sequences (%d cut to represent.max_length), "
                              "%d supervised tokens", model, len(man.meta["shards"]), man.meta["n_seq"],
                              man.meta["n_cut"], man.meta["n_supervised"])
    return stage_done(st, address, f"Representations of `{model}`", started, computed=computed,
                      figures={"shards": cfg.represent.shards}, model=model)


def submit_represent(cfg: RunConfig, plan: RunPlan, *, result_storage: Any = None,
                     tags: list[str] | None = None) -> tuple[dict[str, Any], list[Any]]:
    """Inside a flow: map every (model, shard) to a task, then commit each model.

    Returns ``{model name: future of its stage ref}`` and the shard tasks' futures (a
    failed shard's error is the run's, where its model's commit is left waiting). ``tags``
    (e.g. the GPU tag) go on the shard tasks, the only ones that hold a model.
    """
    config = unwalked(cfg.model_dump(mode="json"))
    options: dict[str, Any] = {}
    if result_storage is not None:
        options["result_storage"] = result_storage
    shard_task = represent_shard.with_options(tags=tags or [], **options)
    commit_task = commit_represent.with_options(**options)
    n = cfg.represent.shards
    store = open_store(cfg.store)
    futures = []
    for spec in cfg.models:
        for i in range(n):
            address = plan.represent_shard(spec, i)
            # A finished shard needs no GPU: it must not queue for a GPU slot to report Cached.
            task = shard_task if not store.is_complete(address) else shard_task.with_options(tags=[])
            futures.append(task.submit(config, spec.name, i, address, cfg.store))
    out = {}
    for m, spec in enumerate(cfg.models):
        mine = list(futures[m * n:(m + 1) * n])
        out[spec.name] = commit_task.submit(config, spec.name, plan.represent(spec), cfg.store, mine)
    return out, futures
