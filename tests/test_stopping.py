"""A task's own stop (``stopping.scope``), as a Dask worker of a cluster the run did not
start uses it: it stops that task and the processes it registered, and nothing else in the
process: not another task, not the next one, not the process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest

from fusechat_core import stopping

# a child that starts a grandchild and waits: a launcher and the process it launched
_LAUNCHER = ("import subprocess, sys, time; "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")


def _wait_for_grandchild(proc: subprocess.Popen) -> psutil.Process:
    deadline = time.monotonic() + 30
    while not (kids := psutil.Process(proc.pid).children()):
        assert time.monotonic() < deadline, "the launcher started nothing"
        time.sleep(0.05)
    return kids[0]


def test_a_scope_stops_its_task_and_its_processes_and_nothing_else():
    stopped_elsewhere = threading.Event()
    other_saw: list[bool] = []

    def other_task() -> None:  # another task of the same process, in a scope of its own
        with stopping.scope():
            stopped_elsewhere.wait(10)
            other_saw.append(stopping.stopping())
            stopping.check()

    other = threading.Thread(target=other_task)
    other.start()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with stopping.scope() as sc:
            launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER])
            with stopping.owned(launcher):
                grandchild = _wait_for_grandchild(launcher)
                stopping.check()  # not stopped yet
                # the stop comes from another thread (the one watching for the run's stop)
                threading.Thread(target=sc.stop, args=("its flow run stopped",)).start()
                gone, alive = psutil.wait_procs([psutil.Process(launcher.pid), grandchild], timeout=5)
                assert not alive, alive
                assert stopping.stopping()
                with pytest.raises(stopping.Stopped, match="its flow run stopped"):
                    stopping.check()
            launcher.wait()
        # outside the scope: the process was never stopped
        assert not stopping.stopping()
        stopping.check()
        stopped_elsewhere.set()
        other.join(10)
        assert other_saw == [False]
        assert bystander.poll() is None, "a process the scope did not own was terminated"
        with stopping.scope():  # the next task starts unstopped
            stopping.check()
    finally:
        stopped_elsewhere.set()
        bystander.kill()
        bystander.wait()


def test_a_process_registered_after_the_stop_is_terminated_at_once():
    with stopping.scope() as sc:
        sc.stop("stopped before the launch returned")
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        child = psutil.Process(proc.pid)
        with stopping.owned(proc):
            gone, alive = psutil.wait_procs([child], timeout=5)  # (the stop reaped it: Popen cannot tell)
            assert gone and not alive
        with pytest.raises(stopping.Stopped):
            stopping.check()


def test_a_process_wide_stop_is_seen_inside_every_scope(monkeypatch):
    # (a process-wide stop terminates the process's children: here, the test session's servers)
    monkeypatch.setattr(stopping, "terminate_children", lambda grace=5.0: None)
    try:
        with stopping.scope():
            stopping.request_stop("SIGTERM", grace=0.1)
            with pytest.raises(stopping.Stopped, match="SIGTERM"):
                stopping.check()
    finally:
        stopping.reset()
    stopping.check()
