"""The tiny run config that pipeline-level tests share: every stage, small enough for CI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml


def tiny_run_config(folder: Path, store: str, name: str = "tiny", gpu_tag: bool = False) -> Path:
    """A complete run small enough for CI: three architectures, two vocabularies.

    The pipeline-level drills (resume, preemption, deployment, Dask, incremental fusion) test
    orchestration, so the sources speak Mistral v3 against the pivot's v1: a real alignment
    (32,768 → 32,000), at half the CPU of a tekken source, whose 131,072-token MinED vocabulary
    map and head dominated every tiny run. Byte-level BPE end to end is the demo's llama
    (tests/test_demo.py) and the align stage's tests on real tekken shards.

    ``name`` names the flow runs: a test that finds its run on the shared Prefect server by name
    gives one no other test uses.

    No GPU tag by default, as for any CPU-only run (``configs/demo.yaml``): with a one-slot
    limit the model-holding tasks take turns, each polling the server for the freed slot
    (Prefect's Retry-After grows with the queue), which doubled a tiny run's wall time. With
    ``gpu_tag=True`` the tag is this config folder's own (tests/test_dask.py checks the
    limit): a run killed while holding a slot of a tag other tests share would stall their
    GPU tasks for the slot's lease.
    """
    cfg = {
        "name": name,
        "store": store,
        "seed": 1,
        "pivot": {"name": "pivot", "path": "demo:pivot", "tokenizer": "builtin:mistral-v1", "dtype": "float32"},
        "sources": [{"name": "moe", "path": "demo:moe", "tokenizer": "builtin:mistral-v3", "dtype": "float32"},
                    {"name": "deep", "path": "demo:deep", "tokenizer": "builtin:mistral-v3", "dtype": "float32"}],
        "data": {"sources": [{"name": "markov", "path": "demo:markov", "count": 12},
                             {"name": "arithmetic", "path": "demo:arithmetic", "count": 12}],
                 "max_length": 96, "heldout_fraction": 0.25},
        "represent": {"top_k": 4, "batch_size": 8, "max_length": 96, "shards": 2},
        "train": {"learning_rate": 1e-3, "batch_size": 4, "micro_batch_size": 2, "epochs": 1, "max_steps": 3,
                  "checkpoint_every": 2, "clm_baseline": True, "mixed_precision": "no"},
        "merge": {"method": "varm", "methods_extra": ["linear"]},
        "evaluate": {"exact_match_sources": ["arithmetic"], "exact_match_max_new_tokens": 4, "batch_size": 8},
        "runner": {"max_workers": 2,
                   "gpu_tag": "gpu-" + hashlib.sha256(str(folder).encode()).hexdigest()[:8] if gpu_tag else None},
        "demo": {"batch_size": 4, "max_length": 64, "models": {
            "pivot": {"arch": "mistral", "hidden": 32, "intermediate": 64, "steps": 2, "domains": {"markov": 1}},
            "moe": {"arch": "mixtral", "hidden": 32, "intermediate": 64, "steps": 2, "domains": {"markov": 1}},
            "deep": {"arch": "llama", "hidden": 32, "intermediate": 64, "layers": 3, "steps": 2,
                     "domains": {"arithmetic": 1}}}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
