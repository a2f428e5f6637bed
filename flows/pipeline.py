"""The FuseChat DAG, as in the paper's diagram:

    demo models ─► dataset ─► represent[model × shard] ─► align[source × shard] ─► train[target]
                                                                                       │
        report ◄─ evaluate[model] ◄─ measure[model] ◄──── merge[method] ◄──────────┘
                  (the judge)        (GPU: answers, held-out measures)

Every task is keyed by its artifact address (``fusechat_core.plan``): running
the flow again skips what is finished, resumes what is not (shards, training
checkpoints, answered questions), and recomputes what an upstream change
invalidated. Tasks exchange small references, never data.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.setup import PIPELINE_FLOW
from fusechat_core.config import RunConfig, RunnerConfig, load_config
from fusechat_core.plan import CLM, RunPlan
from fusechat_core.preflight import preflight
from fusechat_core.stages import PIPELINE_STAGES
from fusechat_core.stopping import stop_on_termination
from tasks._stage import ensure_gpu_limit, open_store, result_storage_for, tell_dask_tasks_to_stop, unwalked
from tasks.align import align_shard, build_vocab_map, finish_align
from tasks.dataset import build_dataset
from tasks.demo import build_demo_model
from tasks.evaluate import build_run_report, evaluate_model, measure_model
from tasks.merge import merge_targets
from tasks.represent import submit_represent
from tasks.train import train_target

STAGES = PIPELINE_STAGES


def task_runner_for(cfg: RunConfig) -> Any:
    """Threads by default; Dask (a scheduler address, or a local cluster) for many workers."""
    if cfg.runner.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("runner.task_runner: dask needs `pip install fusechat[dask]`") from None
        if cfg.runner.dask_address:
            return DaskTaskRunner(address=cfg.runner.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runner.max_workers, "threads_per_worker": 1,
                                              "processes": True})
    return ThreadPoolTaskRunner(max_workers=cfg.runner.max_workers)


def run_name() -> str:
    """A flow run's name: the run's (``demo``, ``fusechat-7b-varm``), and ``-until-<stage>`` when
    it stops early, so the dashboard's list of runs says which is which."""
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    cfg, path = params.get("config"), params.get("config_path")
    if cfg is None and path:
        # a deployment gives the file: named after the run it holds, not the file (two runs'
        # config.yaml were one name on the dashboard); a file that cannot be read fails the run
        # with its own error, under the file's name
        from fusechat_core.config import ConfigError, read_config_data

        with contextlib.suppress(ConfigError):
            cfg, _ = read_config_data(path)
    name = (cfg if isinstance(cfg, dict) else {}).get("name") or \
        (Path(str(path).rstrip("/")).stem if path else "fusechat")
    return flow_run_name(name, params.get("until"))


def flow_run_name(name: str, until: str | None = None) -> str:
    """The name of a run of config ``name`` that stops after stage ``until`` (None: the last)."""
    until = until or STAGES[-1]
    return name if until == STAGES[-1] else f"{name}-until-{until}"


def one_at_a_time(futures: list[PrefectFuture]) -> list[Any] | None:
    """``wait_for`` that starts a task only once the one submitted before it has finished,
    failed or not: the in-process stages that draw on torch's process-wide generator
    (demo pre-training, training) wait *Pending* on the dashboard, not Running behind a lock.
    Under Dask each task has a process of its own and nothing waits."""
    from prefect.context import FlowRunContext
    from prefect.utilities.annotations import allow_failure

    ctx = FlowRunContext.get()
    if not futures or ctx is None or not isinstance(ctx.task_runner, ThreadPoolTaskRunner):
        return None
    return [allow_failure(futures[-1])]


def _settle(results: dict[str, Any], futures: dict[str, PrefectFuture],
            upstream: list[PrefectFuture] = ()) -> None:  # type: ignore[assignment]
    """Wait for a stage's futures and record each one's reference and Prefect state.

    A task that never ran because a task it waited for (in ``upstream``) failed is left
    Pending by Prefect ("NotReady"): the run then fails with the error of the task that
    failed (a shard's one line naming its row or file), not with "Run is in PENDING state"."""
    wait(list(futures.values()))
    for label, fut in futures.items():
        if not fut.state.is_final():
            for up in upstream:
                if up.state.is_failed() or up.state.is_crashed():
                    up.result()  # raises that task's error
        results[label] = {**fut.result(), "state": fut.state.name}


def runner_mismatch(cfg: RunConfig, runner: Any, gpus: int | None = None) -> list[str]:
    """What of ``cfg.runner`` the flow's active task runner does not do (empty: all of it).
    ``gpus``: the GPUs this process sees (None: not known), which bound what threads can fill.

    ``fusechat run`` starts the flow with ``task_runner_for(cfg)``; a deployment runs the flow
    as decorated (Prefect fixes a flow's runner before its parameters are known), with
    ``FUSECHAT_MAX_WORKERS`` threads (``deployed_max_workers``)."""
    want, problems = cfg.runner, []
    if want.task_runner == "dask" and type(runner).__name__ != "DaskTaskRunner":
        problems.append(f"runner.task_runner: dask is not applied here: this run uses {type(runner).__name__} "
                        f"(a deployment runs the flow's own runner; `fusechat run` applies the config's)")
    workers = getattr(runner, "_max_workers", None)
    if want.task_runner == "threads" and isinstance(workers, int) and workers != want.max_workers:
        problems.append(f"runner.max_workers: {want.max_workers} is not applied here: this run has {workers} "
                        f"worker threads (a deployment runs the flow's own runner, {MAX_WORKERS_ENV} threads "
                        f"in its job's env; `fusechat run` applies the config's)")
    # the slots this node can fill: a 1-GPU pod of the 8-slot cluster runs one model at a time
    # (models.claim_gpu), whatever its thread count
    fillable = want.gpu_concurrency if gpus is None else min(want.gpu_concurrency, gpus)
    if isinstance(runner, ThreadPoolTaskRunner) and isinstance(workers, int) and want.gpu_tag \
            and workers < fillable:
        # an 8-GPU node would hold 4 of its GPUs idle through a represent stage
        problems.append(f"runner.gpu_concurrency: {want.gpu_concurrency} GPU slots, but this run has {workers} "
                        f"worker threads: at most {workers} model-holding tasks run at once (set "
                        f"runner.max_workers, or {MAX_WORKERS_ENV} in a deployment's env, to at least "
                        f"{fillable})")
    return problems


MAX_WORKERS_ENV = "FUSECHAT_MAX_WORKERS"


def deployed_max_workers() -> int:
    """A deployment's thread count: ``FUSECHAT_MAX_WORKERS`` from the worker's job env (the
    flow's runner is fixed when the flow is loaded, before the config is read), else
    ``runner.max_workers``' default."""
    raw = os.environ.get(MAX_WORKERS_ENV, "").strip()
    default = RunnerConfig().max_workers
    if not raw:
        return default
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        # read when this module is imported, by `fusechat run` too (which never uses it): a
        # warning, not an error that would stop every command of the CLI
        logging.getLogger("fusechat").warning("%s: %r is not a positive whole number of worker threads; "
                                              "a deployed run uses %d", MAX_WORKERS_ENV, raw, default)
        return default
    return n


# A deployment's runs get this runner (threads, bounded): unbounded, every align shard of a
# 95k-conversation run would hold its rows at once.
@flow(name=PIPELINE_FLOW, flow_run_name=run_name, validate_parameters=True,
      task_runner=ThreadPoolTaskRunner(max_workers=deployed_max_workers()))
def fusechat_pipeline(config: dict[str, Any] | None = None, config_path: str | None = None,
                      until: str = STAGES[-1]) -> dict[str, Any]:
    """Run (or resume) a fusion run. Give the config itself, or the path/URL of its YAML file."""
    # SIGTERM reaches this (main) thread as Prefect's TerminationSignal, mostly while it waits
    # on a stage: the whole run stops with it (worker threads' loops, child processes), so the
    # process is gone in seconds instead of once the running stages finish (SPEC §5).
    with stop_on_termination(on_stop=_let_go_of_the_task_runner):
        return _pipeline(config, config_path, until)


def _let_go_of_the_task_runner() -> None:
    """Before a stop terminates this process's children. The thread runner's exit waits for
    every running task; after a stop, a task in a long library call (a tokenizer conversion)
    would hold the run for its whole length. Its threads are let go instead: the engine
    reports the run Crashed at once and the process ends (the stop's deadline ends it if
    nothing else does). Under Dask, the tasks running on workers are told to stop (workers of
    a cluster the run did not start are not this process's children, and would train on). A
    local Dask cluster's nannies would restart the terminated worker processes, and the
    scheduler would hand them the lost tasks again: they are told the cluster is closing first."""
    import concurrent.futures

    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    dask_client = getattr(runner, "_client", None)  # prefect_dask's DaskTaskRunner
    if dask_client is not None:
        tell_dask_tasks_to_stop(dask_client)
    executor = getattr(runner, "_executor", None)
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        executor.shutdown(wait=False, cancel_futures=True)
        runner._executor = None  # type: ignore[union-attr]
    cluster = getattr(runner, "_cluster", None)  # prefect_dask's DaskTaskRunner
    for nanny in list(getattr(cluster, "workers", {}).values()):
        close_gracefully = getattr(nanny, "close_gracefully", None)  # in-process nannies only
        if close_gracefully is not None:
            close_gracefully(reason="fusechat-stop")


def run_can_start(cfg: RunConfig, plan: RunPlan, until: str) -> None:
    """What would make a run wrong or fail late, found in the store before its first stage
    (a ``ConfigError``, one line): a local data file changed since its dataset was built (the
    run would reuse that dataset); evaluations still to grade by OpenAI's API with no key for
    it (a 401 after a week's stages). Under Dask the grading runs on the workers, whose
    environment this process cannot see: a missing key is a warning there."""
    from fusechat_core.config import ConfigError
    from fusechat_core.data import changed_local_sources
    from fusechat_core.evaluate.judge import missing_key

    st = open_store(cfg.store)
    if STAGES.index(until) > STAGES.index("dataset") and (changed := changed_local_sources(cfg, st, plan.dataset)):
        raise ConfigError(changed[0])
    if STAGES.index(until) < STAGES.index("evaluate") or (problem := missing_key(cfg.evaluate)) is None:
        return
    if any(not st.is_complete(plan.evaluate(n)) for n in plan.evaluated_models()):
        if cfg.runner.task_runner == "dask":
            logging.getLogger("fusechat").warning("%s (if the Dask workers have it, ignore this)", problem)
            return
        raise ConfigError(problem)


def _visible_gpus() -> int | None:
    """The CUDA GPUs this process sees (None when torch was not imported to ask: not known)."""
    import sys

    torch = sys.modules.get("torch")
    return None if torch is None else torch.cuda.device_count()


def _pipeline(config: dict[str, Any] | None, config_path: str | None, until: str) -> dict[str, Any]:
    if (config is None) == (config_path is None):
        raise ValueError("give exactly one of config and config_path")
    if until not in STAGES:
        raise ValueError(f"until: unknown stage {until!r} (stages: {', '.join(STAGES)})")
    cfg = load_config(config_path) if config_path else RunConfig.model_validate(config)
    preflight(cfg, until)
    from prefect.context import FlowRunContext

    for problem in runner_mismatch(cfg, getattr(FlowRunContext.get(), "task_runner", None), _visible_gpus()):
        get_run_logger().warning(problem)
    # Preflight has imported torch, transformers and mergekit: millions of long-lived objects
    # that every later full collection would walk again (0.6 s each, set off by each large
    # tokenizer file parsed: 4 of a tiny run's 30 CPU seconds). Only refcounts free them
    # once frozen, and module-level objects are never freed anyway.
    gc.freeze()
    plan = RunPlan(cfg)
    run_can_start(cfg, plan, until)
    config = unwalked(cfg.model_dump(mode="json"))
    store = cfg.store
    opts = {"result_storage": result_storage_for(store)}
    gpu_tags = ensure_gpu_limit(cfg.runner.gpu_tag, cfg.runner.gpu_concurrency) if cfg.runner.gpu_tag else []
    st = open_store(store)

    def gpu(*addresses: str) -> list[str]:
        # A finished stage needs no GPU: it must not queue for a GPU slot just to report Cached.
        return [] if all(map(st.is_complete, addresses)) else gpu_tags
    results: dict[str, Any] = {}
    stop = STAGES.index(until)

    demo: dict[str, PrefectFuture] = {}
    for m in plan.demo_specs():
        demo[f"demo_models[{m.name}]"] = build_demo_model.with_options(**opts).submit(
            config, m.name, plan.demo_model(m), store, wait_for=one_at_a_time(list(demo.values())))
    _settle(results, demo)
    if stop <= STAGES.index("demo_models"):
        return results

    _settle(results, {"dataset": build_dataset.with_options(**opts).submit(config, plan.dataset, store)})
    if stop <= STAGES.index("dataset"):
        return results

    # Vocabulary maps need only tokenizers: they run while the models run.
    vocab = {s.name: build_vocab_map.with_options(**opts).submit(config, plan.vocab_map(s), store, s.name)
             for s in cfg.sources}
    represent, represent_shards = submit_represent(cfg, plan, result_storage=opts["result_storage"], tags=gpu_tags)
    _settle(results, {f"represent[{k}]": v for k, v in represent.items()}, upstream=represent_shards)
    if stop <= STAGES.index("represent"):
        return results

    aligned, align_shards = {}, []
    for s in cfg.sources:
        shards = [align_shard.with_options(**opts).submit(config, plan.align_shard(s, i), store, s.name, i,
                                                          wait_for=[vocab[s.name]])
                  for i in range(cfg.represent.shards)]
        align_shards += shards
        aligned[s.name] = finish_align.with_options(**opts).submit(config, plan.align(s), store, s.name,
                                                                   wait_for=shards)
    _settle(results, {f"vocab_map[{k}]": v for k, v in vocab.items()})
    _settle(results, {f"align[{k}]": v for k, v in aligned.items()}, upstream=align_shards)
    if stop <= STAGES.index("align"):
        return results

    # One target per source (and the CLM baseline), independent: each may run on its own Dask
    # worker. Under threads they share this node, one at a time: in-process training draws on
    # torch's process-wide generator, and an accelerate config takes the node's GPUs (the 7B
    # config's 8 each): three launches at once would share them, and OOM.
    trained: dict[str, PrefectFuture] = {}
    for t in plan.target_names():
        trained[t] = train_target.with_options(tags=gpu(plan.train(t)), **opts).submit(
            config, t, plan.train(t), store, wait_for=one_at_a_time(list(trained.values())))
    _settle(results, {f"train[{t}]": f for t, f in trained.items()})
    if stop <= STAGES.index("train"):
        return results

    targets = {s.name: plan.train(s.name) for s in cfg.sources}
    # One merge at a time in-process (mergekit seeds torch's process-wide generator, which DARE
    # draws from): the later ones wait Pending on the dashboard, not Running behind a lock.
    merged: dict[str, PrefectFuture] = {}
    for m in plan.merge_methods():
        merged[m] = merge_targets.with_options(**opts).submit(config, m, targets, plan.merge(m), store,
                                                              wait_for=one_at_a_time(list(merged.values())))
    _settle(results, {f"merge[{m}]": f for m, f in merged.items()})
    if stop <= STAGES.index("merge"):
        return results

    # Each evaluation in two steps: answers and held-out measures hold the model and a GPU
    # slot; the judge's grading (hours of a paid API at 7B) holds neither. Every GPU step is
    # submitted before any grading: the runner's threads go to them first, so gradings
    # waiting on a judge never hold every thread while a GPU step waits for one.
    answers = {n: plan.mt_bench_answers(n) if cfg.evaluate.mt_bench else None for n in plan.evaluated_models()}
    measures = {n: plan.heldout_measures(n) for n in plan.evaluated_models()}
    made = {n: [a for a in (measures[n], answers[n]) if a] for n in plan.evaluated_models()}
    measured = {n: measure_model.with_options(tags=gpu(*made[n]), **opts).submit(
        config, n, plan.model_ref(n), made[n][0], store, dataset=plan.dataset, answers=answers[n])
        for n in plan.evaluated_models()
        # an evaluation finished before its measures had an address of their own needs none
        if made[n] and not (st.is_complete(plan.evaluate(n)) and not all(map(st.is_complete, made[n])))}
    evaluated = {n: evaluate_model.with_options(**opts).submit(
        config, n, plan.model_ref(n), plan.evaluate(n), store, dataset=plan.dataset, answers=answers[n],
        measures=measures[n], measured=n in measured, wait_for=[measured[n]] if n in measured else None)
        for n in plan.evaluated_models()}
    wait([*measured.values(), *evaluated.values()])  # every model's grading ends before a failure is raised
    # under the label of the artifact each step is keyed by, as in the plan
    _settle(results, {f"{'heldout_measures' if measures[n] else 'mt_bench_answers'}[{n}]": f
                      for n, f in measured.items()})
    _settle(results, {f"evaluate[{n}]": f for n, f in evaluated.items()}, upstream=list(measured.values()))
    if stop <= STAGES.index("evaluate"):
        return results

    training = {plan.target_label(t): plan.train(t) for t in plan.target_names()}
    report = build_run_report.with_options(**opts).submit(
        config, {n: plan.evaluate(n) for n in plan.evaluated_models()}, plan.report(), store, training=training,
        roles=plan.report_roles())
    _settle(results, {"report": report})
    get_run_logger().info("report: %s", results["report"]["address"])
    return results


__all__ = ["CLM", "STAGES", "fusechat_pipeline"]
