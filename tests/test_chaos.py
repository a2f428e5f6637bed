"""Preemption drill: the pipeline is SIGKILLed at seeded random moments across its stages,
rerun each time, and must end exactly where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import LEASE, MANIFEST, VERIFIED, ArtifactStore
from tests.damage import damage_drill
from tests.tiny_config import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def _start(cfg: Path, store: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(cfg), "--store", store],
                            cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _manifests(root: Path) -> int:
    return sum(1 for p in root.rglob(MANIFEST) if "_prefect-records" not in p.parts) if root.exists() else 0


def _file_digests(store: ArtifactStore, address: str) -> dict[str, str]:
    root = Path(store.root) / address
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (MANIFEST, VERIFIED, LEASE)}


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, prefect_server) -> dict:
    """The tiny run, uninterrupted: the drills' reference. In this process: it is not the one
    killed, and a process of its own would only import torch, transformers and Prefect again."""
    from flows.cli import main

    tmp_path = tmp_path_factory.mktemp("chaos")
    cfg_path = tiny_run_config(tmp_path, f"file://{tmp_path}/clean", name="tiny-chaos")
    assert main(["run", str(cfg_path), "--store", f"file://{tmp_path}/clean"]) == 0
    # The killed runs report to the session's server, as on a cluster: the kill takes the run's
    # process group, and no run pays for starting an API of its own (seconds of CPU, four times).
    env = prefect_server.client_env(tmp_path / "prefect-home")
    return {"tmp": tmp_path, "config": cfg_path, "env": env, "log": tmp_path / "runs.log",
            "store": f"file://{tmp_path}/clean"}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(clean_run):
    tmp_path, cfg_path, env, log = clean_run["tmp"], clean_run["config"], clean_run["env"], clean_run["log"]
    total = _manifests(tmp_path / "clean")

    # Kill at seeded moments spread over the run, measured in artifacts committed
    # (demo models, dataset, shards, targets' checkpoints, merges, evaluations).
    chaos_store = f"file://{tmp_path}/chaos"
    rng = random.Random(20240226)
    moments = sorted(rng.sample(range(2, total - 1), 3))
    kills = 0
    for moment in moments:
        proc = _start(cfg_path, chaos_store, env, log)
        while proc.poll() is None and _manifests(tmp_path / "chaos") < moment:
            time.sleep(0.1)
        if proc.poll() is None:
            kills += 1
        _killpg(proc)
    final = _start(cfg_path, chaos_store, env, log)
    assert final.wait(900) == 0, log.read_text()[-4000:]
    _killpg(final)
    assert kills == len(moments), "the drill must actually interrupt every run"

    cfg = load_config(cfg_path)
    plan = RunPlan(cfg)
    a, b = ArtifactStore(f"file://{tmp_path}/clean"), ArtifactStore(chaos_store)
    for method in plan.merge_methods():
        assert _file_digests(a, plan.merge(method)) == _file_digests(b, plan.merge(method)), method
    for t in plan.target_names():
        ma, mb = _file_digests(a, plan.train(t)), _file_digests(b, plan.train(t))
        assert ma["model.safetensors"] == mb["model.safetensors"], t
    assert _file_digests(a, plan.report())["report.json"] == _file_digests(b, plan.report())["report.json"]
    # nothing in the chaos store is both referenced and incomplete
    for node in plan.nodes():
        if node.stage != "mt_bench_answers":
            assert b.is_complete(node.address, verify=True), node.label


@pytest.mark.slow
def test_damage_is_reported_and_only_the_damaged_artifacts_are_recomputed(clean_run, prefect_server):
    """On the finished tiny run (two sources, so a source's shard and another's target can both
    be damaged): see tests/damage.py. Runs after the chaos drill, which only reads this store."""
    cfg = clean_run["config"]
    damage_drill(RunPlan(load_config(cfg)), ["run", str(cfg), "--store", clean_run["store"]],
                 ["status", str(cfg), "--store", clean_run["store"]], prefect_server.api)
