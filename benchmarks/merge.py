"""VaRM against mergekit's own linear merge: wall time and peak memory, same three models.

Three Mistral-architecture models of ~150M parameters each (hidden 768, 12
layers, 32k vocabulary, random init; the targets are the pivot plus deltas of
different sizes) are written to a temporary folder, then each merge runs in a
fresh subprocess on mergekit's engine with identical options, alternating
methods over the repetitions:

- linear: mergekit's ``linear`` over the three models (equal weights);
- varm:   our ``varm`` with the pivot as base and the two targets.

Both read every tensor of the three models once and write one model; VaRM needs
no further pass over the weights, so the target is ≤ 1.2× on both figures.
Peak memory is the child's ``ru_maxrss`` (resident set, imports included).

    .venv/bin/python benchmarks/merge.py [--hidden 768 --layers 12 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_models(root: Path, hidden: int, layers: int) -> tuple[dict[str, Path], int, float]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                        intermediate_size=4 * hidden, max_position_embeddings=2048, tie_word_embeddings=False,
                        sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    pivot = root / "pivot"
    model.save_pretrained(pivot)
    del model
    base = {}
    for f in sorted(pivot.glob("*.safetensors")):
        base.update(load_file(f))
    out = {"pivot": pivot}
    for name, scale, seed in (("target_a", 1e-3, 1), ("target_b", 3e-3, 2)):
        g = torch.Generator().manual_seed(seed)
        folder = root / name
        shutil.copytree(pivot, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        tensors = {k: v + torch.randn(v.shape, generator=g) * scale for k, v in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        out[name] = folder
    return out, n_params, time.perf_counter() - t0


CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
t_import = time.perf_counter()
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
import fusechat_core.merge.varm  # registers varm
method, pivot, a, b, out = sys.argv[1:6]
if method == "linear":
    raw = {{"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
            "models": [{{"model": m, "parameters": {{"weight": 1.0}}}} for m in (pivot, a, b)]}}
else:
    raw = {{"merge_method": "varm", "dtype": "float32", "out_dtype": "float32", "base_model": pivot,
            "models": [{{"model": a}}, {{"model": b}}]}}
cfg = MergeConfiguration.model_validate(raw)
opts = MergeOptions(device="cpu", quiet=True, copy_tokenizer=False, write_model_card=False,
                    out_shard_size=2_000_000_000)
t0 = time.perf_counter()
run_merge(cfg, out, opts)
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_child(method: str, models: dict[str, Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    code = CHILD.format(repo=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, method, str(models["pivot"]), str(models["target_a"]),
                           str(models["target_b"]), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_varm(models: dict[str, Path], out: Path, names: tuple[str, ...] | None = None) -> float:
    """The benchmark's VaRM output is the formula's, on a few tensors (float64 reference):
    by default the embedding, the first layer's query and the last layer's down projection,
    whatever ``--layers`` made."""
    from safetensors import safe_open

    if names is None:
        last = json.loads((models["pivot"] / "config.json").read_text())["num_hidden_layers"] - 1
        names = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 f"model.layers.{last}.mlp.down_proj.weight")

    def get(folder: Path, name: str):
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name).double()
        raise KeyError(name)

    worst = 0.0
    for name in names:
        p = get(models["pivot"], name)
        d = [get(models[t], name) - p for t in ("target_a", "target_b")]
        ms = [x.pow(2).mean().item() for x in d]
        want = p + sum(m / sum(ms) * x for m, x in zip(ms, d))
        worst = max(worst, (get(out, name) - want).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", help="where the models go (default: a temporary folder, removed after)")
    args = ap.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fusechat-merge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        models, n_params, save_s = build_models(root, args.hidden, args.layers)
        size_gb = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e9
        print(f"models: 3 × {n_params / 1e6:.1f}M parameters (float32, {size_gb:.2f} GB on disk); "
              f"building and saving took {save_s:.1f} s (not counted below)")
        print(f"cpu threads: {os.cpu_count()}, torch threads default")
        results: dict[str, list[dict]] = {"linear": [], "varm": []}
        # one untimed warm-up so both methods see the same page cache
        run_child("linear", models, root / "out-warmup")
        for rep in range(args.repeats):
            order = ("linear", "varm") if rep % 2 == 0 else ("varm", "linear")
            for method in order:
                r = run_child(method, models, root / f"out-{method}")
                results[method].append(r)
                print(f"  rep {rep + 1} {method:<6}: {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_mb']:8.1f} MB")
        err = check_varm(models, root / "out-varm")
        print(f"varm output vs the formula (float64 reference, 3 tensors): max |error| {err:.2e}")
        t = {m: statistics.median(x["wall_s"] for x in v) for m, v in results.items()}
        mem = {m: statistics.median(x["peak_rss_mb"] for x in v) for m, v in results.items()}
        print(f"linear (mergekit): {t['linear']:.2f} s, {mem['linear']:.1f} MB peak RSS (median of {args.repeats})")
        print(f"varm (fusechat):   {t['varm']:.2f} s, {mem['varm']:.1f} MB peak RSS (median of {args.repeats})")
        print(f"varm_time_vs_linear: {t['varm'] / t['linear']:.3f}")
        print(f"varm_mem_vs_linear: {mem['varm'] / mem['linear']:.3f}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
