"""The pipeline as Prefect runs it in production: a real server, a work pool and a worker,
a deployment from prefect.yaml, and the S3 store on SeaweedFS (the run itself:
tests/deployed_run.py, shared with tests/test_preemption.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.deployed_run import cli
from tests.prefect_server import BIN, REPO


def test_setup_then_deploy_all_and_the_repo_dir_is_read_at_run_time(tmp_path, prefect_server, monkeypatch):
    """`fusechat setup` creates every work pool prefect.yaml names, so `prefect deploy --all` works
    right after; the deployments hold no checkout path (FUSECHAT_REPO_DIR is read by the pull step
    when a run starts, so it is not even set here)."""
    import yaml

    server = prefect_server
    env = {**server.client_env(tmp_path / "prefect-home")}
    env.pop("FUSECHAT_REPO_DIR", None)
    setup = cli([str(BIN / "fusechat"), "setup", "--gpu-limit", "2", "--heartbeat-timeout", "60"], env)
    assert setup.returncode == 0, setup.stderr
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    wanted = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert wanted == {"fusechat-local", "fusechat-gpu"}
    pools = {p["name"]: p for p in server.post("/work_pools/filter", {})}
    assert wanted <= set(pools), sorted(pools)
    assert pools["fusechat-gpu"]["type"] == "kubernetes"
    gpu = pools["fusechat-gpu"]["base_job_template"]["job_configuration"]["job_manifest"]
    assert "nvidia.com/gpu" in json.dumps(gpu)

    deploy = cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployments = {d["name"]: d for d in server.post("/deployments/filter", {})}
    assert {d["name"] for d in spec["deployments"]} <= set(deployments)
    for name in (d["name"] for d in spec["deployments"]):
        assert deployments[name]["pull_steps"] == [{"flows.steps.enter_repo_dir": {}}], deployments[name]
        assert str(REPO) not in json.dumps(deployments[name]), name

    # the pull step itself: the variable's value when the run starts, checked
    from flows.steps import enter_repo_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FUSECHAT_REPO_DIR", str(REPO))
    assert enter_repo_dir() == {"directory": str(REPO)} and Path.cwd() == REPO
    monkeypatch.setenv("FUSECHAT_REPO_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"^FUSECHAT_REPO_DIR=.*: no fusechat checkout there"):
        enter_repo_dir()
    monkeypatch.delenv("FUSECHAT_REPO_DIR")
    with pytest.raises(ValueError, match=r"^FUSECHAT_REPO_DIR is not set on this worker"):
        enter_repo_dir()


@pytest.mark.slow
def test_deployment_runs_the_pipeline_on_server_worker_and_s3(tmp_path, s3_env, prefect_server, deployed_run):
    """The run of tests/deployed_run.py: setup, deploy, a process worker, the config and the
    artifacts in S3. It is also test_preemption's uninterrupted run."""
    server, run = prefect_server, deployed_run
    assert "automation" in run.setup_stdout and "fusechat-local" in run.setup_stdout
    flow_run_id = run.flow_run_id
    assert run.state["type"] == "COMPLETED", (run.state, run.worker_log.read_text()[-4000:])
    # the run sent heartbeats every 30 s (prefect.yaml's env job variable; Prefect's own
    # default is 180 s, beyond the crash automation's window)
    flow_run = server.get(f"/flow_runs/{flow_run_id}")
    # named after the run its config holds (`name: tiny`), not the file it was given (run.yaml):
    # two runs' config.yaml were one name on the dashboard
    assert flow_run["name"] == "tiny", flow_run["name"]
    deployment = server.get(f"/deployments/{flow_run['deployment_id']}")
    assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", deployment
    beats = server.events("prefect.flow-run.heartbeat", resource=f"prefect.flow-run.{flow_run_id}")
    assert len(beats) >= 1 + int(flow_run["total_run_time"] // 35), (len(beats), flow_run["total_run_time"])

    # the artifacts exist in the store...
    cfg = load_config(run.config)
    plan = RunPlan(cfg)
    store = ArtifactStore(cfg.store)
    for node in plan.nodes():
        if node.stage != "mt_bench_answers":
            assert store.is_complete(node.address), node.label
    # ...and the dashboard shows the report and the task runs, under their names
    artifacts = server.post("/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert any(a.get("type") == "markdown" and (a.get("key") or "").startswith("report") for a in artifacts)
    tasks = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    names = {t["name"] for t in tasks}
    # every stage, and each run names its instance (the exact format is test_dashboard's)
    stages = {re.match(r"[a-z_]+", name).group() for name in names}
    assert {"demo_model", "dataset", "represent", "align", "train", "merge", "evaluate", "report"} <= stages, names
    assert any(n.startswith("represent") and "pivot" in n for n in names), names
    assert any(n.startswith("train") and "moe" in n for n in names), names
    assert any(n.startswith("merge") and "varm" in n for n in names), names
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)

    # the store's secret never reached the Prefect database (the server's home) or the logs
    secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"].encode()
    for path in [p for home in (run.home, server.home) for p in home.rglob("*")] + [run.worker_log, server.log]:
        if path.is_file():
            assert secret not in path.read_bytes(), path
