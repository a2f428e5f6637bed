"""The same address gives the same bytes under the thread runner and on a Dask cluster.

A local Dask cluster runs each task in a worker process started with ``OMP_NUM_THREADS=1``
(distributed's ``pre-spawn-environ``); the thread runner computes in the flow's process,
with torch's default of a thread per core. Stages pin their own compute
(``fusechat_core.determinism``), so every artifact, from the demo models' pre-training to
the trained targets, must be byte for byte the same (SPEC §3).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.cli import main
from flows.pipeline import flow_run_name
from fusechat_core.config import load_config, parse_config
from fusechat_core.plan import RunPlan
from fusechat_core.stages import shard_address
from fusechat_core.store import MANIFEST, ArtifactStore
from fusechat_core.train import complete_checkpoints
from tests.prefect_server import final_task_runs, latest_flow_run
from tests.tiny_config import tiny_run_config

pytest.importorskip("prefect_dask")

REPO = Path(__file__).resolve().parents[1]
UNTIL = "train"
LIMIT_S = 10.0
COMPARED = ("demo_models", "dataset", "represent", "vocab_map", "align", "train")


def _digests(path) -> dict[str, str]:
    """Every artifact of the run up to training (shards one by one): its manifest's digest,
    which covers the files' bytes only (not the verified marker, not the lease)."""
    cfg = load_config(path)
    store = ArtifactStore(cfg.store)
    out = {}
    for node in RunPlan(cfg).nodes():
        if node.stage not in COMPARED:
            continue
        addresses = [shard_address(node.address, i, node.shards) for i in range(node.shards)] or [node.address]
        for address in addresses:
            man = store.manifest(address)
            assert man is not None and store.is_complete(address), f"{node.label}: {address} not committed"
            out[address] = man.digest
    return out


@pytest.mark.slow
def test_dask_cluster_and_threads_write_identical_artifacts(tmp_path, capsys, prefect_server):
    raw = yaml.safe_load(tiny_run_config(tmp_path, "file://unused", name="tiny-dask", gpu_tag=True).read_text())
    # one source: the Mixtral one and the CLM baseline give a fusion target and a plain one,
    # through the same kernels the Llama source runs; its chain under two runners is ~45 s more
    raw["sources"] = [s for s in raw["sources"] if s["name"] == "moe"]
    raw["demo"]["models"].pop("deep")
    paths = {}
    for name, runner in (("threads", {"task_runner": "threads", "max_workers": 2}),
                         # one worker process: a process of its own is what differs from threads,
                         # and each worker is an interpreter start with torch
                         ("dask", {"task_runner": "dask", "max_workers": 1})):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**raw, "store": f"file://{tmp_path}/{name}",
                                               "runner": {**raw["runner"], **runner}}))
    threads, dask = paths["threads"], paths["dask"]

    results = {}
    for name, path in (("threads", threads), ("dask", dask)):
        # the thread runner computes in this process: with torch's default of a thread per core
        # (at least two), not the one an xdist worker's session sets, or there would be no
        # difference for the stages' pinning to remove
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(2, os.cpu_count() or 2) if name == "threads" else before)
        try:
            assert main(["run", str(path), "--until", UNTIL, "--json"]) == 0
        finally:
            torch.set_num_threads(before)
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
        if name == "threads":
            _gpu_tasks_took_turns(raw["runner"]["gpu_tag"])
    # each run computed every stage itself: nothing was shared between the two stores
    assert set(results["threads"]) == set(results["dask"])
    assert all(r["state"] == "Completed" for run in results.values() for r in run.values()), results
    assert {k.split("[")[0] for k in results["dask"]} >= set(COMPARED) - {"vocab_map"}
    assert {"train[moe]", "train[clm]"} <= set(results["dask"]), sorted(results["dask"])

    assert RunPlan(load_config(threads)).nodes() == RunPlan(load_config(dask)).nodes(), \
        "the runner must not change addresses"
    a, b = _digests(threads), _digests(dask)
    assert len(a) > 10 and a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}

    _launched_targets_take_turns_under_threads(tmp_path, raw)
    _sigterm_stops_the_dask_run_and_its_accelerate_children(tmp_path, raw, prefect_server)
    _sigterm_stops_the_run_s_tasks_on_a_cluster_it_did_not_start(tmp_path, raw, prefect_server)


def _launched_targets_take_turns_under_threads(tmp_path: Path, raw: dict) -> None:
    """Under the thread runner, targets trained under ``accelerate launch`` share the node:
    one at a time, with no GPU slot limit to keep them apart (the 7B config's 8 slots let
    three 8-GPU launches start at once on one 8-GPU node). Upstream stages are the thread
    run's above (Cached); two short targets."""
    from prefect import get_client

    accel = tmp_path / "turns-accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                     "mixed_precision: 'no'\nuse_cpu: true\n")
    path = tmp_path / "turns.yaml"
    path.write_text(yaml.safe_dump({
        **raw, "name": "tiny-turns", "store": f"file://{tmp_path}/threads",
        "runner": {**raw["runner"], "task_runner": "threads", "max_workers": 2, "gpu_tag": None},
        "train": {**raw["train"], "max_steps": 2, "accelerate_config": str(accel)}}))
    assert main(["run", str(path), "--until", UNTIL]) == 0
    with get_client(sync_client=True) as client:
        run = latest_flow_run(client, flow_run_name("tiny-turns", UNTIL))
        spans = sorted((t.start_time, t.end_time, t.name) for t in final_task_runs(client, run.id)
                       if t.name.startswith("train[") and t.state.name == "Completed")
    assert len(spans) == 2, spans
    assert spans[0][1] <= spans[1][0], f"{spans[0][2]} and {spans[1][2]} trained at once"


def _gpu_tasks_took_turns(tag: str) -> None:
    """Under the thread runner with two workers, the task runs that hold a model (represent
    shards, training) carry the GPU tag, and its one-slot limit (runner.gpu_concurrency) kept
    any two of them from running at once."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = latest_flow_run(client, flow_run_name("tiny-dask", UNTIL))
        tasks = final_task_runs(client, run.id)
    tagged = sorted((t.start_time, t.end_time, t.name) for t in tasks if tag in t.tags)
    shards = [n for _, _, n in tagged if n.startswith("represent[") and "shard=" in n]
    targets = [n for _, _, n in tagged if n.startswith("train[")]
    assert len(shards) == 4 and len(targets) == 2 and len(tagged) == 6, tagged  # two models' two shards each
    for (_, end, first), (start, _, second) in zip(tagged, tagged[1:]):
        assert end <= start, f"{first} and {second} held the GPU slot at once"


def _descendants_of_the_run(pid: int) -> list[str]:
    """Processes still running that the run started (orphans are re-parented, so by the
    session the run's process led: start_new_session made its pid the session id)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline()))
        except (psutil.Error, OSError):
            pass
    return out


def _long_training(tmp_path: Path, raw: dict, runner: dict, name: str, *, launch: bool = True) -> Path:
    """The Dask run above (its upstream stages Cached) with one target (no CLM baseline)
    trained for long enough to be interrupted, under ``accelerate launch`` if ``launch``: one
    launcher and its training process are enough to show a tree stops, and each is an
    interpreter start with torch."""
    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                     "mixed_precision: 'no'\nuse_cpu: true\n")
    # No GPU tag: a killed run's slot stays taken until the server's lease on it expires, and
    # the next run's training would wait that long for it (tens of seconds, idle).
    long = {**raw, "store": f"file://{tmp_path}/dask", "runner": {**runner, "gpu_tag": None},
            "train": {**raw["train"], "epochs": 100, "max_steps": 400, "checkpoint_every": 3,
                      "accelerate_config": str(accel) if launch else None, "clm_baseline": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(long))
    return path


def _start_cli(path: Path, server, tmp_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--until", UNTIL], cwd=REPO,
                                # on the session's server, as on a cluster: no API of its own to start
                                env=server.client_env(tmp_path / "prefect-home"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _nothing_half_committed(store: ArtifactStore, targets: list[str]) -> None:
    """The targets are not committed; their checkpoints and everything else verify."""
    assert not any(store.is_complete(t) for t in targets)
    root = Path(store.root)
    for manifest in root.rglob(MANIFEST):
        address = manifest.parent.relative_to(root).as_posix()
        if "_prefect-records" not in address:
            assert store.is_complete(address, verify=True), address


def _sigterm_stops_the_dask_run_and_its_accelerate_children(tmp_path: Path, raw: dict, server) -> None:
    """SIGTERM to `fusechat run` on a local Dask cluster while its targets train under
    ``accelerate launch``: the CLI, the cluster's worker processes, each launcher and the
    training processes it started are gone within 10 s; the run exits 143; the targets are not
    committed (their checkpoints are, whole), and every manifest in the store verifies.

    The upstream stages are the Dask run's above (Cached); only training differs."""
    path = _long_training(tmp_path, raw, {"task_runner": "dask", "max_workers": 1}, "dask-accelerate")
    cfg = load_config(path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    targets = [plan.train(t) for t in plan.target_names()]

    log = tmp_path / "sigterm.log"
    cli = _start_cli(path, server, tmp_path, log)
    try:
        deadline = time.monotonic() + 240
        while not any(complete_checkpoints(store, t) for t in targets):
            assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        tree = psutil.Process(cli.pid).children(recursive=True)
        lines = [" ".join(p.cmdline()) for p in tree]
        launched = [c for c in lines if "accelerate.commands.launch" in c]
        training = [c for c in lines if "-m fusechat_core.train" in c and "accelerate" not in c]
        assert launched and training and any("distributed" in c or "multiprocessing" in c for c in lines), lines

        t0 = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        main = psutil.Process(cli.pid)
        gone, alive = psutil.wait_procs([main, *tree], timeout=LIMIT_S)
        took = time.monotonic() - t0
        print(f"fusechat run (Dask, accelerate launch) gone {took:.1f} s after SIGTERM, {len(tree)} descendants")
        assert not alive, [(p.pid, " ".join(p.cmdline())) for p in alive if p.is_running()]
        code = next(p.returncode for p in gone if p.pid == cli.pid)  # psutil reaped it
        assert code == 128 + signal.SIGTERM, log.read_text()[-4000:]
        # no process the cluster started afterwards (a nanny restarting its worker) outlives the run
        assert not _descendants_of_the_run(cli.pid), _descendants_of_the_run(cli.pid)
        assert "Restarting worker" not in log.read_text()
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
    _nothing_half_committed(store, targets)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sigterm_stops_the_run_s_tasks_on_a_cluster_it_did_not_start(tmp_path: Path, raw: dict, server) -> None:
    """``runner.dask_address``: a Dask scheduler and worker started apart from the run, as a
    platform team's cluster is. SIGTERM to `fusechat run` while its target trains on that
    worker: the CLI is gone within 10 s, and so is the training task on the worker (no child
    of the run: the run's stop reaches it through a Dask event), which writes nothing after;
    the worker itself lives on and takes new work; nothing is half-committed.

    The target trains in the worker's thread (the processes a task launches stop with it too:
    tests/test_stopping.py; ``accelerate launch`` under a stop, above)."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**server.client_env(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO)}
    cluster_log = tmp_path / "cluster.log"
    with open(cluster_log, "ab") as out:
        scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                      "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
                                     cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
                                   "--nthreads", "1", "--no-dashboard"],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    path = _long_training(tmp_path, raw, {"task_runner": "dask", "dask_address": address}, "dask-remote",
                          launch=False)
    cfg = load_config(path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    targets = [plan.train(t) for t in plan.target_names()]
    log = tmp_path / "sigterm-remote.log"

    def newest() -> int:  # the local cluster's run above left checkpoints: this one resumes
        return max((step for step, _ in complete_checkpoints(store, targets[0])), default=0)
    cli = None
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            cli = _start_cli(path, server, tmp_path, log)
            deadline = time.monotonic() + 240
            seen = [(newest(), time.monotonic())]
            while len(seen) < 3:  # training on the worker: two checkpoints written, and how often
                assert cli.poll() is None and time.monotonic() < deadline, \
                    log.read_text()[-3000:] + cluster_log.read_text()[-3000:]
                if (step := newest()) != seen[-1][0]:
                    seen.append((step, time.monotonic()))
                time.sleep(0.05)
            every = seen[2][1] - seen[1][1]
            assert any(client.processing().values())

            t0 = time.monotonic()
            cli.send_signal(signal.SIGTERM)
            gone, alive = psutil.wait_procs([psutil.Process(cli.pid)], timeout=LIMIT_S)
            assert not alive, log.read_text()[-4000:]
            code = next(p.returncode for p in gone if p.pid == cli.pid)  # psutil reaped it
            assert code == 128 + signal.SIGTERM, log.read_text()[-4000:]
            while any(client.processing().values()) and time.monotonic() < t0 + LIMIT_S:
                time.sleep(0.1)
            took = time.monotonic() - t0
            print(f"fusechat run (remote Dask) gone, and its task on the worker ended, {took:.1f} s after SIGTERM")
            assert not any(client.processing().values()), (client.processing(), cluster_log.read_text()[-3000:])
            # The task ended, not just its result: it writes no checkpoint in thrice the time it
            # took to write one (a released task goes on in the worker's thread; the scheduler
            # no longer lists it). The worker lives on and takes new work.
            last = newest()
            time.sleep(max(3 * every, 2.0))
            assert newest() == last, f"the task still trains on the worker: checkpoint {last} -> {newest()}"
            assert "its flow run stopped" in cluster_log.read_text()
            assert client.submit(sum, [1, 2]).result(timeout=30) == 3
            assert worker.poll() is None and scheduler.poll() is None
    finally:
        for proc in (cli, worker, scheduler):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    _nothing_half_committed(store, targets)


def test_a_run_says_which_runner_settings_it_cannot_apply(tmp_path):
    """A deployment runs the flow with its decorated runner (bounded threads): a config asking
    for Dask, or another thread count, is told in a warning rather than ignored silently."""
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import fusechat_pipeline, runner_mismatch, task_runner_for
    from fusechat_core.config import RunnerConfig

    base = parse_config(yaml.safe_load(tiny_run_config(tmp_path, f"file://{tmp_path}/store").read_text()))

    def cfg(**runner):
        return base.model_copy(update={"runner": RunnerConfig(**runner)})

    deployed = fusechat_pipeline.task_runner
    assert isinstance(deployed, ThreadPoolTaskRunner) and deployed._max_workers == RunnerConfig().max_workers
    assert runner_mismatch(cfg(), deployed) == []
    [problem] = runner_mismatch(cfg(max_workers=16), deployed)
    assert problem.startswith("runner.max_workers: 16 is not applied here: this run has 4 worker threads")
    [problem] = runner_mismatch(cfg(task_runner="dask"), deployed)
    assert problem.startswith("runner.task_runner: dask is not applied here: this run uses ThreadPoolTaskRunner")
    # the 7B config's 8 GPU slots under 4 threads: half the node's GPUs would wait
    [problem] = runner_mismatch(cfg(gpu_concurrency=8), deployed)
    assert problem.startswith("runner.gpu_concurrency: 8 GPU slots, but this run has 4 worker threads")
    assert runner_mismatch(cfg(gpu_concurrency=8, gpu_tag=None), deployed) == []  # no GPU slots to fill
    # a pod of the 8-slot cluster with one GPU (evaluate-gpu): one model at a time whatever its
    # threads (models.claim_gpu); it was told to run 8 threads, which loaded 4 models on its GPU
    assert runner_mismatch(cfg(gpu_concurrency=8), deployed, gpus=1) == []
    assert runner_mismatch(cfg(gpu_concurrency=8), deployed, gpus=0) == []
    [problem] = runner_mismatch(cfg(gpu_concurrency=8), deployed, gpus=6)
    assert problem.endswith("to at least 6)")
    # what `fusechat run` starts the flow with does what the config says
    for runner in ({}, {"max_workers": 16}, {"task_runner": "dask"}, {"max_workers": 8, "gpu_concurrency": 8}):
        assert runner_mismatch(cfg(**runner), task_runner_for(cfg(**runner))) == []
    assert len(runner_mismatch(cfg(gpu_concurrency=8), task_runner_for(cfg(gpu_concurrency=8)))) == 1
    assert isinstance(task_runner_for(cfg(task_runner="dask")), DaskTaskRunner)



def test_a_deployment_takes_its_thread_count_from_its_job_env(tmp_path):
    """Prefect fixes a deployed flow's runner when the flow is loaded, before the config is
    read: the job's env sets the thread count (an 8-GPU pod wants 8), checked in one line."""
    code = "from flows.pipeline import fusechat_pipeline as f; print(f.task_runner._max_workers)"
    env = {k: v for k, v in os.environ.items() if k != "FUSECHAT_MAX_WORKERS"}
    for value, want in (("8", "8"), ("", "4")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "FUSECHAT_MAX_WORKERS": value},
                             capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True)
        assert out.stdout.split()[-1] == want
    # read at import, by `fusechat run` too: a bad value warns in one line and breaks no command
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "FUSECHAT_MAX_WORKERS": "eight"},
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], check=True)
    assert bad.stdout.split()[-1] == "4"
    assert "FUSECHAT_MAX_WORKERS: 'eight' is not a positive whole number of worker threads; a deployed run " \
           "uses 4" in bad.stderr
