"""The pipeline as Prefect runs it in production: a real server, a work pool and a worker,
a deployment from prefect.yaml, and the S3 store on SeaweedFS."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.test_pipeline_e2e import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_deployment_runs_the_pipeline_on_server_worker_and_s3(tmp_path, s3_env):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    run_id = uuid.uuid4().hex[:8]
    env = {**os.environ, **s3_env.env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FUSECHAT_REPO_DIR": str(REPO),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "FUSECHAT_CACHE": str(tmp_path / "cache")}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    server = _spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, tmp_path / "server.log")
    worker = None
    try:
        deadline = time.time() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "prefect server did not start"
            time.sleep(1)

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

        worker = _spawn([str(BIN / "prefect"), "worker", "start", "--pool", "fusechat-local", "--limit", "1"],
                        env, tmp_path / "worker.log")
        started = _cli([str(BIN / "prefect"), "deployment", "run", "fusechat-pipeline/pipeline",
                        "--param", f"config_path={prefix}/tiny.yaml"], env)
        assert started.returncode == 0, started.stdout + started.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)

        deadline = time.time() + 900
        while True:
            state = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=10).json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, f"flow run still {state['type']}"
            time.sleep(3)
        assert state["type"] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])

        # the artifacts exist in the store...
        cfg = load_config(local_cfg)
        plan = RunPlan(cfg)
        store = ArtifactStore(cfg.store)
        for node in plan.nodes():
            if node.stage != "mt_bench_answers":
                assert store.is_complete(node.address), node.label
        # ...and the dashboard shows the report and the task runs, under their names
        artifacts = httpx.post(f"{api}/artifacts/filter", json={}, timeout=10).json()
        assert any(a.get("type") == "markdown" and (a.get("key") or "").startswith("report") for a in artifacts)
        tasks = httpx.post(f"{api}/task_runs/filter",
                           json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=10).json()
        names = {t["name"] for t in tasks}
        assert {"dataset", "represent-pivot-0", "train-moe", "merge-varm", "report"} <= names, names
        assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)

    # the store's secret never reached the Prefect database or the logs
    secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"].encode()
    for path in list((tmp_path / "prefect-home").rglob("*")) + [tmp_path / "worker.log", tmp_path / "server.log"]:
        if path.is_file():
            assert secret not in path.read_bytes(), path
