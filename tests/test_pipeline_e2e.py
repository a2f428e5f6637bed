"""The whole DAG on a tiny world: every stage runs, then a rerun does no work at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore


def tiny_run_config(folder: Path, store: str) -> Path:
    """A complete run small enough for CI: three architectures, three tokenizers."""
    cfg = {
        "name": "tiny",
        "store": store,
        "seed": 1,
        "pivot": {"name": "pivot", "path": "demo:pivot", "tokenizer": "builtin:mistral-v1", "dtype": "float32"},
        "sources": [{"name": "moe", "path": "demo:moe", "tokenizer": "builtin:mistral-v3", "dtype": "float32"},
                    {"name": "deep", "path": "demo:deep", "tokenizer": "builtin:tekken", "dtype": "float32"}],
        "data": {"sources": [{"name": "markov", "path": "demo:markov", "count": 12},
                             {"name": "arithmetic", "path": "demo:arithmetic", "count": 12}],
                 "max_length": 96, "heldout_fraction": 0.25},
        "represent": {"top_k": 4, "batch_size": 8, "max_length": 96, "shards": 2},
        "train": {"learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 2, "epochs": 1, "max_steps": 3,
                  "checkpoint_every": 2, "clm_baseline": True, "mixed_precision": "no"},
        "merge": {"method": "varm", "methods_extra": ["linear"]},
        "evaluate": {"exact_match_sources": ["arithmetic"], "exact_match_max_new_tokens": 4, "batch_size": 8},
        "runner": {"max_workers": 2},
        "demo": {"batch_size": 4, "max_length": 64, "models": {
            "pivot": {"arch": "mistral", "hidden": 32, "intermediate": 64, "steps": 2, "domains": {"markov": 1}},
            "moe": {"arch": "mixtral", "hidden": 32, "intermediate": 64, "steps": 2, "domains": {"markov": 1}},
            "deep": {"arch": "llama", "hidden": 32, "intermediate": 64, "layers": 3, "steps": 2,
                     "domains": {"arithmetic": 1}}}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path, capsys) -> dict:
    code = main(["run", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    return json.loads(out.strip().splitlines()[-1])["stages"]


@pytest.mark.slow
def test_whole_pipeline_then_noop_rerun(tmp_path, capsys):
    path = tiny_run_config(tmp_path, f"file://{tmp_path}/store")
    cfg = load_config(path)
    plan = RunPlan(cfg)
    first = _run(path, capsys)
    expected = {n.label for n in plan.nodes() if n.stage not in ("vocab_map", "mt_bench_answers")}
    expected |= {f"vocab_map[{s.name}]" for s in cfg.sources}
    assert expected <= set(first), expected - set(first)
    assert all(r["state"] == "Completed" for r in first.values()), {k: r["state"] for k, r in first.items()}
    # every address the flow used is the plan's
    for node in plan.nodes():
        if node.label in first:
            assert first[node.label]["address"] == node.address

    store = ArtifactStore(cfg.store)
    report = store.read_json(plan.report(), "report.json")
    names = json.dumps(report)
    for model in ["pivot", "moe", "deep", "target-moe", "target-deep", "clm", "merge-varm", "merge-linear"]:
        assert f'"{model}"' in names, model

    second = _run(path, capsys)
    assert {k: r["state"] for k, r in second.items()} == {k: "Cached" for k in first}
    assert {k: r["digest"] for k, r in second.items()} == {k: r["digest"] for k, r in first.items()}

    assert main(["status", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["state"] for r in rows} == {"done"}, [r for r in rows if r["state"] != "done"]
