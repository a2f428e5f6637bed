"""Evaluation tasks: one model's GPU step (MT-Bench answers, held-out measures), its grading
by the judge and results, and the run's report."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger

from tasks._stage import ProgressArtifact, StageAddressPolicy, open_store, run_name, stage_done, stage_task


def _evaluate_section(config: dict, name: str, model: dict, st: Any, resolve: bool) -> tuple[Any, dict]:
    """The evaluate section of ``config`` (a whole run config, or just that section) and the
    model to load: a run's demo models and the pivot's template resolved when ``resolve``."""
    from fusechat_core.config import EvaluateConfig, RunConfig
    from fusechat_core.evaluate.loading import run_model_ref

    if "pivot" in config:
        run = RunConfig.model_validate(config)
        return run.evaluate, run_model_ref(run, name, model, st) if resolve else model
    return EvaluateConfig.model_validate(config.get("evaluate", config)), model


@stage_task(name="measure", task_run_name=run_name("measure", "name", label="model"), retries=1,
            retry_delay_seconds=30, cache_policy=StageAddressPolicy(also=("answers",)))
def measure_model(config: dict, name: str, model: dict, address: str, store: str, dataset: str | None = None,
                  answers: str | None = None) -> dict:
    """An evaluation's GPU step: model ``name``'s MT-Bench answers (at ``answers``) and held-out
    measures on ``dataset`` (at ``address``, when the run measures any; else ``address`` is the
    answers'). The judge grades them in the evaluate task, which holds no GPU slot."""
    from fusechat_core.evaluate.stage import MEASURES_FILE
    from fusechat_core.evaluate.stage import measure_model as _measure_model

    started = time.monotonic()
    logger = get_run_logger()
    st = open_store(store)
    measures = None if address == answers else address
    cfg, ref = _evaluate_section(config, name, model, st, resolve=True)
    bars = {"mt_bench": ProgressArtifact(f"Evaluation of {name}: MT-Bench questions answered"),
            "heldout": ProgressArtifact(f"Evaluation of {name}: held-out sequences measured")}
    computed = _measure_model(st, name, ref, cfg, answers_address=answers, measures_address=measures,
                              dataset=dataset, progress=logger.info,
                              on_count=lambda what, done, total: bars[what](done, total))
    figures = {}
    if measures is not None:
        found = st.read_json(measures, MEASURES_FILE)
        figures = {k: found[k]["all"] for k in ("heldout_nll", "exact_match") if k in found}
    return stage_done(st, address, f"Answers and held-out measures of `{name}`", started, computed=computed,
                      figures=figures, model=name, answers=answers)


@stage_task(name="evaluate", task_run_name=run_name("evaluate", "name", label="model"), retries=1,
            retry_delay_seconds=30)
def evaluate_model(config: dict, name: str, model: dict, address: str, store: str,
                   dataset: str | None = None, answers: str | None = None, measures: str | None = None,
                   measured: bool = False) -> dict:
    """Evaluate one model of the run (``model``: ``RunPlan.model_ref(name)``): the judge grades
    its answers, and its results join the held-out measures.

    ``config`` is the run config (or just its ``evaluate`` section); ``answers`` the MT-Bench
    answers address (``RunPlan.mt_bench_answers(name)``), ``measures`` the held-out measures'
    (``RunPlan.heldout_measures(name)``); ``measured``: the GPU step (:func:`measure_model`)
    ran before this one, so nothing here should need the model.
    """
    from fusechat_core.evaluate import evaluate_model as _evaluate_model
    from fusechat_core.plan import earlier_judgments

    started = time.monotonic()
    logger = get_run_logger()
    st = open_store(store)
    computed = not st.is_complete(address)
    cfg, ref = _evaluate_section(config, name, model, st, resolve=computed)
    # from the plan's model reference, as the evaluation's address was (before resolving it)
    earlier = earlier_judgments(name, model, cfg, dataset)
    bars = {"mt_bench": ProgressArtifact(f"Evaluation of {name}: MT-Bench questions answered"),
            "heldout": ProgressArtifact(f"Evaluation of {name}: held-out sequences measured"),
            "judge": ProgressArtifact(f"Evaluation of {name}: MT-Bench questions graded")}
    results = _evaluate_model(st, address, name, ref, cfg, dataset=dataset, answers_address=answers,
                              measures_address=measures, expect_measured=measured,
                              progress=logger.info, on_count=lambda what, done, total: bars[what](done, total),
                              earlier=earlier)
    summary = {k: results[k]["all"] for k in ("heldout_nll", "exact_match") if k in results}
    if "mt_bench" in results:
        mt = results["mt_bench"]
        summary["mt_bench"] = {k: mt[k] for k in ("average", "scored", "unparsable", "failed")}
    return stage_done(st, address, f"Evaluation of `{name}`", started, computed=computed, figures=summary,
                      model=name, summary=summary)


@stage_task(name="report", task_run_name=run_name("report"), retries=1)
def build_run_report(config: dict, evaluations: dict[str, str], address: str, store: str,
                     training: dict[str, str] | None = None, roles: dict | None = None) -> dict:
    """The run's report from its evaluate artifacts; ``training``: target name → train address;
    ``roles``: ``RunPlan.report_roles()``, for the comparison with the CLM baseline."""
    from fusechat_core.evaluate import write_report
    from fusechat_core.evaluate.report import inline_images

    started = time.monotonic()
    cfg_name = config.get("name", "fusechat")
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        markdown = write_report(st, address, f"FuseChat run `{cfg_name}`", evaluations, training,
                                roles=roles)["markdown"]
    else:
        markdown = st.read_bytes(address, "report.md").decode()
    # The dashboard cannot reach the store: the plots go into the markdown itself, as data: URIs.
    markdown = inline_images(markdown, lambda rel: st.read_bytes(address, rel))
    return stage_done(st, address, f"Report of run `{cfg_name}`", started, computed=computed,
                      details=markdown + "\nreport.json and the plots' PNG files are in the store (location above).")
