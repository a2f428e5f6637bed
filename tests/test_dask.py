"""The same address gives the same bytes under the thread runner and on a Dask cluster.

A local Dask cluster runs each task in a worker process started with ``OMP_NUM_THREADS=1``
(distributed's ``pre-spawn-environ``); the thread runner computes in the flow's process,
with torch's default of a thread per core. Stages pin their own compute
(``fusechat_core.determinism``), so every artifact, from the demo models' pre-training to
the trained targets, must be byte for byte the same (SPEC §3).
"""

from __future__ import annotations

import json

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.stages import shard_address
from fusechat_core.store import ArtifactStore
from tests.tiny_config import tiny_run_config

pytest.importorskip("prefect_dask")

UNTIL = "train"
COMPARED = ("demo_models", "dataset", "represent", "vocab_map", "align", "train")


def _digests(path) -> dict[str, str]:
    """Every artifact of the run up to training (shards one by one): its manifest's digest,
    which covers the files' bytes only (not the verified marker, not the lease)."""
    cfg = load_config(path)
    store = ArtifactStore(cfg.store)
    out = {}
    for node in RunPlan(cfg).nodes():
        if node.stage not in COMPARED:
            continue
        addresses = [shard_address(node.address, i, node.shards) for i in range(node.shards)] or [node.address]
        for address in addresses:
            man = store.manifest(address)
            assert man is not None and store.is_complete(address), f"{node.label}: {address} not committed"
            out[address] = man.digest
    return out


@pytest.mark.slow
def test_dask_cluster_and_threads_write_identical_artifacts(tmp_path, capsys):
    raw = yaml.safe_load(tiny_run_config(tmp_path, "file://unused").read_text())
    # the tiny run without its tekken source: mapping a 131k vocabulary is most of the run's time
    # on two cores and nothing a runner could change; the Mixtral source and the CLM baseline
    # still give a fusion target and a plain one
    raw["sources"] = [s for s in raw["sources"] if s["name"] == "moe"]
    raw["demo"]["models"].pop("deep")
    paths = {}
    for name, runner in (("threads", {"task_runner": "threads", "max_workers": 2}),
                         ("dask", {"task_runner": "dask", "max_workers": 2})):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**raw, "store": f"file://{tmp_path}/{name}", "runner": runner}))
    threads, dask = paths["threads"], paths["dask"]

    results = {}
    for name, path in (("threads", threads), ("dask", dask)):
        assert main(["run", str(path), "--until", UNTIL, "--json"]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stages"]
    # each run computed every stage itself: nothing was shared between the two stores
    assert set(results["threads"]) == set(results["dask"])
    assert all(r["state"] == "Completed" for run in results.values() for r in run.values()), results
    assert {k.split("[")[0] for k in results["dask"]} >= set(COMPARED) - {"vocab_map"}
    assert {"train[moe]", "train[clm]"} <= set(results["dask"]), sorted(results["dask"])

    assert RunPlan(load_config(threads)).nodes() == RunPlan(load_config(dask)).nodes(), \
        "the runner must not change addresses"
    a, b = _digests(threads), _digests(dask)
    assert len(a) > 10 and a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
