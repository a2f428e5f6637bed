"""Preemption on a real Prefect server: SIGTERM to a deployment's flow-run process (what a
process worker, Kubernetes or a drain sends) while a stage is training. The process is gone
within 10 s, not once the stage's futures finish; its children with it; the run is Crashed,
as Prefect's engine marks a terminated run; nothing half-made is committed.

Then the same under Prefect's run supervisor (``prefect flow-run execute``, what a Kubernetes
job runs) with ``PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule``: on SIGTERM the
supervisor tells the engine it owns the run's next state, proposes ``AwaitingRetry`` (a
Scheduled state) and stops the engine, which exits without proposing one (Prefect 3.9's
``cli/flow_run.py`` ``execute`` and ``flow_engine.py``'s supervisor-owned intents). The
supervisor and the flow-run process are gone within 10 s, the run is Scheduled, and the
worker picks the same flow run up again: it resumes and runs the whole pipeline, and its
``report.json`` is byte for byte an uninterrupted run's: test_deployment's run of the same
config into S3 (tests/deployed_run.py), made once for both files.

The long stage is the demo models' pre-training (many steps for the pivot), the first stage.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.deployed_run import cli, deploy_and_start_worker, preemption_config
from tests.prefect_server import BIN, REPO, stop, wait_until

LIMIT_S = 10.0


def _start_run(env: dict[str, str], config: Path, *, until: str, reschedule: bool = False) -> str:
    supervised = []
    if reschedule:  # Prefect's supervisor, told to reschedule on SIGTERM (the deployment's env kept)
        job_env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule"}
        supervised = ["--job-variable", f'command="{BIN / "prefect"} flow-run execute"',
                      "--job-variable", f"env={json.dumps(job_env)}"]
    started = cli([str(BIN / "prefect"), "deployment", "run", "fusechat-pipeline/pipeline",
                    "--param", f"config_path={config}", "--param", f"until={until}", *supervised], env)
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)


def _final_state(server, flow_run_id: str, timeout: float, log: Path) -> dict:
    def final():
        state = server.get(f"/flow_runs/{flow_run_id}")["state"]
        return state if state["type"] not in ("SCHEDULED", "PENDING", "RUNNING") else None
    return wait_until("the flow run's final state", final, timeout, log=log, interval=1)


def _sigterm_during_pretraining(server, worker: subprocess.Popen, flow_run_id: str, store: ArtifactStore,
                                pivot: str, log: Path, *, process: str) -> None:
    """Wait for the pivot's pre-training in the run's process (the worker's child whose command
    line holds ``process``), SIGTERM that process, and check that it and every process under it
    are gone within LIMIT_S and that the stage was not committed."""
    def target() -> psutil.Process | None:
        return next((p for p in psutil.Process(worker.pid).children(recursive=True)
                     if process in " ".join(p.cmdline())), None)

    def pivot_training() -> bool:
        runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return any(r["name"].startswith("demo_model[pivot") and (r.get("state") or {}).get("type") == "RUNNING"
                   for r in runs)

    proc = wait_until(f"the process {process!r}", target, 180, log=log, interval=0.25)
    wait_until("the pivot's pre-training", pivot_training, 300, log=log, interval=0.25)
    time.sleep(1)
    assert not store.is_complete(pivot), "the stage finished before the test could interrupt it"
    children = proc.children(recursive=True)

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    gone, alive = psutil.wait_procs([proc, *children], timeout=LIMIT_S)
    took = time.monotonic() - t0
    print(f"{process}: gone {took:.1f} s after SIGTERM ({len(children)} processes under it)")
    if alive:  # where it is stuck, when a faulthandler is registered for SIGUSR1
        for p in alive:
            p.send_signal(signal.SIGUSR1)
        time.sleep(3)
    assert not alive, f"still running {LIMIT_S} s after SIGTERM: {alive}\n{log.read_text()[-30000:]}"
    # nothing half-made was committed, and the run did not go on writing after it was told to stop
    assert not store.is_complete(pivot)
    assert store.manifest(pivot) is None


@pytest.mark.slow
def test_sigterm_to_a_deployment_run_stops_it_within_10_s_and_a_retry_ends_as_an_uninterrupted_run(
        tmp_path, prefect_server, s3_env, deployed_run):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.setup import setup_server

    server = prefect_server
    env = {**server.client_env(tmp_path / "prefect-home"), "FUSECHAT_REPO_DIR": str(REPO),
           "FUSECHAT_CACHE": str(tmp_path / "cache")}
    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        setup_server(gpu_limit=1, heartbeat_timeout_s=90, work_pool="fusechat-local")

    # the deployment test's config (one source: the run goes to the report here once resumed,
    # and once uninterrupted there), in a local store
    config = preemption_config(tmp_path, f"file://{tmp_path}/store")
    cfg = load_config(config)
    pivot = RunPlan(cfg).demo_model(cfg.pivot)
    store = ArtifactStore(cfg.store)

    log = tmp_path / "worker.log"
    worker = deploy_and_start_worker(env, log)
    try:
        # the process worker runs `python -m prefect.engine`: SIGTERM to it, the run is Crashed
        flow_run_id = _start_run(env, config, until="demo_models")
        _sigterm_during_pretraining(server, worker, flow_run_id, store, pivot, log, process="prefect.engine")
        state = _final_state(server, flow_run_id, 60, log)
        assert state["type"] == "CRASHED", state

        # a retry (a new run of the deployment and config, to the end) under Prefect's
        # supervisor, told to reschedule: SIGTERM to the supervisor leaves the run Scheduled
        # (AwaitingRetry) ...
        retry = _start_run(env, config, until="report", reschedule=True)
        _sigterm_during_pretraining(server, worker, retry, store, pivot, log, process="flow-run execute")
        # ... and the worker runs it again, the same flow run: it resumes and finishes
        state = _final_state(server, retry, 600, log)
        assert state["type"] == "COMPLETED", (state, log.read_text()[-4000:])
        history = sorted(server.get(f"/flow_run_states/?flow_run_id={retry}"), key=lambda s: s["timestamp"])
        names = [s["name"] for s in history]
        # the supervisor, not the engine, set the interrupted attempt's next state
        assert "AwaitingRetry" in names and "Crashed" not in names, names
        assert names.index("AwaitingRetry") < len(names) - 1 - names[::-1].index("Running"), names
        assert server.get(f"/flow_runs/{retry}")["run_count"] >= 2
        assert store.is_complete(pivot, verify=True)
    finally:
        stop(worker)  # its process group: the worker and any flow-run process it started

    # What the interrupted and resumed run made equals the uninterrupted run of the same
    # config (the deployment test's, into S3): the pivot, whose pre-training was cut twice,
    # and the report at the end of the chain.
    reference = load_config(deployed_run.config)
    assert deployed_run.state["type"] == "COMPLETED", deployed_run.state
    assert reference.model_dump(exclude={"store"}) == cfg.model_dump(exclude={"store"})
    clean = ArtifactStore(reference.store)
    assert clean.manifest(pivot).digest == store.manifest(pivot).digest
    report = RunPlan(cfg).report()
    assert RunPlan(reference).report() == report
    assert store.is_complete(report, verify=True) and clean.is_complete(report, verify=True)
    assert clean.read_bytes(report, "report.json") == store.read_bytes(report, "report.json")
