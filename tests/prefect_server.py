"""A real Prefect API for tests: `prefect server start` on 127.0.0.1, one per test session.

Tests take the session fixture ``prefect_server`` (conftest.py); they all share the one server.
Under xdist the controller starts it before the workers exist and every worker uses it (and
points ``PREFECT_API_URL`` at it, so no in-process run starts an ephemeral API of its own);
without xdist the fixture starts it on first use. It is stopped at the end of the session. Tests
that change server-wide objects (automations, work pools, concurrency limits) set them up
themselves and leave them as a production server has them; under xdist they run one after
another on one worker (conftest.py).

The server's environment never holds the store's credentials (as in production, where only the
workers have them), and its settings are the ones ``deployments/README.md`` lists for crash
detection, with the proactive trigger and event persister cadences shortened to one second so a
test waits for the behaviour, not for the polling.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SERVER_SETTINGS = {
    # the triggers service evaluates automations and runs their actions (on by default; crash detection needs it)
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true",
    # how often proactive triggers (an expected event that did not come) are evaluated; default 5 s
    "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
    # how soon received events are readable through the API; default 5 s
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
_NOT_FOR_THE_SERVER = ("AWS_", "FUSECHAT_S3_", "PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_")


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a process in its own session (so stop() reaches its children), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process's session, SIGKILL it after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


class PrefectServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.home = workdir / "prefect-home"
        self.log = workdir / "server.log"
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def attach(cls, api: str, workdir: Path) -> PrefectServer:
        """A handle on a server another process started (the xdist controller): it only waits."""
        server = cls(workdir)
        server.api, server.port = api, urlsplit(api).port
        server.log = Path(os.environ.get("FUSECHAT_TEST_PREFECT_LOG", server.log))
        return server

    def launch(self) -> PrefectServer:
        """Start the server and return at once (``wait()`` for it to answer)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_THE_SERVER)}
        env.update(SERVER_SETTINGS, PREFECT_HOME=str(self.home))
        self.proc = spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(self.port)], env, self.log)
        return self

    def wait(self, timeout: float = 180) -> PrefectServer:
        deadline = time.time() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return self
            if (self.proc is not None and self.proc.poll() is not None) or time.time() > deadline:
                self.stop()
                log = self.log.read_text()[-3000:] if self.log.exists() else "(no log)"
                raise RuntimeError(f"prefect server at {self.api} did not start:\n{log}")
            time.sleep(0.5)

    def start(self, timeout: float = 180) -> PrefectServer:
        return self.launch().wait(timeout)

    def stop(self) -> None:
        """Stop the server this handle started (an attached one is its starter's to stop)."""
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc)

    def client_env(self, home: Path) -> dict[str, str]:
        """The environment of a process that talks to this server, with its own PREFECT_HOME."""
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api}
        env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
        return env

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.api}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> Any:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def events(self, name: str, *, resource: str | None = None, related: str | None = None) -> list[dict]:
        """Events named ``name`` (optionally about ``resource``, or with ``related`` among their related)."""
        flt: dict[str, Any] = {"event": {"name": [name]}}
        if resource:
            flt["resource"] = {"id": [resource]}
        if related:
            flt["related"] = {"id": [related]}
        return self.post("/events/filter", {"filter": flt, "limit": 50})["events"]


def wait_until(what: str, check, timeout: float, *, interval: float = 0.5, log: Path | None = None):
    """``check()``'s first truthy value, polled every ``interval`` s; after ``timeout`` s an
    AssertionError naming ``what``, with the end of ``log`` (a worker's or run's output)."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()[-4000:]}" if log else ""))
        time.sleep(interval)


def latest_flow_run(client, name: str):
    """The most recent flow run named ``name``: a test's own run, on a server other tests share
    (their runs must have other names)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                 sort=FlowRunSort.START_TIME_DESC, limit=1)
    assert runs, f"no flow run named {name!r}"
    return runs[0]


def final_task_runs(client, flow_run_id, timeout: float = 90, expected: int | None = None) -> list:
    """The flow run's task runs once they have all reached the API with a final state.

    Task runs and their states reach the API as events, after the flow itself returns: read at
    once, a run may miss task runs, or list one with no state yet or still Running. So: all
    final, and ``expected`` of them, or (not knowing how many) the same runs on three polls
    in a row.
    """
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    seen: list = []

    def settled():
        tasks = client.read_task_runs(flow_run_filter=runs, limit=200)
        final = bool(tasks) and all(t.state is not None and t.state.is_final() for t in tasks)
        key = sorted((str(t.id), t.state.name if t.state else "") for t in tasks)
        seen.append(key if final else None)
        if expected is not None:
            return tasks if final and len(tasks) == expected else None
        return tasks if len(seen) >= 3 and seen[-1] is not None and seen[-1] == seen[-2] == seen[-3] else None

    return wait_until(f"final states of flow run {flow_run_id}'s task runs", settled, timeout, interval=1)
