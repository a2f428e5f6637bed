"""benchmarks/gpu.py: the one-command GPU benchmark, exercised on the CPU at toy size.

The tiny run goes through the project's own stages (represent_model, train_target,
merge_models, answer_questions) and must print every figure name of every stage, measured
or ``n/a (why)``, then a JSON summary holding the same names. The sizing arithmetic is
checked against transformers' own parameter count; the end-to-end comparison against
reports made up here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import (
    E2E_TOLERANCE,
    FIGURES,
    MISTRAL_7B,
    STAGES,
    VOCAB,
    compare_reports,
    mistral_params,
    train_layers_that_fit,
)

REPO = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def test_parameter_count_is_transformers_own():
    from transformers import AutoModelForCausalLM, MistralConfig

    for layers in (1, 32):
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                            num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert mistral_params({**MISTRAL_7B, "layers": layers}) == sum(p.numel() for p in model.parameters())


def test_training_size_fits_the_memory_it_is_given():
    # 18 bytes per parameter at least (fp32 weights, grads, two AdamW moments, bf16 copies)
    h200 = int(139.8 * GIB)
    layers, est = train_layers_that_fit(h200, MISTRAL_7B, 2048, 2)
    assert 24 <= layers <= 32 and est * GIB <= 0.9 * h200
    assert est * GIB >= 18 * mistral_params({**MISTRAL_7B, "layers": layers})
    more = train_layers_that_fit(h200 * 2, MISTRAL_7B, 2048, 2)[0]
    assert more == 32  # capped at the 7B shape's own 32 layers
    assert train_layers_that_fit(80 * 10 ** 9, MISTRAL_7B, 2048, 2)[0] < layers


def _report(nll: float, exact: float, margin: float) -> dict:
    return {"domains": {"pivot": {"markov": {"nll": nll, "tokens": 100},
                                  "arithmetic": {"nll": nll + 1, "exact_match": exact, "tokens": 50}}},
            "fusion": {"targets": {}, "merges": {"merge-varm": {"margin": margin, "beats_clm": margin > 0}}}}


def test_reports_compare_within_the_stated_tolerance():
    ref = _report(2.0, 0.10, 0.008)
    same = compare_reports(ref, _report(2.0 + E2E_TOLERANCE["nll"] / 2, 0.10, 0.004))
    assert same["mismatches"] == [] and same["compared"] == 5 and same["signs"] == "1/1"
    assert same["max_nll"] == pytest.approx(E2E_TOLERANCE["nll"] / 2)
    off = compare_reports(ref, _report(2.0 + 2 * E2E_TOLERANCE["nll"], 0.30, -0.001))
    assert len(off["mismatches"]) == 3 and off["signs"] == "0/1"  # two NLLs and the exact match
    counts = _report(2.0, 0.10, 0.008)
    counts["domains"]["pivot"]["markov"]["tokens"] = 99
    assert compare_reports(ref, counts)["mismatches"] == ["pivot/markov/tokens 100 vs 99"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_run_prints_every_figure(tmp_path):
    """Every stage but e2e (two whole Prefect pipeline runs) measured; e2e's names print too."""
    selected = [s for s in STAGES if s != "e2e"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--only",
                           ",".join(selected), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    printed = {}
    for line in lines[:-1]:
        name, sep, value = line.partition(": ")
        if sep and not line.startswith("#"):
            assert name not in printed, f"{name} printed twice"
            printed[name] = value
    every = [n for names in FIGURES.values() for n in names]
    assert sorted(printed) == sorted(every) == sorted(summary["figures"])
    assert summary["stages"] == {s: "ok" for s in ["models", *selected]}
    for stage in ["models", *selected]:
        for name in FIGURES[stage]:
            assert summary["figures"][name] is not None, name  # measured, not n/a
    for name in FIGURES["e2e"]:
        assert printed[name] == "n/a (not selected)"
    f = summary["figures"]
    assert f["device"] == "cpu" and f["peak_tflops"] > 0
    assert f["represent_tokens"] == f["represent_sequences"] * 128  # every chat cut at max_length
    assert f["represent_batches"] == math.ceil(f["represent_sequences"] * 128 / f["represent_batch_tokens"])
    for name in ("represent_collect_mfu", "train_clm_mfu", "train_fusion_mfu"):
        assert 0 < f[name] < 1, name
    assert f["train_gradient_checkpointing"] is True and f["train_mixed_precision"] == "no"
    assert f["merge_varm_max_error"] < 1e-3  # VaRM's formula, to bf16 rounding
    assert f["evaluate_new_tokens"] > 0


def test_a_stage_builds_the_pivot_when_the_models_stage_was_cut_short(tmp_path):
    """On the GPU the "models" stage writes a 14 GB pivot in a 40 s budget; a slow disk would
    cut it short. The stages that read the pivot then build it within their own budget,
    rather than every one of them losing its figures."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--only", "evaluate",
                           "--budget", "models=0.01", "--workdir", str(tmp_path / "work"), "--verbose"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a stage timed out
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["stages"] == {"models": "timeout after 0 s", "evaluate": "ok"}, summary["stages"]
    assert "the pivot is missing" in proc.stdout
    assert summary["figures"]["models_write_s"] is None and summary["figures"]["evaluate_new_tokens"] > 0
