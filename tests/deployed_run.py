"""One run of the pipeline as Prefect runs it in production, shared by two test files.

A real server, ``fusechat setup``, a deployment from prefect.yaml, a process worker, the S3
store on SeaweedFS, the run's config itself in the store (as a deployment's parameter points
to it). ``tests/test_deployment.py`` checks what that run did; ``tests/test_preemption.py``
uses it as the uninterrupted run that its SIGTERMed and resumed run must equal, byte for byte
(both files change server-wide Prefect objects, so conftest.py schedules them on one xdist
worker, one after the other: the run is made once per session).

The config (``preemption_config``): one source, the Mixtral-style one (plus the CLM baseline),
and a pivot pre-trained for long enough to be interrupted.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import yaml

from fusechat_core.store import s3_storage_options
from tests.prefect_server import BIN, REPO, spawn, stop
from tests.tiny_config import tiny_run_config


def cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def preemption_config(folder: Path, store: str) -> Path:
    """The tiny run with one source (the Mixtral one; the CLM baseline too) and a pivot whose
    pre-training (the first stage) lasts seconds to minutes: long enough to SIGTERM it."""
    config = tiny_run_config(folder, store)
    raw = yaml.safe_load(config.read_text())
    raw["demo"]["models"]["pivot"]["steps"] = 150
    raw["sources"] = [s for s in raw["sources"] if s["name"] == "moe"]
    raw["demo"]["models"].pop("deep")
    config.write_text(yaml.safe_dump(raw))
    return config


def deploy_and_start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    """``prefect deploy`` of prefect.yaml's ``pipeline``, then a process worker on its pool."""
    deploy = cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "pipeline"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    # polling every 2 s, not Prefect's 10: the test waits for the run, not for the worker's poll
    return spawn([str(BIN / "prefect"), "worker", "start", "--pool", "fusechat-local", "--limit", "1"],
                 {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, log)


@dataclass
class DeployedRun:
    flow_run_id: str
    state: dict  # the flow run's final state, as the server reports it
    config: Path  # a local copy of the config the deployment ran (its store: the S3 prefix)
    setup_stdout: str
    home: Path  # the PREFECT_HOME of the CLI calls and the worker
    worker_log: Path


def run_deployment(folder: Path, server, s3) -> DeployedRun:
    """``fusechat setup``, ``prefect deploy``, a worker, ``prefect deployment run`` of
    ``preemption_config`` in ``s3``'s bucket; waits for the run's final state (15 min at most)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**server.client_env(folder / "prefect-home"), **s3.env(), "FUSECHAT_REPO_DIR": str(REPO),
           "FUSECHAT_CACHE": str(folder / "cache")}
    # no PREFECT_FLOWS_HEARTBEAT_FREQUENCY here: prefect.yaml's job variables must set it
    setup = cli([str(BIN / "fusechat"), "setup", "--gpu-limit", "1", "--heartbeat-timeout", "60"], env)
    assert setup.returncode == 0, setup.stderr

    prefix = f"s3://fusechat-test/deploy-{uuid.uuid4().hex[:8]}"
    local_cfg = preemption_config(folder, f"{prefix}/store")
    # written as a user would: credentials and endpoint from the environment, through the
    # store's own s3fs options (the worker reads the file the same way)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        fs = fsspec.filesystem("s3", **s3_storage_options(), skip_instance_cache=True)
        fs.pipe_file(f"{prefix}/run.yaml", local_cfg.read_bytes())  # named unlike the run it holds

    log = folder / "worker.log"
    worker = deploy_and_start_worker(env, log)
    try:
        started = cli([str(BIN / "prefect"), "deployment", "run", "fusechat-pipeline/pipeline",
                       "--param", f"config_path={prefix}/run.yaml"], env)
        assert started.returncode == 0, started.stdout + started.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        deadline = time.time() + 900
        while True:
            state = server.get(f"/flow_runs/{flow_run_id}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, f"flow run still {state['type']}"
            time.sleep(1)
    finally:
        stop(worker)
    return DeployedRun(flow_run_id, state, local_cfg, setup.stdout, folder / "prefect-home", log)
