"""Preemption on a real Prefect server: SIGTERM to a deployment's flow-run process (what a
process worker, Kubernetes or a drain sends) while a stage is training. The process is gone
within 10 s, not once the stage's futures finish; its children with it; the run is Crashed,
as Prefect's engine marks a terminated run; nothing half-made is committed; a retry finishes.

The long stage is the demo models' pre-training (many steps for the pivot), so the test
needs no upstream stages.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.prefect_server import BIN, REPO, spawn, stop, wait_until
from tests.tiny_config import tiny_run_config

LIMIT_S = 10.0


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _start_run(env: dict[str, str], config: Path) -> str:
    started = _cli([str(BIN / "prefect"), "deployment", "run", "fusechat-pipeline/pipeline",
                    "--param", f"config_path={config}", "--param", "until=demo_models"], env)
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def _final_state(server, flow_run_id: str, timeout: float, log: Path) -> dict:
    def final():
        state = server.get(f"/flow_runs/{flow_run_id}")["state"]
        return state if state["type"] not in ("SCHEDULED", "PENDING", "RUNNING") else None
    return wait_until("the flow run's final state", final, timeout, log=log, interval=1)


@pytest.mark.slow
def test_sigterm_to_a_deployment_run_stops_it_within_10_s_and_a_retry_finishes(tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.setup import setup_server

    server = prefect_server
    env = {**server.client_env(tmp_path / "prefect-home"), "FUSECHAT_REPO_DIR": str(REPO),
           "FUSECHAT_CACHE": str(tmp_path / "cache")}
    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        setup_server(gpu_limit=1, heartbeat_timeout_s=90, work_pool="fusechat-local")

    config = tiny_run_config(tmp_path, f"file://{tmp_path}/store")
    raw = yaml.safe_load(config.read_text())
    raw["demo"]["models"]["pivot"]["steps"] = 150  # the long stage: seconds to minutes of training
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    pivot = RunPlan(cfg).demo_model(cfg.pivot)
    store = ArtifactStore(cfg.store)

    deploy = _cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    log = tmp_path / "worker.log"
    worker = spawn([str(BIN / "prefect"), "worker", "start", "--pool", "fusechat-local", "--limit", "1"], env, log)
    try:
        flow_run_id = _start_run(env, config)

        def engine() -> psutil.Process | None:
            return next((p for p in psutil.Process(worker.pid).children(recursive=True)
                         if "prefect.engine" in " ".join(p.cmdline())), None)

        def pivot_training() -> bool:
            runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
            return any(r["name"].startswith("demo_model[pivot") and (r.get("state") or {}).get("type") == "RUNNING"
                       for r in runs)

        proc = wait_until("the flow-run process", engine, 180, log=log, interval=0.25)
        wait_until("the pivot's pre-training", pivot_training, 300, log=log, interval=0.25)
        time.sleep(1)
        assert not store.is_complete(pivot), "the stage finished before the test could interrupt it"
        children = proc.children(recursive=True)

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs([proc, *children], timeout=LIMIT_S)
        took = time.monotonic() - t0
        print(f"flow-run process gone {took:.1f} s after SIGTERM ({len(children)} children)")
        if alive:  # where it is stuck, when a faulthandler is registered for SIGUSR1
            for p in alive:
                p.send_signal(signal.SIGUSR1)
            time.sleep(3)
        assert not alive, f"still running {LIMIT_S} s after SIGTERM: {alive}\n{log.read_text()[-30000:]}"

        state = _final_state(server, flow_run_id, 60, log)
        assert state["type"] == "CRASHED", state
        # nothing half-made was committed, and the run did not go on writing after it was told to stop
        assert not store.is_complete(pivot)
        assert store.manifest(pivot) is None

        # a retry (a new run of the same deployment and config) finishes the stage
        retry = _start_run(env, config)
        state = _final_state(server, retry, 600, log)
        assert state["type"] == "COMPLETED", (state, log.read_text()[-4000:])
        assert store.is_complete(pivot, verify=True)
    finally:
        stop(worker)  # its process group: the worker and any flow-run process it started
