"""Evaluation tasks: one model (MT-Bench answers + judge, held-out measures), and the run's report."""

from __future__ import annotations

import time

from prefect import get_run_logger

from tasks._stage import ProgressArtifact, open_store, run_name, stage_done, stage_task


@stage_task(name="evaluate", task_run_name=run_name("evaluate", "name", label="model"), retries=1,
            retry_delay_seconds=30)
def evaluate_model(config: dict, name: str, model: dict, address: str, store: str,
                   dataset: str | None = None, answers: str | None = None) -> dict:
    """Evaluate one model of the run (``model``: ``RunPlan.model_ref(name)``).

    ``config`` is the run config (or just its ``evaluate`` section); ``answers`` the
    MT-Bench answers address (``RunPlan.mt_bench_answers(name)``).
    """
    from fusechat_core.config import EvaluateConfig, RunConfig
    from fusechat_core.evaluate import evaluate_model as _evaluate_model
    from fusechat_core.evaluate.loading import run_model_ref
    from fusechat_core.plan import earlier_judgments

    started = time.monotonic()
    logger = get_run_logger()
    st = open_store(store)
    computed = not st.is_complete(address)
    if "pivot" in config:  # a whole run config: resolve demo models and the pivot's template
        run = RunConfig.model_validate(config)
        cfg = run.evaluate
        # from the plan's model reference, as the evaluation's address was (before resolving it)
        earlier = earlier_judgments(name, model, cfg, dataset)
        if computed:
            model = run_model_ref(run, name, model, st)
    else:
        cfg = EvaluateConfig.model_validate(config.get("evaluate", config))
        earlier = earlier_judgments(name, model, cfg, dataset)
    bars = {"mt_bench": ProgressArtifact(f"Evaluation of {name}: MT-Bench questions answered"),
            "heldout": ProgressArtifact(f"Evaluation of {name}: held-out sequences measured"),
            "judge": ProgressArtifact(f"Evaluation of {name}: MT-Bench questions graded")}
    results = _evaluate_model(st, address, name, model, cfg, dataset=dataset, answers_address=answers,
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
