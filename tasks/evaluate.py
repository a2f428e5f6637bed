"""Evaluation tasks: one model (MT-Bench answers + judge, held-out measures), and the run's report."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fusechat_core.config import EvaluateConfig, RunConfig
from fusechat_core.evaluate import evaluate_model as _evaluate_model
from fusechat_core.evaluate import write_report
from fusechat_core.evaluate.loading import run_model_ref
from fusechat_core.store import ArtifactStore
from tasks._stage import STAGE_TASK_OPTIONS, stage_ref


def _artifact_key(text: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:64]


@task(name="evaluate", task_run_name="evaluate-{name}", retries=1, retry_delay_seconds=30, **STAGE_TASK_OPTIONS)
def evaluate_model(config: dict, name: str, model: dict, address: str, store: str,
                   dataset: str | None = None, answers: str | None = None) -> dict:
    """Evaluate one model of the run (``model``: ``RunPlan.model_ref(name)``).

    ``config`` is the run config (or just its ``evaluate`` section); ``answers`` the
    MT-Bench answers address (``RunPlan.mt_bench_answers(name)``).
    """
    logger = get_run_logger()
    st = ArtifactStore(store)
    if "pivot" in config:  # a whole run config: resolve demo models and the pivot's template
        run = RunConfig.model_validate(config)
        cfg = run.evaluate
        if not st.is_complete(address):
            model = run_model_ref(run, name, model, st)
    else:
        cfg = EvaluateConfig.model_validate(config.get("evaluate", config))
    results = _evaluate_model(st, address, name, model, cfg, dataset=dataset, answers_address=answers,
                              progress=logger.info)
    summary = {k: results[k]["all"] for k in ("heldout_nll", "exact_match") if k in results}
    if "mt_bench" in results:
        mt = results["mt_bench"]
        summary["mt_bench"] = {k: mt[k] for k in ("average", "scored", "unparsable", "failed")}
    return stage_ref(st, address, model=name, summary=summary)


@task(name="report", task_run_name="report", retries=1, **STAGE_TASK_OPTIONS)
def build_run_report(config: dict, evaluations: dict[str, str], address: str, store: str,
                     training: dict[str, str] | None = None) -> dict:
    """The run's report from its evaluate artifacts; ``training``: target name → train address."""
    cfg_name = config.get("name", "fusechat")
    st = ArtifactStore(store)
    if st.is_complete(address):
        markdown = st.read_bytes(address, "report.md").decode()
    else:
        markdown = write_report(st, address, f"FuseChat run `{cfg_name}`", evaluations, training)["markdown"]
    # Plots stay in the store: a Prefect markdown artifact cannot embed local files.
    create_markdown_artifact(markdown + f"\nPlots and report.json: `{st.uri(address)}`\n",
                             key=_artifact_key(f"report-{cfg_name}"),
                             description=f"FuseChat evaluation report for run {cfg_name}")
    return stage_ref(st, address)
