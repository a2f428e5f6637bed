"""Fusion training vs CLM-only training on the same batches: time per optimizer step, peak memory.

    .venv/bin/python benchmarks/train.py [--hidden 256 --layers 4 --seq-len 256 --steps 6]

A Mistral-architecture student (default hidden 256, 4 layers, the real
32,000-token Mistral vocabulary) so that the student's forward and backward
dominate, as they do at 7B. Inputs follow the REPRESENTATION and ALIGNED
contracts (random top-k teachers, k = 10), written once to a local store.

Time: both modes run through ``fusechat_core.train.train_target`` in this one
process on the same data order (same seed), alternating CLM / fusion runs over
several rounds so that drift in machine load hits both; the figure is the
median per-step time (first step of each run left out: allocator warm-up).
On the CPU that is the process's CPU time per step (``time.process_time``,
all torch threads), because on a shared machine wall time mostly measures the
neighbours; on a GPU it is wall time.

Peak memory: each mode runs again in a fresh child process; the figure is the
growth of the resident set (``ru_maxrss`` minus the RSS just before training
starts: model, optimizer state, activations, loss tensors), so the shared
cost of importing torch does not dilute the ratio. ``tracemalloc`` would not
see torch's allocations at all. On a GPU the child reports
``torch.cuda.max_memory_allocated`` instead.

Verification: the shards are hashed against their manifests when the store hands
out their folder, as the stage does; ``verify_share_of_train_epoch`` is that time
over (itself + one epoch of fusion steps over the same shards). Target <= 0.05.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusechat_core.config import ModelSpec, TrainConfig  # noqa: E402
from fusechat_core.fuse.batches import FusionData  # noqa: E402
from fusechat_core.store import ArtifactStore  # noqa: E402
from fusechat_core.train import train_target  # noqa: E402


def make_inputs(root: Path, *, n_seq: int, seq_len: int, vocab: int, k: int, seed: int = 0,
                min_len: int | None = None) -> tuple[list, list]:
    """Pivot representation and aligned shards (one each) with random teachers, in contract
    format; sequences of ``min_len`` (default seq_len // 2) to ``seq_len`` tokens."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq_len // 2 if min_len is None else min_len, seq_len + 1, n_seq)
    ids = [rng.integers(3, vocab, n) for n in lengths]
    # the assistant's part: the second half of each sequence is supervised
    sup = [np.arange(n // 2, n) for n in lengths]
    rows = int(sum(len(s) for s in sup))

    def topk() -> tuple[np.ndarray, np.ndarray]:
        lp = np.sort(np.log(rng.dirichlet(np.ones(k) * 0.3, rows) * 0.9 + 1e-9), axis=1)[:, ::-1]
        return rng.integers(0, vocab, (rows, k)), np.ascontiguousarray(lp).astype(np.float16)

    store = ArtifactStore(f"file://{root / 'store'}")
    sup_off = np.concatenate([[0], np.cumsum([len(s) for s in sup])]).astype(np.int64)
    p_ids, p_lp = topk()
    s_ids, s_lp = topk()
    id_t = np.uint16 if vocab < 65536 else np.int32
    pivot = {"input_ids": np.concatenate(ids).astype(id_t),
             "seq_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
             "sup_positions": np.concatenate(sup).astype(np.uint16), "sup_offsets": sup_off,
             "topk_ids": p_ids.astype(id_t), "topk_logprobs": p_lp,
             "metric_ce": rng.uniform(1, 3, n_seq).astype(np.float32)}
    aligned = {"sup_offsets": sup_off, "topk_ids": s_ids.astype(np.int32), "topk_logprobs": s_lp,
               "metric_ce": rng.uniform(1, 3, n_seq).astype(np.float32), "fallback": np.zeros(rows, dtype=bool)}
    meta = {"vocab_size": vocab, "top_k": k, "n_seq": n_seq, "row_ids": [f"b{i}" for i in range(n_seq)]}
    for address, name, arrays in (("represent/bench/shard-00000-of-00001", "representation.safetensors", pivot),
                                  ("align/bench/shard-00000-of-00001", "aligned.safetensors", aligned)):
        with store.writer(address) as w:
            w.write_bytes(name, save(arrays))
            w.write_json("meta.json", meta)
    return [store.fetch("represent/bench/shard-00000-of-00001")], [store.fetch("align/bench/shard-00000-of-00001")]


def build_model(root: Path, hidden: int, layers: int) -> Path:
    from fusechat_core.tiny import build_tiny_model

    out = root / "student"
    if not (out / "config.json").exists():
        build_tiny_model("mistral", "builtin:mistral-v1", out, seed=0, hidden=hidden, layers=layers,
                         heads=max(4, hidden // 64), kv_heads=max(2, hidden // 128), intermediate=hidden * 3)
    return out


def train_cfg(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(learning_rate=1e-4, batch_size=args.batch, micro_batch_size=args.micro,
                       max_steps=args.steps, checkpoint_every=10_000, mixed_precision="auto",
                       max_length=args.seq_len, seed=1, keep_checkpoints=1)


def run(mode: str, args: argparse.Namespace, root: Path, data: FusionData, model: Path,
        tag: str) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each optimizer step after the first."""
    marks: list[tuple[float, float]] = []

    def on_event(e: dict) -> None:
        if e["event"] in ("start", "step"):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), time.process_time()))

    store = ArtifactStore(f"file://{root / 'runs'}")
    train_target(train_cfg(args), pivot=ModelSpec(name="student", path=str(model)), data=data, store=store,
                 address=f"train/{mode}-{tag}", lam=1.0 if mode == "clm" else 0.9, on_event=on_event)
    wall = [b[0] - a[0] for a, b in zip(marks, marks[1:])][1:]
    cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])][1:]
    return wall, cpu


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(mode: str, args: argparse.Namespace, root: Path) -> None:
    pivot_dirs, aligned_dirs = [root / "store/represent/bench/shard-00000-of-00001"], \
        [root / "store/align/bench/shard-00000-of-00001"]
    data = FusionData(pivot_dirs, aligned_dirs if mode == "fusion" else None, max_length=args.seq_len)
    model = root / "student"
    base = _rss_bytes()
    args.steps = 3
    run(mode, args, root, data, model, f"mem-{os.getpid()}")
    if torch.cuda.is_available():
        peak, how = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, "ru_maxrss_minus_start_rss"
    print(json.dumps({"mode": mode, "peak_bytes": peak, "method": how}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["clm", "fusion"], help=argparse.SUPPRESS)
    args = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.child:
        child(args.child, args, Path(args.root))
        return

    root = Path(tempfile.mkdtemp(prefix="fusechat-bench-train-"))
    model = build_model(root, args.hidden, args.layers)
    vocab = 32000
    from fusechat_core.store import VERIFY_SECONDS

    hashed = VERIFY_SECONDS[0]
    pivot_dirs, aligned_dirs = make_inputs(root, n_seq=args.n_seq, seq_len=args.seq_len, vocab=vocab, k=args.top_k)
    # The stage verifies every shard it reads once, when the store hands out its folder (fetch).
    verify_s = VERIFY_SECONDS[0] - hashed
    shard_bytes = sum(p.stat().st_size for d in (*pivot_dirs, *aligned_dirs) for p in Path(d).iterdir() if p.is_file())
    fusion_data = FusionData(pivot_dirs, aligned_dirs, max_length=args.seq_len)
    clm_data = FusionData(pivot_dirs, None, max_length=args.seq_len)
    n_params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"])
                   .load_file(str(model / "model.safetensors")).values())
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"student: mistral hidden {args.hidden}, {args.layers} layers, vocab {vocab}, {n_params / 1e6:.1f}M params; "
          f"device {device}")
    print(f"batch {args.batch} sequences of {args.seq_len // 2}-{args.seq_len} tokens (micro-batch {args.micro}), "
          f"top-k {args.top_k}, {args.steps} steps per run")

    wall: dict[str, list[float]] = {"clm": [], "fusion": []}
    cpu: dict[str, list[float]] = {"clm": [], "fusion": []}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for mode in (("clm", "fusion") if r % 2 == 0 else ("fusion", "clm")):
            w, c = run(mode, args, root, clm_data if mode == "clm" else fusion_data, model, f"r{r}")
            wall[mode] += w
            cpu[mode] += c
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in (("wall", wall), ("cpu", cpu))}
    print(f"time per optimizer step, median of {len(wall['clm'])} steps per mode "
          f"(bench wall {time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}):")
    for k in ("wall", "cpu"):
        print(f"  {k:4s}: clm {med[k]['clm'] * 1e3:8.1f} ms   fusion {med[k]['fusion'] * 1e3:8.1f} ms   "
              f"ratio {med[k]['fusion'] / med[k]['clm']:.3f}")
    basis = "wall" if torch.cuda.is_available() else "cpu"
    clm_t, fus_t = med[basis]["clm"], med[basis]["fusion"]
    print(f"ratio below from {basis} time")

    peaks = {}
    for mode in ("clm", "fusion"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root),
                              "--hidden", str(args.hidden), "--layers", str(args.layers),
                              "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--micro", str(args.micro),
                              "--top-k", str(args.top_k)], capture_output=True, text=True, check=True)
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    method = peaks["clm"]["method"]
    print(f"peak memory ({method}, one fresh process per mode): clm {peaks['clm']['peak_bytes'] / 2**20:.0f} MiB, "
          f"fusion {peaks['fusion']['peak_bytes'] / 2**20:.0f} MiB")

    # What the fusion term adds per micro-batch, against what a dense target would be
    rows = int(fusion_data.n_supervised[:args.micro].sum())
    sparse = rows * args.top_k * 2 * (8 + 4 + 2)  # 2 teachers × (int64 id, fp32 prob, fp16 logprob)
    dense = rows * vocab * 4
    print(f"fusion targets per micro-batch ({rows} supervised rows): {sparse / 2**10:.0f} KiB sparse "
          f"(k × teachers, independent of the vocabulary) vs {dense / 2**20:.0f} MiB as a dense fp32 target")
    # One epoch reads every row of the shards once: the least a training stage does with what it verified.
    epoch_s = -(-args.n_seq // args.batch) * fus_t
    print(f"verification: {shard_bytes / 2**20:.1f} MiB of shards hashed in {verify_s * 1e3:.1f} ms "
          f"({shard_bytes / max(verify_s, 1e-9) / 2**20:.0f} MiB/s), against {epoch_s:.2f} s for one epoch "
          f"of fusion steps over them")
    print(f"fusion_step_vs_clm: {fus_t / clm_t:.3f}")
    print(f"verify_share_of_train_epoch: {verify_s / (epoch_s + verify_s):.4f}")
    print(f"fusion_peak_mem_vs_clm: {peaks['fusion']['peak_bytes'] / peaks['clm']['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
