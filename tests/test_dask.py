"""A 2-worker Dask cluster and the thread runner write the same bytes under the same addresses:
the demo models (pre-trained in the workers, whose OMP_NUM_THREADS=1) and the representation shards."""

from __future__ import annotations

import json

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.tiny_config import tiny_run_config

pytest.importorskip("prefect_dask")


@pytest.mark.slow
def test_dask_cluster_and_threads_write_identical_demo_models_and_representations(tmp_path, capsys):
    threads = tiny_run_config(tmp_path, f"file://{tmp_path}/threads")
    raw = yaml.safe_load(threads.read_text())
    raw["store"] = f"file://{tmp_path}/dask"
    raw["runner"] = {"task_runner": "dask", "max_workers": 2}
    dask = tmp_path / "dask.yaml"
    dask.write_text(yaml.safe_dump(raw))

    results = {}
    for path in (threads, dask):
        name = "threads" if path == threads else "dask"
        assert main(["run", str(path), "--until", "represent", "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
    assert results["dask"]["represent[pivot]"]["state"] == "Completed"
    assert set(results["threads"]) == set(results["dask"])

    a, b = load_config(threads), load_config(dask)
    plan_a, plan_b = RunPlan(a), RunPlan(b)
    store_a, store_b = ArtifactStore(a.store), ArtifactStore(b.store)
    for spec in a.models:
        assert plan_a.represent(spec) == plan_b.represent(spec), "the runner must not change addresses"
        demo = plan_a.demo_model(spec)  # pre-trained on CPU in each runner's own processes
        assert store_a.manifest(demo).digest == store_b.manifest(demo).digest, demo
        for i in range(a.represent.shards):
            addr = plan_a.represent_shard(spec, i)
            assert store_a.manifest(addr).digest == store_b.manifest(addr).digest, addr
