"""How a run fails: deterministic errors once, with one line; Ctrl-C one line and exit 130;
``kill -9`` leaves no process of the run's tree behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


# -- which failures are retried ------------------------------------------------------

def test_transient_failures_are_told_from_deterministic_ones():
    import botocore.exceptions as boto
    import httpx

    from fusechat_core.config import ConfigError
    from fusechat_core.data import DataError
    from fusechat_core.errors import is_transient
    from fusechat_core.evaluate import JudgeError

    def client_error(code: str, status: int) -> Exception:
        return boto.ClientError({"Error": {"Code": code, "Message": "x"},
                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def status_error(status: int) -> Exception:
        request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))

    def raised_from(cause: Exception) -> Exception:  # how s3fs wraps botocore's errors
        try:
            try:
                raise cause
            except Exception as exc:
                raise OSError(5, "s3 said no") from exc
        except OSError as wrapped:
            return wrapped

    transient = [ConnectionResetError(), ConnectionRefusedError(), TimeoutError(), httpx.ConnectError("refused"),
                 httpx.ReadTimeout("slow"), status_error(429), status_error(503), client_error("SlowDown", 503),
                 raised_from(client_error("InternalError", 500)), boto.EndpointConnectionError(endpoint_url="http://x"),
                 JudgeError("judge: HTTP 429 after 7 attempts", transient=True)]
    deterministic = [DataError("a.json: not valid JSON (line 1)"), ConfigError("x: bad"), ValueError("bad"),
                     KeyError("k"), FileNotFoundError("gone"), RuntimeError("NaN"), status_error(401),
                     status_error(404), client_error("AccessDenied", 403), raised_from(client_error("NoSuchKey", 404)),
                     JudgeError("judge: HTTP 401: bad key")]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in deterministic] == [False] * len(deterministic)


def test_every_stage_task_retries_only_transient_failures():
    from prefect.states import Failed

    import tasks.align
    import tasks.dataset
    import tasks.demo
    import tasks.evaluate
    import tasks.merge
    import tasks.represent
    import tasks.train
    from fusechat_core.data import DataError
    from tasks._stage import retry_transient

    stage_tasks = [t for mod in (tasks.align, tasks.dataset, tasks.demo, tasks.evaluate, tasks.merge, tasks.represent,
                                 tasks.train) for t in vars(mod).values() if hasattr(t, "retry_condition_fn")]
    assert len(stage_tasks) >= 10
    for t in stage_tasks:
        assert t.retry_condition_fn is retry_transient, t.name
    assert retry_transient(None, None, Failed(data=ConnectionResetError())) is True
    assert retry_transient(None, None, Failed(data=DataError("bad file"))) is False


# -- the CLI, in its own process -----------------------------------------------------

def _config(folder: Path, data_text: str) -> Path:
    data = folder / "chat.json"
    data.write_text(data_text)
    cfg = {"name": "errors", "store": f"file://{folder}/store", "seed": 1,
           # hub ids never downloaded: the dataset stage needs only tokenizers
           "pivot": {"name": "pivot", "path": "example/pivot-model", "tokenizer": "builtin:mistral-v1"},
           "sources": [{"name": "src", "path": "example/source-model", "tokenizer": "builtin:mistral-v3"}],
           "data": {"sources": [{"name": "chat", "path": str(data), "format": "sharegpt"}], "max_length": 64}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``fusechat run``; without ``env``, as a user without a server runs it: on an ephemeral API."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg), *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _ephemeral_api(proc: subprocess.Popen, timeout: float = 120) -> list[psutil.Process]:
    """Wait until the run has started its ephemeral API; the run's tree of processes then."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(proc.pid)
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(psutil.Error):
            tree = parent.children(recursive=True)
            if any("flows.ephemeral" in " ".join(p.cmdline()) for p in tree):
                return tree
        time.sleep(0.05)
    raise AssertionError("the run never started its ephemeral API")


def _gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _fusechat_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fusechat:")]


def test_a_data_error_fails_once_with_one_line(tmp_path, prefect_server):
    cfg = _config(tmp_path, '[{"conversations": [}\n')  # not JSON at all: no row can be read
    # on the session's server: this run needs no API of its own (the next two test that one)
    proc = _start(cfg, "--until", "dataset", env=prefect_server.client_env(tmp_path / "prefect-home"))
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert _fusechat_lines(err) == [f"fusechat: run failed: data source chat: {tmp_path / 'chat.json'}: "
                                    "not valid JSON (line 1)"], err
    # no traceback on the console, and no retry: Prefect logs "Retry 1/2 will start ..." for each one
    assert "Traceback" not in err and "Retry" not in err, err
    assert "Flow run encountered an exception: DataError" in err, err  # the flow did run, and fail


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    good = [{"conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]}
            for i in range(5)]
    proc = _start(_config(tmp_path, json.dumps(good)))
    try:
        tree = _ephemeral_api(proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert _fusechat_lines(err) == ["fusechat: interrupted (SIGINT); finished stages, shards and checkpoints are "
                                    "kept: run again to resume"], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert _gone(tree, 30) == []


def test_kill_9_leaves_no_process_of_the_run_behind(tmp_path):
    """Killed once the ephemeral API answers and the flow has begun: the API notices its
    parent is gone and stops (Prefect would otherwise leave it serving forever)."""
    good = [{"conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]}
            for i in range(5)]
    proc = _start(_config(tmp_path, json.dumps(good)))
    try:
        _ephemeral_api(proc)
        deadline = time.monotonic() + 240
        while "Beginning flow run" not in _peek(proc) and time.monotonic() < deadline:
            assert proc.poll() is None, _peek(proc)
            time.sleep(0.2)
        tree = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert any("flows.ephemeral" in " ".join(p.cmdline()) for p in tree)
    left = _gone(tree, 30)
    assert left == [], [p.cmdline() for p in left]


def test_the_api_of_a_parent_already_gone_does_not_start():
    # The parent may die between spawning the API and the API's watch starting.
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.ephemeral", "1", "--factory", "nowhere:app"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "uvicorn" not in proc.stderr.lower(), proc.stderr
    assert time.monotonic() - t0 < 30


def _peek(proc: subprocess.Popen) -> str:
    """What the run wrote to stderr so far (non-blocking)."""
    import select

    buf = getattr(proc, "_peeked", "")
    while select.select([proc.stderr], [], [], 0)[0]:
        chunk = os.read(proc.stderr.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        buf += chunk
    proc._peeked = buf  # type: ignore[attr-defined]
    return buf


_ANOTHER_LIVE_RUN = r'''
import sys, time
from prefect.settings import PREFECT_HOME, temporary_settings
import tasks._stage as stage
with temporary_settings(updates={PREFECT_HOME: sys.argv[1]}):
    stage._no_other_live_run()
    print("holding", flush=True)
    end = time.time() + float(sys.argv[2])
    while time.time() < end:  # a process starting run after run: it probes again and again
        stage._no_other_live_run()
    time.sleep(600)
'''


def test_gpu_slots_are_freed_as_dead_only_when_no_other_run_on_this_machine_is_alive(tmp_path, monkeypatch):
    """Without a server, runs on one machine share the local API's database; a run freeing
    'dead' GPU slots at its start must not free a live run's. A live run holds a lock for its
    lifetime, which goes with its process, SIGKILL included. Both runs probing at once (the
    other in a loop) never see each other gone: a shared lock turned exclusive to probe was
    dropped first, and a fifth of the probes here then read a live run as gone."""
    from prefect.settings import PREFECT_HOME, temporary_settings

    import tasks._stage as stage

    monkeypatch.setattr(stage, "_LIVE_RUNS_LOCK", None)
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}):
        assert stage._no_other_live_run()  # the first run here
        other = subprocess.Popen([sys.executable, "-c", _ANOTHER_LIVE_RUN, str(tmp_path), "3"],
                                 stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
        try:
            assert other.stdout.readline().strip() == "holding"
            end, probes = time.time() + 2, 0
            while time.time() < end:
                assert not stage._no_other_live_run(), f"a live run read as gone after {probes} probes"
                probes += 1
        finally:
            other.kill()  # as a preempted node: no clean-up
            other.wait()
        assert stage._no_other_live_run()
        assert [p.name for p in (tmp_path / "fusechat-live-runs").iterdir()] == [stage._LIVE_RUNS_LOCK[1].name]
    stage._LIVE_RUNS_LOCK[0].close()


def test_a_run_leaves_the_servers_gpu_limit_as_it_is(prefect_server, caplog):
    """One team's run with gpu_concurrency 1 must not shrink the GPU pool every run on the
    server shares (`fusechat setup --gpu-limit 8`); a tag without a limit gets the run's."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks._stage import ensure_gpu_limit

    shared, fresh = f"gpu-{uuid.uuid4().hex[:8]}", f"gpu-{uuid.uuid4().hex[:8]}"
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api}), get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=shared, concurrency_limit=8)
        with caplog.at_level("WARNING", logger="fusechat"):
            assert ensure_gpu_limit(shared, 1) == [shared]
            ensure_gpu_limit(fresh, 2)
        assert client.read_concurrency_limit_by_tag(shared).concurrency_limit == 8
        assert client.read_concurrency_limit_by_tag(fresh).concurrency_limit == 2
        for tag in (shared, fresh):
            client.delete_concurrency_limit_by_tag(tag)
    assert [r.getMessage() for r in caplog.records if r.name == "fusechat"] == [
        f"the server limits tag {shared!r} to 8 task runs at once; runner.gpu_concurrency 1 is not applied "
        "(the limit is the server's, shared by its runs: fusechat setup --gpu-limit changes it)"]
