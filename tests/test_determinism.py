"""Same address, same bytes, whatever the runner: a stage's CPU compute does not depend on the
thread count of the process it runs in (a Dask worker has OMP_NUM_THREADS=1; the thread runner
has torch's default, one per core). Unpinned, this pre-training differs between 1 and 8 threads
(measured: 43b4c056… vs c44d4387…)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = r'''
import hashlib, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[3]))  # a many-core machine's default
from fusechat_core.config import load_config
from fusechat_core.demo import pretrain_demo_model
cfg = load_config(sys.argv[1])
pretrain_demo_model(cfg, cfg.pivot, Path(sys.argv[2]))
print(hashlib.sha256((Path(sys.argv[2]) / "model.safetensors").read_bytes()).hexdigest())
'''


@pytest.mark.slow
def test_demo_pretraining_gives_the_same_bytes_under_one_thread_and_eight(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["demo"]["models"]["pivot"]["steps"] = 6
    raw["store"] = f"file://{tmp_path}/store"
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(raw))
    # One thread, as in a Dask worker: in this process, set explicitly (a plain pytest run has
    # torch's default of one per core). Eight, as on a many-core machine: a process of its own,
    # without the OMP_NUM_THREADS=1 an xdist worker passes down.
    import torch

    from fusechat_core.config import load_config
    from fusechat_core.demo import pretrain_demo_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(config)
        pretrain_demo_model(cfg, cfg.pivot, tmp_path / "dask-like")
    finally:
        torch.set_num_threads(before)
    digests = {"dask-like": hashlib.sha256((tmp_path / "dask-like" / "model.safetensors").read_bytes()).hexdigest()}
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", PRETRAIN, str(config), str(tmp_path / "many-core"), "8"],
                         env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    digests["many-core"] = out.stdout.split()[-1]
    assert digests["dask-like"] == digests["many-core"], digests
    assert len(digests["many-core"]) == len(hashlib.sha256().hexdigest())


def test_pin_compute_sets_the_thread_count_in_the_calling_thread():
    import threading

    import torch

    from fusechat_core.determinism import COMPUTE_THREADS, pin_compute

    seen = []

    def stage():
        torch.set_num_threads(4)  # what the runner's process had
        pin_compute()
        seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()))

    before = torch.get_num_threads()
    try:
        t = threading.Thread(target=stage)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(False)
    assert seen == [(COMPUTE_THREADS, True)]
