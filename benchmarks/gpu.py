"""Every GPU stage at 7B shape in one command: ≤ 8 minutes on one H200, every figure at once.

    python benchmarks/gpu.py                      # the H200 run (one process tree)
    python benchmarks/gpu.py --only represent,train
    python benchmarks/gpu.py --tiny               # the same code on the CPU at toy size (CI)
    python benchmarks/gpu.py --only e2e --budget e2e=300   # a rerun of one stage, more time

Prints ``name: value`` lines, then one JSON object (the last line) with every figure.
Every stage runs in a child process of its own under a wall-clock budget (``BUDGETS``):
a stage that overruns is killed with its whole process group, its missing figures print
as ``n/a (...)``, and the next stage starts on time. Figures print as they are measured,
so a stage cut short still reports what it finished.

What runs is the project's own code, never a re-implementation:

- represent: ``represent.represent_model`` over 2048-token chat sequences (batches from
  ``represent.batch_tokens``), against a bare forward pass (full logits) of the same model
  over the same length-sorted batches. Collection includes rendering, top-k, the copy to
  the host and writing the shard to a file:// store.
- train: ``train.train_target`` with the project's settings (float32 master weights,
  bf16 autocast through accelerate, gradient checkpointing, fused AdamW on the GPU), for a
  CLM (λ = 1) and a fusion (λ = 0.9, MinCE, two teachers at k = 10) run on the same
  2048-token sequences. The model is the largest Mistral shape (hidden 4096, 32k
  vocabulary, whole layers) whose estimated training footprint fits the GPU (``train_layers``).
  The run stops after its last timed step, before the final save (a 7B fp32 target plus
  optimizer state would be ~87 GB of disk and minutes of writing).
- merge: ``merge.merge_models`` (mergekit's out-of-core engine) for ``varm`` and
  mergekit's ``linear``, bf16, on the GPU over three full 7B-shaped models, and on the CPU
  (each merge in a fresh process, peak resident set) over three models of the same layer
  shape with ``merge_cpu_layers`` layers (a 7B CPU merge would take the whole budget).
- evaluate: ``evaluate.mt_bench.answer_questions`` (batched ``generate``, both turns) on
  MT-Bench-format questions written by ``tests/corpus.py``; the model loaded by
  ``evaluate.loading.load_for_eval`` in float32 (``evaluate.dtype``'s default).
- e2e: ``fusechat run configs/demo.yaml`` (Prefect, every stage) with every device set to
  this machine's (``cuda``), and a CPU reference run of the same config
  (``CUDA_VISIBLE_DEVICES=''``, device ``cpu``) started in the background when the
  benchmark starts (the CPU reference is computed in this same command, not read from
  a file made elsewhere). The two share one store: the reference makes the demo models
  (CPU-only pre-training) and the dataset; ``e2e_wall_s`` is the device run's wall time
  from represent to report, including Prefect's start. The two ``report.json`` are compared.
  Tolerance (``E2E_TOLERANCE``): the GPU run trains under bf16 autocast, whose 8-bit
  mantissa puts ~0.4% on every product (and evaluates in float32, as the CPU does); the
  held-out NLLs (1-4 nats/token) may differ by up to 0.05 nats/token. The fusion margins
  of the README (~0.008 nats) are below that: their signs are reported, not required.

Memory: on a GPU ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at
the start of each measured block (weights included); on the CPU the block's peak resident
set (sampled every 5 ms). Timing synchronises the GPU before every clock read.

MFU: ``2·N·tokens/s`` (inference) and ``6·N·tokens/s`` (training, the usual convention;
gradient checkpointing actually does ~8·N) over ``peak_tflops``; N counts every parameter
but the input embedding (a lookup). Attention's quadratic FLOPs are left out of the
numerator.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Dense bf16 peak of the GPU the benchmark is sized for. Source: the lent H200's notes
# (/work/.library/device/KINDS.md, README.md: "bf16 matrix work at about 790 TFLOP/s"; an
# 8192³ bf16 torch.matmul measured 769-798 TFLOP/s there). NVIDIA's H200 SXM datasheet
# states 989 TFLOP/s dense bf16: multiply our MFU by 0.80 for MFU against the datasheet.
H200_BF16_PEAK_TFLOPS = 790.0
# The CPU has no stated peak; a nominal one so that --tiny prints every MFU figure:
# 2 FMA units × 8 fp32 lanes (AVX2) × 2 FLOP × 2 GHz = 64 GFLOP/s per core.
CPU_NOMINAL_GFLOPS_PER_CORE = 64.0

STAGES = ("represent", "train", "merge", "evaluate", "e2e")
# Seconds per stage on the H200 (sum 470 ≤ 480, the 8 minutes). "models" writes the
# 7B-shaped pivot folder that represent, merge and evaluate read.
BUDGETS = {"models": 40, "represent": 45, "train": 135, "merge": 125, "evaluate": 40, "e2e": 85}
# --tiny on a (shared, 2-core) CPU: generous, a CI machine's load varies.
TINY_BUDGETS = {"models": 120, "represent": 120, "train": 180, "merge": 240, "evaluate": 120, "e2e": 400}

MISTRAL_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, max_positions=4096)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=4096)
VOCAB = 32000  # the Mistral v1 vocabulary (builtin:mistral-v1), the paper's pivot's

E2E_TOLERANCE = {"nll": 0.05, "exact_match": 0.05}

# Every figure, by stage: all of them print, measured or "n/a (why)".
FIGURES: dict[str, tuple[str, ...]] = {
    "run": ("device", "gpu", "peak_tflops", "peak_source", "total_wall_s"),
    "models": ("models_shape", "models_params_b", "models_write_s", "disk_free_gib"),
    "represent": ("represent_sequences", "represent_tokens", "represent_batch_tokens", "represent_batches",
                  "represent_load_s", "represent_forward_tokens_per_s", "represent_collect_tokens_per_s",
                  "represent_collect_vs_forward", "represent_forward_peak_mem_gib", "represent_collect_peak_mem_gib",
                  "represent_collect_mem_vs_forward", "represent_forward_mfu", "represent_collect_mfu"),
    "train": ("train_model", "train_layers", "train_params_b", "train_estimated_gib", "train_tokens_per_step",
              "train_mixed_precision", "train_gradient_checkpointing", "train_clm_step_s", "train_fusion_step_s",
              "train_fusion_vs_clm", "train_clm_peak_mem_gib", "train_fusion_peak_mem_gib", "train_fusion_mem_vs_clm",
              "train_clm_tokens_per_s", "train_fusion_tokens_per_s", "train_clm_mfu", "train_fusion_mfu"),
    "merge": ("merge_gpu_params_b", "merge_gpu_linear_s", "merge_gpu_varm_s", "merge_gpu_varm_vs_linear",
              "merge_gpu_linear_peak_mem_gib", "merge_gpu_varm_peak_mem_gib", "merge_gpu_mem_vs_linear",
              "merge_varm_max_error", "merge_cpu_layers", "merge_cpu_params_b", "merge_cpu_linear_s",
              "merge_cpu_varm_s", "merge_cpu_varm_vs_linear", "merge_cpu_linear_peak_rss_gib",
              "merge_cpu_varm_peak_rss_gib", "merge_cpu_mem_vs_linear"),
    "evaluate": ("evaluate_questions", "evaluate_batch_size", "evaluate_new_tokens", "evaluate_seconds",
                 "evaluate_tokens_per_s", "evaluate_peak_mem_gib"),
    "e2e": ("e2e_device", "e2e_wall_s", "e2e_reference_device", "e2e_reference_wall_s", "e2e_values_compared",
            "e2e_max_nll_diff", "e2e_max_exact_match_diff", "e2e_tolerance", "e2e_margin_signs_agree",
            "e2e_report_matches"),
}

GIB = 2 ** 30


# -- helpers for the stage processes ------------------------------------------------------------

def fig(name: str, value: Any) -> None:
    """One figure, on its own line, at once (a stage cut short keeps what it printed)."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Peak:
    """Peak memory of a block: the CUDA allocator's on a GPU, the sampled resident set on a CPU."""

    def __init__(self, device: str):
        self.device, self.bytes = device, 0

    def __enter__(self) -> Peak:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc, self._stop = psutil.Process(), threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    self.bytes = max(self.bytes, proc.memory_info().rss)
                    self._stop.wait(0.005)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def peak_flops(device: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for MFU."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        if os.environ.get("FUSECHAT_PEAK_TFLOPS"):
            return float(os.environ["FUSECHAT_PEAK_TFLOPS"]) * 1e12, "FUSECHAT_PEAK_TFLOPS"
        if "H200" in name or "H100" in name:
            return H200_BF16_PEAK_TFLOPS * 1e12, "H200_BF16_PEAK_TFLOPS (stated for the lent H200)"
        return float("nan"), f"unknown for {name}: set FUSECHAT_PEAK_TFLOPS"
    cores = len(os.sched_getaffinity(0))
    return cores * CPU_NOMINAL_GFLOPS_PER_CORE * 1e9, f"CPU nominal {cores} × {CPU_NOMINAL_GFLOPS_PER_CORE} GFLOP/s"


def compute_params(model: Any) -> int:
    """N of the MFU formulas: every parameter but the input embedding (a lookup, no FLOPs)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def mistral_params(shape: dict, vocab: int = VOCAB) -> int:
    """Parameters of a Mistral of this shape (embedding and head untied), for sizing."""
    h, kv, inter = shape["hidden"], shape["kv_heads"] * (shape["hidden"] // shape["heads"]), shape["intermediate"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return 2 * vocab * h + shape["layers"] * per_layer + h


def build_model(folder: Path, shape: dict, device: str, seed: int = 0) -> Path:
    """A random Mistral of ``shape`` with the real Mistral v1 tokenizer, bf16, through the project's builder."""
    from fusechat_core.tiny import build_tiny_model

    if not (folder / "config.json").exists():
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model("mistral", "builtin:mistral-v1", tmp, seed=seed, dtype="bfloat16", device=device, **shape)
        tmp.rename(folder)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class Ctx:
    def __init__(self, args: argparse.Namespace):
        from fusechat_core.models import pick_device

        self.tiny = bool(args.tiny)
        self.work = Path(args.workdir)
        self.device = pick_device(args.device)
        if self.device == "cpu" and not self.tiny:
            raise SystemExit("gpu.py: no GPU visible; on the CPU run with --tiny")
        self.shape = TINY if self.tiny else MISTRAL_7B
        self.seq_len = 128 if self.tiny else 2048
        self.flops, self.flops_source = peak_flops(self.device)

    @property
    def pivot(self) -> Path:
        return self.work / "pivot"

    def built_pivot(self) -> Path:
        """The 7B-shaped pivot the "models" stage writes; built here, inside the calling
        stage's budget, when that stage was cut short (one slow disk must not cost every
        stage that reads the pivot its figures)."""
        if not (self.pivot / "config.json").exists():
            note("the pivot is missing (the models stage was cut short?): building it in this stage")
            build_model(self.pivot, self.shape, self.device)
        return self.pivot


# -- stages -----------------------------------------------------------------------------------

def stage_models(ctx: Ctx) -> None:
    t0 = time.perf_counter()
    build_model(ctx.pivot, ctx.shape, ctx.device)
    sync(ctx.device)
    fig("models_shape", f"mistral hidden {ctx.shape['hidden']}, {ctx.shape['layers']} layers, vocab {VOCAB}, bf16")
    fig("models_params_b", mistral_params(ctx.shape) / 1e9)
    fig("models_write_s", time.perf_counter() - t0)
    fig("disk_free_gib", shutil.disk_usage(ctx.work).free / GIB)


def stage_represent(ctx: Ctx) -> None:
    import torch

    from benchmarks.represent import bare_forward, conversations, padded_batches
    from fusechat_core.config import parse_config
    from fusechat_core.models import formatter_for
    from fusechat_core.plan import RunPlan
    from fusechat_core.represent import _cached_model, encode_rows, represent_model
    from fusechat_core.store import ArtifactStore

    n_rows, batch_tokens, repeats = (4, 2 * 128, 2) if ctx.tiny else (64, 32 * 2048, 2)
    cfg = parse_config({
        "pivot": {"name": "pivot", "path": str(ctx.built_pivot()), "dtype": "bfloat16"},
        "sources": [{"name": "source", "path": str(ctx.pivot), "dtype": "bfloat16"}],
        "data": {"sources": [{"name": "bench", "path": "demo:markov"}]},
        "represent": {"top_k": 10, "batch_tokens": batch_tokens, "max_length": ctx.seq_len, "shards": 1,
                      "device": ctx.device}})
    plan, spec = RunPlan(cfg), cfg.pivot
    # Long chats, cut at max_length by the renderer: every sequence is max_length tokens.
    rows = conversations(n_rows, seed=0, exchanges=(10, 14))

    def store(label: str) -> Any:
        shutil.rmtree(ctx.work / f"represent-{label}", ignore_errors=True)  # nothing found done: computed
        return ArtifactStore(f"file://{ctx.work}/represent-{label}")

    t0 = time.perf_counter()
    represent_model(cfg, store("warmup"), plan, spec, rows=rows[:2])
    sync(ctx.device)
    fig("represent_load_s", time.perf_counter() - t0)  # loading + one small warm-up collection
    model = _cached_model(spec, ctx.device)  # the very model represent_model holds: loaded once
    encoded = encode_rows(formatter_for(spec), rows, ctx.seq_len)
    batches = padded_batches(encoded, cfg.represent.batch_size, ctx.device, batch_tokens)
    tokens = sum(len(e[0]) for e in encoded)
    fig("represent_sequences", len(rows))
    fig("represent_tokens", tokens)
    fig("represent_batch_tokens", batch_tokens)
    fig("represent_batches", len(batches))
    bare_forward(model, batches[:1], ctx.device)  # warm-up of the full-logits path
    fwd, col, ratios, peaks = [], [], [], {"forward": 0, "collect": 0}
    for r in range(repeats):  # back-to-back pairs; the median ratio
        with Peak(ctx.device) as p:
            f = bare_forward(model, batches, ctx.device)[0]
        peaks["forward"] = max(peaks["forward"], p.bytes)
        with Peak(ctx.device) as p:
            t0 = time.perf_counter()
            out = represent_model(cfg, store(str(r)), plan, spec, rows=rows)
            sync(ctx.device)
            c = time.perf_counter() - t0
        peaks["collect"] = max(peaks["collect"], p.bytes)
        assert out[0]["computed"] and out[0]["n_tokens"] == tokens
        fwd.append(f)
        col.append(c)
        ratios.append(c / f)
    n = compute_params(model)
    f_rate, c_rate = tokens / min(fwd), tokens / min(col)
    fig("represent_forward_tokens_per_s", f_rate)
    fig("represent_collect_tokens_per_s", c_rate)
    fig("represent_collect_vs_forward", statistics.median(ratios))
    fig("represent_forward_peak_mem_gib", peaks["forward"] / GIB)
    fig("represent_collect_peak_mem_gib", peaks["collect"] / GIB)
    fig("represent_collect_mem_vs_forward", peaks["collect"] / peaks["forward"])
    fig("represent_forward_mfu", 2 * n * f_rate / ctx.flops)
    fig("represent_collect_mfu", 2 * n * c_rate / ctx.flops)
    del model
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()


def train_layers_that_fit(total_bytes: int, shape: dict, seq_len: int, micro: int) -> tuple[int, float]:
    """The most whole layers whose training footprint fits ``total_bytes`` with 10% to spare.

    Per parameter: float32 weights, gradients and AdamW's two moments (16 bytes) plus the
    bf16 copies autocast keeps during a forward pass (2 bytes); fused AdamW adds no
    temporaries. Activations under gradient checkpointing: each layer's input (float32
    residual stream) plus one layer recomputed at a time, and the logits (bf16, their
    float32 copy and gradient).
    """
    tokens = micro * seq_len
    best = (0, 0.0)
    for layers in range(1, shape["layers"] + 1):
        s = {**shape, "layers": layers}
        acts = tokens * (layers * s["hidden"] * 4 + 16 * s["hidden"] * 2 + 6 * s["intermediate"] * 2
                         + VOCAB * (2 + 4 + 4))
        need = 18 * mistral_params(s) + acts + 2 * GIB  # + CUDA context and allocator slack
        if need <= 0.9 * total_bytes:
            best = (layers, need / GIB)
    return best


class _Stop(Exception):
    """Raised from on_event after the last timed step: the benchmark needs no saved target."""


def stage_train(ctx: Ctx) -> None:
    import gc

    import torch

    from benchmarks.train import make_inputs
    from fusechat_core.config import ModelSpec, TrainConfig
    from fusechat_core.fuse.batches import FusionData
    from fusechat_core.store import ArtifactStore
    from fusechat_core.train import train_target

    batch, micro, steps = (2, 1, 3) if ctx.tiny else (4, 2, 4)
    if ctx.device.startswith("cuda"):
        layers, est = train_layers_that_fit(torch.cuda.get_device_properties(0).total_memory, ctx.shape,
                                            ctx.seq_len, micro)
    else:
        layers, est = ctx.shape["layers"], float("nan")
    data_root = ctx.work / "train-data"
    pivot_dirs, aligned_dirs = make_inputs(data_root, n_seq=batch * 2, seq_len=ctx.seq_len, vocab=VOCAB, k=10,
                                           min_len=ctx.seq_len)
    cfg = TrainConfig(learning_rate=5e-6, batch_size=batch, micro_batch_size=micro, max_steps=steps,
                      checkpoint_every=10_000, mixed_precision="auto", gradient_checkpointing=True,
                      max_length=ctx.seq_len, seed=1)
    while layers > 0:
        shape = {**ctx.shape, "layers": layers}
        folder = build_model(ctx.work / f"train-model-{layers}", shape, ctx.device, seed=1)
        gc.collect()
        if ctx.device.startswith("cuda"):  # the builder's bf16 copy: not this stage's memory
            torch.cuda.empty_cache()
        fig("train_model", f"mistral hidden {shape['hidden']}, {layers} layers, vocab {VOCAB}")
        fig("train_layers", layers)
        fig("train_params_b", mistral_params(shape) / 1e9)
        fig("train_estimated_gib", est)
        fig("train_tokens_per_step", batch * ctx.seq_len)
        n = mistral_params(shape) - VOCAB * shape["hidden"]
        results: dict[str, dict] = {}
        try:
            for mode in ("clm", "fusion"):
                data = FusionData(pivot_dirs, aligned_dirs if mode == "fusion" else None, max_length=ctx.seq_len)
                marks: list[float] = []
                started: dict = {}
                tokens: list[int] = []

                def on_event(e: dict, marks=marks, started=started, tokens=tokens) -> None:
                    if e["event"] in ("start", "step"):
                        sync(ctx.device)
                        marks.append(time.perf_counter())
                    if e["event"] == "start":
                        started.update(e)
                    if e["event"] == "step":
                        tokens.append(e["tokens"])
                        if e["step"] == steps:
                            raise _Stop

                with Peak(ctx.device) as p:
                    try:
                        train_target(cfg, pivot=ModelSpec(name="pivot", path=str(folder)), data=data,
                                     store=ArtifactStore(f"file://{ctx.work}/train-store-{time.time_ns()}"),
                                     address=f"train/{mode}-{layers}", lam=1.0 if mode == "clm" else 0.9,
                                     on_event=on_event)
                    except _Stop:
                        pass
                step_s = statistics.median([b - a for a, b in zip(marks[1:], marks[2:])])  # first step: warm-up
                results[mode] = {"step_s": step_s, "peak": p.bytes, "tok_s": statistics.median(tokens) / step_s}
                if mode == "clm":
                    fig("train_mixed_precision", started.get("mixed_precision"))
                    fig("train_gradient_checkpointing", started.get("gradient_checkpointing"))
                fig(f"train_{mode}_step_s", step_s)
                fig(f"train_{mode}_peak_mem_gib", p.gib)
                fig(f"train_{mode}_tokens_per_s", results[mode]["tok_s"])
                fig(f"train_{mode}_mfu", 6 * n * results[mode]["tok_s"] / ctx.flops)
                gc.collect()
                if ctx.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError:
            note(f"train: out of memory at {layers} layers; trying {layers - 4}")
            gc.collect()
            torch.cuda.empty_cache()
            shutil.rmtree(folder, ignore_errors=True)
            layers -= 4
            continue
        shutil.rmtree(folder, ignore_errors=True)
        fig("train_fusion_vs_clm", results["fusion"]["step_s"] / results["clm"]["step_s"])
        fig("train_fusion_mem_vs_clm", results["fusion"]["peak"] / results["clm"]["peak"])
        return
    raise SystemExit("train: no model size fits")


def _write_targets(pivot: Path, root: Path, device: str) -> dict[str, Path]:
    """Two 'fine-tunes' of the pivot: the pivot plus noise of two sizes, bf16, streamed file by file."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {"pivot": pivot}
    for name, scale, seed in (("target_a", 1e-3, 1), ("target_b", 3e-3, 2)):
        folder = root / name
        if not (folder / "config.json").exists():
            tmp = root / f"{name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(pivot, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
            g = torch.Generator(device=device).manual_seed(seed)
            for f in sorted(pivot.glob("*.safetensors")):
                tensors = load_file(str(f), device=device)
                noisy = {k: (v.float() + torch.randn(v.shape, generator=g, device=device) * scale).to(v.dtype).cpu()
                         for k, v in tensors.items()}
                del tensors
                save_file(noisy, str(tmp / f.name), metadata={"format": "pt"})
                del noisy
            tmp.rename(folder)
        out[name] = folder
    return out


_CPU_MERGE = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from fusechat_core.merge.run import merge_models
method, pivot, a, b, out = sys.argv[1:6]
t0 = time.perf_counter()
merge_models(method, pivot, {{"a": a, "b": b}}, out, dtype="bfloat16", device="cpu")
print(json.dumps({{"wall_s": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def stage_merge(ctx: Ctx) -> None:
    import torch

    from benchmarks.merge import check_varm
    from fusechat_core.merge.run import merge_models

    def run(method: str, models: dict[str, Path], out: Path, device: str) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        with Peak(device) as p:
            t0 = time.perf_counter()
            merge_models(method, str(models["pivot"]), {"a": str(models["target_a"]), "b": str(models["target_b"])},
                         out, dtype="bfloat16", device=device)
            sync(device)
            wall = time.perf_counter() - t0
        return wall, p.bytes

    for left in ctx.work.glob("train-model-*"):  # a train stage cut short leaves its model
        shutil.rmtree(left, ignore_errors=True)
    # On the GPU: three full-size models, when the disk holds two targets and one merged
    # model beside the pivot; else as many whole layers as it holds (merge_gpu_params_b says).
    free = shutil.disk_usage(ctx.work).free + 0.0
    layers, have_pivot = ctx.shape["layers"], (ctx.pivot / "config.json").exists()
    while layers > 1 and (3.1 if layers == ctx.shape["layers"] and have_pivot else 4.1) * 2 * mistral_params(
            {**ctx.shape, "layers": layers}) > free - 2 * GIB:  # bf16; a pivot still to write is a copy more
        layers -= 1
    shape = {**ctx.shape, "layers": layers}
    if layers < ctx.shape["layers"]:
        note(f"merge: {free / GIB:.0f} GiB of disk free: GPU merge over {layers} layers, not {ctx.shape['layers']}")
        pivot = build_model(ctx.work / "merge-gpu" / "pivot", shape, ctx.device, seed=4)
    else:
        pivot = ctx.built_pivot()
    models = _write_targets(pivot, pivot.parent, ctx.device)
    fig("merge_gpu_params_b", mistral_params(shape) / 1e9)
    res = {}
    for method in ("linear", "varm"):
        res[method] = run(method, models, ctx.work / f"merged-{method}", ctx.device)
        fig(f"merge_gpu_{method}_s", res[method][0])
        fig(f"merge_gpu_{method}_peak_mem_gib", res[method][1] / GIB)
        if method == "varm":
            fig("merge_varm_max_error", check_varm(models, ctx.work / "merged-varm", names=(
                "model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight")))
        shutil.rmtree(ctx.work / f"merged-{method}", ignore_errors=True)
    fig("merge_gpu_varm_vs_linear", res["varm"][0] / res["linear"][0])
    fig("merge_gpu_mem_vs_linear", res["varm"][1] / res["linear"][1])
    for name in ("target_a", "target_b"):
        shutil.rmtree(models[name], ignore_errors=True)
    shutil.rmtree(ctx.work / "merge-gpu", ignore_errors=True)
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()

    # Out of core on the CPU: the same layer shape, fewer layers; each merge in a fresh process.
    layers = ctx.shape["layers"] if ctx.tiny else 4
    shape = {**ctx.shape, "layers": layers}
    root = ctx.work / "merge-cpu"
    root.mkdir(exist_ok=True)
    models = _write_targets(build_model(root / "pivot", shape, ctx.device, seed=3), root, ctx.device)
    fig("merge_cpu_layers", layers)
    fig("merge_cpu_params_b", mistral_params(shape) / 1e9)
    res = {}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for method in ("linear", "varm"):
        out = root / f"merged-{method}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", _CPU_MERGE.format(repo=str(REPO)), method,
                               str(models["pivot"]), str(models["target_a"]), str(models["target_b"]), str(out)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"cpu {method} merge failed: {proc.stderr.strip().splitlines()[-1:]}")
        res[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        fig(f"merge_cpu_{method}_s", res[method]["wall_s"])
        fig(f"merge_cpu_{method}_peak_rss_gib", res[method]["peak_rss"] / GIB)
        shutil.rmtree(out, ignore_errors=True)
    fig("merge_cpu_varm_vs_linear", res["varm"]["wall_s"] / res["linear"]["wall_s"])
    fig("merge_cpu_mem_vs_linear", res["varm"]["peak_rss"] / res["linear"]["peak_rss"])
    shutil.rmtree(root, ignore_errors=True)


def stage_evaluate(ctx: Ctx) -> None:
    from fusechat_core.evaluate.loading import EvalModel, load_for_eval
    from fusechat_core.evaluate.mt_bench import answer_questions, load_mt_bench
    from fusechat_core.store import ArtifactStore
    from tests.corpus import write_mt_bench

    n_q, batch, new_tokens = (2, 2, 4) if ctx.tiny else (8, 8, 128)
    data = load_mt_bench(str(write_mt_bench(ctx.work / "mt-bench")))
    # One temperature (the 8 greedy questions of tests/corpus.py): one stream of full batches.
    qs = [q for q in data.questions if q.temperature < 1e-4][:n_q]
    lm, tok, fmt, device = load_for_eval(EvalModel("pivot", str(ctx.built_pivot())), ctx.device)
    for label in ("answers-warmup", "answers"):  # nothing found answered: every answer generated
        shutil.rmtree(ctx.work / label, ignore_errors=True)
    answer_questions(ArtifactStore(str(ctx.work / "answers-warmup")), "mt_bench_answers/warmup", "pivot", lm, tok,
                     fmt, qs[:1], max_new_tokens=2, batch_size=1, progress=lambda m: None)
    with Peak(device) as p:
        t0 = time.perf_counter()
        recs = answer_questions(ArtifactStore(str(ctx.work / "answers")), "mt_bench_answers/bench", "pivot", lm,
                                tok, fmt, qs, max_new_tokens=new_tokens, batch_size=batch, progress=lambda m: None)
        sync(device)
        wall = time.perf_counter() - t0
    n_new = sum(sum(r["new_tokens"]) for r in recs)
    fig("evaluate_questions", f"{len(qs)} × 2 turns")
    fig("evaluate_batch_size", batch)
    fig("evaluate_new_tokens", n_new)
    fig("evaluate_seconds", wall)
    fig("evaluate_tokens_per_s", n_new / wall)
    fig("evaluate_peak_mem_gib", p.gib)


# -- end to end --------------------------------------------------------------------------------

def demo_config(work: Path, label: str, device: str, tiny: bool) -> Path:
    """configs/demo.yaml with every device set; --tiny: fewer rows and steps.

    Both runs share one store: the demo models (pre-trained on the CPU by their own stage)
    and the dataset are the same artifacts for both, made once by the reference run; every
    stage from represent on has its own address per device (``represent.device`` is in it).
    """
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["store"] = f"file://{work / 'e2e-store'}"
    for section in ("represent", "merge", "evaluate"):
        cfg.setdefault(section, {})["device"] = device
    if tiny:
        for src in cfg["data"]["sources"]:
            src["count"] = max(10, src["count"] // 20)
        for m in cfg["demo"]["models"].values():
            m["steps"] = 10
        cfg["train"].update(batch_size=8, micro_batch_size=8, max_steps=2)
        cfg["merge"]["methods_extra"] = ["linear"]
    path = work / f"e2e-{label}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_demo(work: Path, label: str, device: str, tiny: bool, env_extra: dict | None = None) -> dict:
    """``fusechat run`` of the demo config in a child process; its wall time and report."""
    cfg = demo_config(work, label, device, tiny)
    # A fresh PREFECT_HOME starts a cold ephemeral API (migrations): over 20 s on a loaded
    # machine, so the startup timeout is raised before Prefect reads its settings.
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           **os.environ, "PREFECT_HOME": str(work / f"prefect-{label}"), **(env_extra or {})}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg), "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        return {"error": " | ".join(tail), "wall_s": wall}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    report = summary["report"]
    report = report[len("file://"):] if report.startswith("file://") else report
    return {"wall_s": wall, "report": report, "device": device}


def stage_e2e_reference(ctx: Ctx) -> None:
    """The CPU run the e2e stage compares against (started in the background by the parent)."""
    res = run_demo(ctx.work, "reference", "cpu", ctx.tiny, {"CUDA_VISIBLE_DEVICES": ""})
    tmp = ctx.work / "e2e-reference.json.partial"
    tmp.write_text(json.dumps(res))
    tmp.rename(ctx.work / "e2e-reference.json")


def compare_reports(ref: dict, got: dict) -> dict:
    """Every numeric value of the two reports' ``domains`` (model → data source → figure)."""
    diffs: dict[str, float] = {"nll": 0.0, "exact_match": 0.0}
    compared, mismatches = 0, []
    for model, sources in ref["domains"].items():
        for source, vals in sources.items():
            other = got["domains"].get(model, {}).get(source)
            if other is None:
                mismatches.append(f"{model}/{source} missing")
                continue
            for key, v in vals.items():
                w = other.get(key)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v is None:
                    continue
                compared += 1
                if not isinstance(w, (int, float)):
                    mismatches.append(f"{model}/{source}/{key} missing")
                    continue
                kind = "nll" if "nll" in key else ("exact_match" if "exact" in key else None)
                d = abs(float(v) - float(w))
                if kind is not None:
                    diffs[kind] = max(diffs[kind], d)
                    if d > E2E_TOLERANCE[kind]:
                        mismatches.append(f"{model}/{source}/{key} {v:.4f} vs {w:.4f}")
                elif isinstance(v, int) and v != w:  # counts: the same data, the same tokens
                    mismatches.append(f"{model}/{source}/{key} {v} vs {w}")
    signs = []

    def margins(r: dict) -> dict:
        """NLL(clm) − NLL(model) of every target and merge (report.json's fusion section)."""
        out = {}
        for group in ("targets", "merges"):
            for name, entry in ((r.get("fusion") or {}).get(group) or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("margin"), (int, float)):
                    out[name] = entry["margin"]
        return out

    m_ref, m_got = margins(ref), margins(got)
    for name in m_ref:
        if name in m_got:
            signs.append((m_ref[name] > 0) == (m_got[name] > 0))
    return {"compared": compared, "max_nll": diffs["nll"], "max_exact_match": diffs["exact_match"],
            "mismatches": mismatches, "signs": f"{sum(signs)}/{len(signs)}"}


def stage_e2e(ctx: Ctx, deadline: float) -> None:
    # The reference started with the benchmark; it has made the demo models and the dataset
    # by now (on the H200, minutes ago), so the device run below times the stages from
    # represent to report on the device, and never writes an artifact the reference writes.
    ref_file = ctx.work / "e2e-reference.json"
    while not ref_file.exists() and time.time() < deadline:
        time.sleep(0.5)
    if not ref_file.exists():
        raise SystemExit("e2e: the CPU reference run did not finish in time")
    ref = json.loads(ref_file.read_text())
    fig("e2e_reference_device", "cpu")
    if "error" in ref:
        raise SystemExit(f"e2e: the CPU reference run failed: {ref['error']}")
    fig("e2e_reference_wall_s", ref["wall_s"])
    # On the CPU (--tiny) "auto": another represent address than the reference's "cpu", so
    # every stage from represent on is computed again, not found done.
    device = ctx.device if ctx.device.startswith("cuda") else "auto"
    res = run_demo(ctx.work, "device", device, ctx.tiny)
    fig("e2e_device", ctx.device)
    if "error" in res:
        raise SystemExit(f"e2e: the {ctx.device} run failed: {res['error']}")
    fig("e2e_wall_s", res["wall_s"])
    cmp = compare_reports(json.loads(Path(ref["report"]).read_text()), json.loads(Path(res["report"]).read_text()))
    fig("e2e_values_compared", cmp["compared"])
    fig("e2e_max_nll_diff", cmp["max_nll"])
    fig("e2e_max_exact_match_diff", cmp["max_exact_match"])
    fig("e2e_tolerance", f"nll ±{E2E_TOLERANCE['nll']} nats/token, exact_match ±{E2E_TOLERANCE['exact_match']}, "
                         f"counts equal (bf16 autocast training on cuda, float32 evaluation on both)")
    fig("e2e_margin_signs_agree", cmp["signs"])
    for m in cmp["mismatches"][:10]:
        note(f"e2e mismatch: {m}")
    fig("e2e_report_matches", cmp["compared"] > 0 and not cmp["mismatches"])


# -- the parent: one process tree, a budget per stage -------------------------------------------

def _child_cmd(stage: str, args: argparse.Namespace, deadline: float | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--workdir", str(args.workdir),
           "--device", args.device]
    if args.tiny:
        cmd.append("--tiny")
    if deadline is not None:
        cmd += ["--deadline", str(deadline)]
    return cmd


_LIVE: list[subprocess.Popen] = []  # children, each the leader of its own process group


def _on_signal(signum: int, frame: Any) -> None:
    """A stopped benchmark stops its stages too: their groups would outlive it otherwise."""
    for proc in list(_LIVE):
        _kill(proc)
    sys.exit(128 + signum)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_stage(stage: str, args: argparse.Namespace, budget: float, figures: dict) -> str:
    """Run one stage's child under ``budget`` seconds; collect its figures as they print."""
    deadline = time.time() + budget
    proc = subprocess.Popen(_child_cmd(stage, args, deadline), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=REPO)
    _LIVE.append(proc)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(x) for x in proc.stdout], lines.put(None)), daemon=True).start()
    names, last, status = set(FIGURES[stage]), "", "ok"
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            status = f"timeout after {budget:.0f} s"
            _kill(proc)
            break
        if line is None:
            proc.wait()
            if proc.returncode != 0:
                status = f"failed: {last[:200]}"
            break
        line = line.rstrip("\n")
        name, sep, value = line.partition(": ")
        if sep and name in names:
            figures[name] = _parse(value)
            print(line, flush=True)
        elif line.strip():
            last = line.strip()
            if args.verbose or line.startswith("#"):
                print(f"  [{stage}] {line}", flush=True)
    _LIVE.remove(proc)
    for name in FIGURES[stage]:
        if name not in figures:
            figures[name] = None
            print(f"{name}: n/a ({status})", flush=True)
    return status


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy sizes, for the CPU (CI)")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workdir", help="where models and stores go (default: a temporary folder, removed after)")
    p.add_argument("--verbose", action="store_true", help="echo every line the stages print")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="another budget for a stage (a rerun of one stage, say)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:  # a child: one stage
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        ctx = Ctx(args)
        if args.stage == "e2e":
            stage_e2e(ctx, args.deadline or time.time() + 600)
        elif args.stage == "e2e-reference":
            stage_e2e_reference(ctx)
        else:
            globals()[f"stage_{args.stage}"](ctx)
        return 0

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    budgets = dict(TINY_BUDGETS if args.tiny else BUDGETS)
    for item in args.budget:
        stage, _, seconds = item.partition("=")
        if stage not in budgets or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget: {item!r} is not STAGE=SECONDS with STAGE one of {', '.join(budgets)}")
        budgets[stage] = float(seconds)
    t_start = time.time()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    own_workdir = args.workdir is None
    args.workdir = str(Path(args.workdir or tempfile.mkdtemp(prefix="fusechat-gpu-bench-")).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    import torch

    from fusechat_core.models import pick_device

    device = pick_device(args.device)
    flops, source = peak_flops(device)
    for name, value in (("device", device), ("gpu", torch.cuda.get_device_name() if device == "cuda" else "none"),
                        ("peak_tflops", flops / 1e12), ("peak_source", source)):
        figures[name] = value
        fig(name, value)
    plan = (["models"] if {"represent", "merge", "evaluate"} & set(only) else []) + [s for s in STAGES if s in only]
    print(f"# plan: {', '.join(f'{s} {budgets[s]} s' for s in plan)}; total {sum(budgets[s] for s in plan)} s",
          flush=True)
    reference = None
    if "e2e" in only:  # the CPU reference runs beside the GPU stages, in this process tree
        reference = subprocess.Popen(_child_cmd("e2e-reference", args), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO,
                                     env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"})
        _LIVE.append(reference)
    statuses = {}
    try:
        for stage in plan:
            t0 = time.time()
            statuses[stage] = run_stage(stage, args, budgets[stage], figures)
            print(f"# {stage}: {statuses[stage]} in {time.time() - t0:.1f} s", flush=True)
    finally:
        if reference is not None:
            _kill(reference)
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    for stage in STAGES:  # every figure name prints, whatever was selected
        if stage not in plan:
            for name in FIGURES[stage]:
                figures[name] = None
                print(f"{name}: n/a (not selected)", flush=True)
    figures["total_wall_s"] = time.time() - t_start
    fig("total_wall_s", figures["total_wall_s"])
    print(json.dumps({"figures": figures, "stages": statuses, "budgets_s": {s: budgets[s] for s in plan},
                      "tiny": args.tiny}), flush=True)
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
