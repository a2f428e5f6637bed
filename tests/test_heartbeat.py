"""Crash detection on a real Prefect server: a flow run whose process is SIGKILLed (a preempted node)
stops sending heartbeats, and the automation `fusechat setup` creates marks it Crashed; a run that
finishes after its heartbeat is left alone.

The automation's window is Prefect's least (10 s) so the test waits seconds, not the 90 s a cluster
uses; heartbeats cannot come faster than every 30 s, so only the first heartbeat of a run counts here.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from flows.setup import MIN_HEARTBEAT_TIMEOUT_S, ZOMBIE_AUTOMATION, setup_server
from tests.prefect_server import PrefectServer, spawn, stop, wait_until

# Two flow runs in one process: `quick` finishes right after its first heartbeat, `silent` sleeps
# until it is killed. Each prints its flow run id.
FLOWS = '''
import time
from prefect import flow
from prefect.runtime import flow_run

@flow(name="fusechat-pipeline")
def quick():
    print("quick", flow_run.id, flush=True)
    time.sleep(1)  # its first heartbeat goes out before it finishes

@flow(name="fusechat-pipeline")
def silent():
    print("silent", flow_run.id, flush=True)
    time.sleep(600)

quick()
silent()
'''


def _sleeper(flow_name: str, label: str) -> str:
    """A script whose one flow run prints ``label`` and its id, then sleeps until killed."""
    return f'''
import time
from prefect import flow
from prefect.runtime import flow_run

@flow(name="{flow_name}")
def {label}():
    print("{label}", flow_run.id, flush=True)
    time.sleep(600)

{label}()
'''


# A run the worker rescheduled on SIGTERM (AwaitingRetry) before its node went away: it waits for
# a new pod and must not be marked Crashed meanwhile. The test moves it to AwaitingRetry itself.
PARKED = _sleeper("fusechat-pipeline", "parked")
# Another team's flow on the same server, silent as long after its heartbeat: not ours to crash.
OTHER = _sleeper("someone-elses-flow", "other")


def _apply_setup(server: PrefectServer, **kwargs) -> list[str]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        return setup_server(work_pool=None, **kwargs)


def _delete_automation(server: PrefectServer) -> None:
    from prefect.automations import Automation
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api}):
        Automation.read(name=ZOMBIE_AUTOMATION).delete()


@pytest.mark.slow
def test_a_killed_flow_run_is_marked_crashed_when_its_heartbeats_stop(tmp_path, prefect_server):
    server = prefect_server
    timeout_s = MIN_HEARTBEAT_TIMEOUT_S
    done = _apply_setup(server, heartbeat_timeout_s=timeout_s)
    assert any("automation" in line for line in done), done

    script = tmp_path / "flows.py"
    script.write_text(FLOWS)
    (tmp_path / "parked.py").write_text(PARKED)
    (tmp_path / "other.py").write_text(OTHER)
    log, parked_log, other_log = tmp_path / "flows.log", tmp_path / "parked.log", tmp_path / "other.log"
    env = {**server.client_env(tmp_path / "prefect-home"), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    proc = spawn([sys.executable, str(script)], env, log)
    parked_proc = spawn([sys.executable, str(tmp_path / "parked.py")], env, parked_log)
    other_proc = spawn([sys.executable, str(tmp_path / "other.py")], env, other_log)
    try:
        other_id = wait_until("the other team's flow run to start", lambda: (re.findall(
            r"^other ([0-9a-f-]{36})$", other_log.read_text(), re.M) or [None])[0], 90, log=other_log)
        other = f"prefect.flow-run.{other_id}"
        wait_until("the other run's first heartbeat",
                   lambda: server.events("prefect.flow-run.heartbeat", resource=other), 30, log=other_log)
        os.killpg(other_proc.pid, signal.SIGKILL)
        other_proc.wait(10)
        parked_id = wait_until("the parked flow run to start", lambda: (re.findall(
            r"^parked ([0-9a-f-]{36})$", parked_log.read_text(), re.M) or [None])[0], 90, log=parked_log)
        parked = f"prefect.flow-run.{parked_id}"
        wait_until("the parked run's first heartbeat",
                   lambda: server.events("prefect.flow-run.heartbeat", resource=parked), 30, log=parked_log)
        # rescheduled on SIGTERM, then its node gone
        server.post(f"/flow_runs/{parked_id}/set_state",
                    {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
        os.killpg(parked_proc.pid, signal.SIGKILL)
        parked_proc.wait(10)
        ids = wait_until("the silent flow run to start", lambda: _flow_run_ids(log), 90, log=log)
        silent = f"prefect.flow-run.{ids['silent']}"
        heartbeat = wait_until("the silent run's first heartbeat",
                               lambda: server.events("prefect.flow-run.heartbeat", resource=silent), 30, log=log)[0]
        assert server.get(f"/flow_runs/{ids['silent']}")["state"]["type"] == "RUNNING"
        assert server.get(f"/flow_runs/{ids['quick']}")["state"]["type"] == "COMPLETED"
        assert server.events("prefect.flow-run.heartbeat", resource=f"prefect.flow-run.{ids['quick']}")
        # the node dies: no final state, no more heartbeats
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = time.time()

        def left_running():
            state = server.get(f"/flow_runs/{ids['silent']}")["state"]
            return state if state["type"] != "RUNNING" else None

        state = wait_until("the automation to mark the run Crashed", left_running, timeout_s + 45, log=log)
        print(f"Crashed {time.time() - killed_at:.1f} s after the kill")
        assert (state["type"], state["name"]) == ("CRASHED", "Crashed"), state
        assert state["message"].startswith(f"No heartbeat for {timeout_s} s"), state
        # it waited the automation's window after the last heartbeat
        silent_for = (_when(state["timestamp"]) - _when(heartbeat["occurred"])).total_seconds()
        assert silent_for >= timeout_s, (state, heartbeat)
        # the automation did it, and did nothing to the run that finished
        executed = wait_until("the automation's action event",
                              lambda: server.events("prefect.automation.action.executed", related=silent), 15)
        assert {e["resource"]["prefect.resource.name"] for e in executed} == {ZOMBIE_AUTOMATION}
        assert not server.events("prefect.automation.action.triggered", related=f"prefect.flow-run.{ids['quick']}")
        assert server.get(f"/flow_runs/{ids['quick']}")["state"]["type"] == "COMPLETED"
        # the parked run, silent as long (its heartbeat came first), still waits for its new pod
        assert not server.events("prefect.automation.action.triggered", related=parked)
        state = server.get(f"/flow_runs/{parked_id}")["state"]
        assert (state["type"], state["name"]) == ("SCHEDULED", "AwaitingRetry"), state
        # another flow's run, killed before ours: left as it is
        assert not server.events("prefect.automation.action.triggered", related=other)
        assert server.get(f"/flow_runs/{other_id}")["state"]["type"] == "RUNNING"
    finally:
        for p in (proc, parked_proc, other_proc):
            if p.poll() is None:
                stop(p)
        _delete_automation(server)


def _flow_run_ids(log: Path) -> dict[str, str] | None:
    ids = dict(re.findall(r"^(quick|silent) ([0-9a-f-]{36})$", log.read_text(), re.M))
    return ids if "silent" in ids else None


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def test_setup_refuses_a_timeout_prefect_cannot_watch_and_warns_below_two_heartbeats(prefect_server, tmp_path):
    import subprocess

    env = {**os.environ, **prefect_server.client_env(tmp_path / "home"), "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}

    def setup(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "setup", "--work-pool", "", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])

    low = setup("--heartbeat-timeout", str(MIN_HEARTBEAT_TIMEOUT_S - 1))
    assert low.returncode == 2 and f"--heartbeat-timeout >= {MIN_HEARTBEAT_TIMEOUT_S}" in low.stderr, low.stderr
    short = setup("--heartbeat-timeout", "45")
    assert short.returncode == 0, short.stderr
    assert "warning: --heartbeat-timeout 45 s is under two heartbeat periods (30 s)" in short.stderr
    # run again as after an upgrade, nothing given: the server's settings stay (they went back to
    # 1 GPU slot and 90 s, so a cluster's 8 GPUs took turns one task at a time)
    assert setup("--gpu-limit", "8", "--gpu-tag", "gpu-setup-test").returncode == 0
    again = setup("--gpu-tag", "gpu-setup-test")
    assert again.returncode == 0, again.stderr
    assert "tag 'gpu-setup-test' at most 8 task runs (kept; --gpu-limit changes it)" in again.stdout
    assert "Crashed after 45 s without a heartbeat (kept; --heartbeat-timeout changes it)" in again.stdout
    restored = setup("--heartbeat-timeout", "90", "--gpu-tag", "gpu-setup-test", "--gpu-limit", "2")
    assert "tag 'gpu-setup-test' at most 2 task runs (was 8)" in restored.stdout
    assert "Crashed after 90 s without a heartbeat\n" in restored.stdout  # as a production server has it
