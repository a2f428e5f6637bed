"""The pipeline as Prefect runs it in production: a real server, a work pool and a worker,
a deployment from prefect.yaml, and the S3 store on SeaweedFS."""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.prefect_server import BIN, REPO, spawn, stop
from tests.tiny_config import tiny_run_config


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_setup_then_deploy_all_and_the_repo_dir_is_read_at_run_time(tmp_path, prefect_server, monkeypatch):
    """`fusechat setup` creates every work pool prefect.yaml names, so `prefect deploy --all` works
    right after; the deployments hold no checkout path (FUSECHAT_REPO_DIR is read by the pull step
    when a run starts, so it is not even set here)."""
    import yaml

    server = prefect_server
    env = {**server.client_env(tmp_path / "prefect-home")}
    env.pop("FUSECHAT_REPO_DIR", None)
    setup = _cli([str(BIN / "fusechat"), "setup", "--gpu-limit", "2", "--heartbeat-timeout", "60"], env)
    assert setup.returncode == 0, setup.stderr
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    wanted = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert wanted == {"fusechat-local", "fusechat-gpu"}
    pools = {p["name"]: p for p in server.post("/work_pools/filter", {})}
    assert wanted <= set(pools), sorted(pools)
    assert pools["fusechat-gpu"]["type"] == "kubernetes"
    gpu = pools["fusechat-gpu"]["base_job_template"]["job_configuration"]["job_manifest"]
    assert "nvidia.com/gpu" in json.dumps(gpu)

    deploy = _cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
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
def test_deployment_runs_the_pipeline_on_server_worker_and_s3(tmp_path, s3_env, prefect_server):
    server = prefect_server
    run_id = uuid.uuid4().hex[:8]
    env = {**server.client_env(tmp_path / "prefect-home"), **s3_env.env(), "FUSECHAT_REPO_DIR": str(REPO),
           "FUSECHAT_CACHE": str(tmp_path / "cache")}
    # no PREFECT_FLOWS_HEARTBEAT_FREQUENCY here: prefect.yaml's job variables must set it
    worker = None
    try:
        setup = _cli([str(BIN / "fusechat"), "setup", "--gpu-limit", "1", "--heartbeat-timeout", "60"], env)
        assert setup.returncode == 0, setup.stderr
        assert "automation" in setup.stdout and "fusechat-local" in setup.stdout

        # The run's config lives in the store, as a deployment's parameter points to it.
        prefix = f"s3://fusechat-test/deploy-{run_id}"
        local_cfg = tiny_run_config(tmp_path, f"{prefix}/store")
        import fsspec

        with fsspec.open(f"{prefix}/tiny.yaml", "w", client_kwargs={"endpoint_url": s3_env.endpoint}) as fh:
            fh.write(local_cfg.read_text())

        deploy = _cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline"], env)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

        # polling every 2 s, not Prefect's 10: the test waits for the run, not for the worker's poll
        worker = spawn([str(BIN / "prefect"), "worker", "start", "--pool", "fusechat-local", "--limit", "1"],
                       {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, tmp_path / "worker.log")
        started = _cli([str(BIN / "prefect"), "deployment", "run", "fusechat-pipeline/pipeline",
                        "--param", f"config_path={prefix}/tiny.yaml"], env)
        assert started.returncode == 0, started.stdout + started.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)

        deadline = time.time() + 900
        while True:
            state = server.get(f"/flow_runs/{flow_run_id}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, f"flow run still {state['type']}"
            time.sleep(1)
        assert state["type"] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])
        # the run sent heartbeats every 30 s (prefect.yaml's env job variable; Prefect's own
        # default is 180 s, beyond the crash automation's window)
        run = server.get(f"/flow_runs/{flow_run_id}")
        deployment = server.get(f"/deployments/{run['deployment_id']}")
        assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", deployment
        beats = server.events("prefect.flow-run.heartbeat", resource=f"prefect.flow-run.{flow_run_id}")
        assert len(beats) >= 1 + int(run["total_run_time"] // 35), (len(beats), run["total_run_time"])

        # the artifacts exist in the store...
        cfg = load_config(local_cfg)
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
        assert {"dataset", "represent", "align", "train", "merge", "evaluate", "report"} <= stages, names
        assert any(n.startswith("represent") and "pivot" in n for n in names), names
        assert any(n.startswith("train") and "moe" in n for n in names), names
        assert any(n.startswith("merge") and "varm" in n for n in names), names
        assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    finally:
        if worker is not None:
            stop(worker)

    # the store's secret never reached the Prefect database (the server's home) or the logs
    secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"].encode()
    homes = [tmp_path / "prefect-home", server.home]
    for path in [p for home in homes for p in home.rglob("*")] + [tmp_path / "worker.log", server.log]:
        if path.is_file():
            assert secret not in path.read_bytes(), path
