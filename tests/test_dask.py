"""Representation shards on a 2-worker Dask cluster give the same artifacts as threads."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.tiny_config import tiny_run_config

pytest.importorskip("prefect_dask")


@pytest.mark.slow
def test_dask_cluster_and_threads_write_identical_representations(tmp_path, capsys):
    threads = tiny_run_config(tmp_path, f"file://{tmp_path}/threads")
    raw = yaml.safe_load(threads.read_text())
    raw["store"] = f"file://{tmp_path}/dask"
    raw["runner"] = {"task_runner": "dask", "max_workers": 2}
    dask = tmp_path / "dask.yaml"
    dask.write_text(yaml.safe_dump(raw))

    results = {}
    for name, path in (("threads", threads), ("dask", dask)):
        if name == "dask":
            # Same inputs: the demo models the thread run pre-trained (their CPU training
            # depends on the worker's thread count, which is not what is compared here).
            shutil.copytree(tmp_path / "threads" / "demo_models", tmp_path / "dask" / "demo_models")
        assert main(["run", str(path), "--until", "represent", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
    assert results["dask"]["represent[pivot]"]["state"] == "Completed"
    assert set(results["threads"]) == set(results["dask"])

    a, b = load_config(threads), load_config(dask)
    plan_a, plan_b = RunPlan(a), RunPlan(b)
    store_a, store_b = ArtifactStore(a.store), ArtifactStore(b.store)
    for spec in a.models:
        assert plan_a.represent(spec) == plan_b.represent(spec), "the runner must not change addresses"
        for i in range(a.represent.shards):
            addr = plan_a.represent_shard(spec, i)
            assert store_a.manifest(addr).digest == store_b.manifest(addr).digest, addr
