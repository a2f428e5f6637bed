"""What the Prefect dashboard shows of a run, and what a no-op rerun costs.

The tiny pipeline runs once (module fixture) on the ephemeral API; then every task
run's name must say which instance it is, every stage must have posted its markdown
summary under its address's key, and a rerun in a fresh process must be all Cached
without importing torch, transformers or mergekit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from tasks._stage import artifact_key
from tests.conftest import REPO
from tests.test_pipeline_e2e import tiny_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import fusechat_pipeline, task_runner_for

    folder = tmp_path_factory.mktemp("dashboard")
    path = tiny_run_config(folder, f"file://{folder}/store")
    cfg = load_config(path)
    state = fusechat_pipeline.with_options(task_runner=task_runner_for(cfg))(
        config=cfg.model_dump(mode="json"), return_state=True)
    assert state.is_completed(), state
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=runs)
        artifacts = client.read_artifacts(flow_run_filter=runs)
        api_url = str(client.api_url)
    return {"path": path, "plan": RunPlan(cfg), "task_runs": task_runs, "artifacts": artifacts, "api_url": api_url}


def expected_task_run_names(plan: RunPlan) -> list[str]:
    cfg, n = plan.cfg, plan.cfg.represent.shards
    names = [f"demo_model[{m.name}]" for m in plan.demo_specs()] + ["dataset"]
    for m in cfg.models:
        names += [f"represent[model={m.name}, shard={i}/{n}]" for i in range(1, n + 1)] + [f"represent[model={m.name}]"]
    for s in cfg.sources:
        names += [f"vocab_map[source={s.name}]", f"align[source={s.name}]"]
        names += [f"align[source={s.name}, shard={i}/{n}]" for i in range(1, n + 1)]
    names += [f"train[target={t}]" for t in plan.target_names()]
    names += [f"merge[method={m}]" for m in plan.merge_methods()]
    names += [f"evaluate[model={m}]" for m in plan.evaluated_models()] + ["report"]
    return names


def test_every_task_run_says_what_it_is(first_run):
    names = sorted(r.name for r in first_run["task_runs"])
    assert names == sorted(expected_task_run_names(first_run["plan"]))
    assert all(re.fullmatch(r"[a-z_]+(\[[^\]]+\])?", n) for n in names), names


def test_every_stage_posts_a_summary_under_its_address(first_run):
    plan = first_run["plan"]
    summaries = {a.key: a for a in first_run["artifacts"] if a.type == "markdown"}
    nodes = [n for n in plan.nodes() if n.stage != "mt_bench_answers"]
    assert {n.stage for n in nodes} >= {"demo_models", "dataset", "represent", "vocab_map", "align", "train",
                                        "merge", "evaluate", "report"}
    for node in nodes:
        art = summaries.get(artifact_key(node.address))
        assert art is not None, f"{node.label}: no summary artifact"
        assert f"`{node.address}`" in art.data and "| took |" in art.data, node.label
    # the progress artifacts of the long stages are still there
    progress = [a.description or "" for a in first_run["artifacts"] if a.type == "progress"]
    assert any(d.startswith("Representations of") for d in progress)
    assert any(d.startswith("Training target") for d in progress)


RERUN = """
import json, sys
from flows.cli import main
code = main(["run", sys.argv[1], "--json"])
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers", "mergekit") if m in sys.modules)}))
"""


def test_noop_rerun_imports_no_torch(first_run):
    import os

    # the first run's API (already up): the rerun pays no server start-up
    env = {**os.environ, "PREFECT_API_URL": first_run["api_url"]}
    proc = subprocess.run([sys.executable, "-c", RERUN, str(first_run["path"])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    stages, result = json.loads(lines[-2])["stages"], json.loads(lines[-1])
    assert result == {"code": 0, "heavy": []}, proc.stderr[-3000:]
    assert {r["state"] for r in stages.values()} == {"Cached"}
