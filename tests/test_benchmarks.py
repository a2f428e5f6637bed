"""The CPU benchmarks under ``benchmarks/`` run to their figures, at toy size.

Each issue's measured numbers come from one of these scripts, and a script that has rotted
is found only when someone needs its numbers: two had (merge.py's VaRM check named
layers 3 and 11, so any ``--layers`` below 12 died after both merges; evaluate.py asserted
160 judgments of a corpus that has 18 questions). Each runs here as a user runs it, in a
process of its own with the smallest arguments it takes, and must exit 0 and print every
figure its issue asks for as ``name: number``. Where a figure has a property that holds at
any size it is checked too (VaRM matches its formula; the offsets aligner's coverage is its
ceiling at full prefix precision; Mistral v3 and v1 tokenise alike). The timings themselves
mean nothing at this size. ``benchmarks/rerun.py`` needs a finished demo store and
``benchmarks/gpu.py`` has its own test (``test_gpu_benchmark.py``).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# script, toy arguments, the figures it must print (a number each)
RUNS = {
    "merge": (["--hidden", "64", "--layers", "2", "--repeats", "1"],
              ["varm_time_vs_linear", "varm_mem_vs_linear"]),
    "train": (["--hidden", "32", "--layers", "1", "--seq-len", "32", "--n-seq", "4", "--batch", "2", "--micro", "1",
               "--steps", "2", "--rounds", "1"],
              ["fusion_step_vs_clm", "verify_share_of_train_epoch", "fusion_peak_mem_vs_clm"]),
    "represent": (["--hidden", "64", "--layers", "1", "--rows", "4", "--max-length", "64", "--repeats", "1",
                   "--skip-tekken"],
                  ["bytes_per_token", "collect_vs_forward", "verify_share_of_represent"]),
    "evaluate": (["--latency", "0.005", "--concurrency", "4", "--questions", "2", "--new-tokens", "2"],
                 ["judge_seconds_c4", "judge_efficiency_c4", "answer_tokens_per_s_b1", "answer_tokens_per_s_b8",
                  "answer_batch_speedup", "resume_ms_per_question", "nll_supervised_tokens_per_s_b1",
                  "nll_supervised_tokens_per_s_b8"]),
    "align": (["--pairs", "4", "--tokens", "64", "--long-pairs", "1", "--stage-seqs", "8", "--stage-tokens", "64",
               "--project-rows", "2000"],
              ["align_speedup_vs_naive_dtw", "agreement_with_dtw", "mined_map_seconds", "verify_share_of_align",
               "project_peak_bytes_per_row", "verify_share_of_align_stage"]),
    "dataset": (["--rows", "500"], ["reader_peak_vs_file", "build_rows_per_s", "build_peak_bytes_per_row"]),
    "demo_floor": (["--samples", "300"],
                   ["markov_floor_bpb", "markov_floor_bpb_stderr", "ballad_floor_bpb", "ballad_floor_bpb_stderr"]),
}


def _run(script: str) -> str:
    args, _ = RUNS[script]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmarks/{script}.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _figures(out: str) -> dict[str, float]:
    figures = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([a-z0-9_]+): (-?[0-9.]+(?:e[-+]?[0-9]+)?)", line.strip())
        if m:
            figures[m.group(1)] = float(m.group(2))
    return figures


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_prints_its_figures(script):
    out = _run(script)
    figures = _figures(out)
    missing = [name for name in RUNS[script][1] if name not in figures]
    assert not missing, f"benchmarks/{script}.py did not print {missing}; its output ends:\n{out[-2000:]}"
    assert all(math.isfinite(figures[name]) for name in RUNS[script][1]), figures
    if script == "merge":
        # the benchmark's VaRM output against the formula in float64, on float32 models
        err = float(re.search(r"max \|error\| ([0-9.e+-]+)", out).group(1))
        assert err < 1e-6, out
    if script == "align":
        # "coverage: tekken→v1 0.8481 | v3→v1 1.0000 (...)": per pair, for the default method
        rows = {}
        for name in ("coverage", "prefix_precision", "ceiling"):
            line = next(x for x in out.splitlines() if x.startswith(f"{name}: "))
            rows[name] = {pair: float(v) for pair, v in re.findall(r"(\S+→v1) ([0-9.]+)", line)}
        assert set(rows["coverage"]) == {"tekken→v1", "v3→v1"}, rows
        # offsets pairs exactly the rows whose prefix ends on a source token boundary
        assert rows["prefix_precision"]["tekken→v1"] == 1.0, rows
        assert rows["coverage"]["tekken→v1"] == rows["ceiling"]["tekken→v1"] < 1.0, rows
        assert rows["coverage"]["v3→v1"] == rows["prefix_precision"]["v3→v1"] == 1.0, rows
    if script == "dataset":
        # the reader holds a line, not the file (it held the file and its lines: 2x)
        assert figures["reader_peak_vs_file"] < 0.25, figures
    if script == "demo_floor":
        # a floor in bits per byte is positive and below 8 (a byte's whole information)
        assert 0 < figures["markov_floor_bpb"] < 8 and 0 < figures["ballad_floor_bpb"] < 8, figures
