"""The damage drill on a finished run's store (``damage_drill``), shared by the pipeline-level tests."""

from __future__ import annotations

import io
import json
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from fusechat_core.plan import RunPlan
from fusechat_core.store import _HOST, MANIFEST, ArtifactStore
from tests.prefect_server import final_task_runs, latest_flow_run


def _flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))


def damage_drill(plan: RunPlan, run_args: list[str], status_args: list[str], api_url: str) -> None:
    """Damage a finished run on a local store: a flipped byte in a source's representation
    shard and in a target's ``model.safetensors``, a truncated aligned shard, a manifest naming
    ``../../../../etc/passwd``, a killed writer's temporary file. Then ``status --verify`` must
    exit 1 naming exactly those as damaged; the rerun (``run_args``, against the Prefect API
    at ``api_url``) must recompute exactly those (their tasks Completed, every other task
    Cached) to the same bytes, leave the report as it was, and remove the temporary file."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = ArtifactStore(plan.cfg.store)
    root = Path(store.root)
    first, second = plan.cfg.sources[0], plan.cfg.sources[1]
    flipped_shard, flipped_target = plan.represent_shard(first, 1), plan.train(second.name)
    truncated, escaping = plan.align_shard(second, 0), plan.evaluate(plan.cfg.pivot.name)
    damaged = {flipped_shard, flipped_target, truncated, escaping}
    digests = {a: store.manifest(a).digest for a in damaged}
    report = (root / plan.report() / "report.json").read_bytes()

    _flip_a_byte(root / flipped_shard / "representation.safetensors")
    _flip_a_byte(root / flipped_target / "model.safetensors")
    aligned = root / truncated / "aligned.safetensors"
    aligned.write_bytes(aligned.read_bytes()[:100])
    raw = json.loads((root / escaping / MANIFEST).read_text())
    raw["files"][0]["path"] = "../../../../etc/passwd"  # outside-path: refused
    (root / escaping / MANIFEST).write_text(json.dumps(raw))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = root / flipped_target / f"model.safetensors.tmp-{_HOST}-{dead.pid}-1"  # a killed writer's
    stale.write_bytes(b"half a model")

    def cli(*args: str) -> subprocess.CompletedProcess:
        """The CLI in this process: what it reads is the store, not anything a process keeps (a
        process of its own would only import torch, transformers and Prefect again)."""
        from flows.cli import main

        out, err = io.StringIO(), io.StringIO()
        with temporary_settings({PREFECT_API_URL: api_url}), redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

    status = cli(*status_args, "--verify", "--json")
    assert status.returncode == 1, status.stderr[-2000:]
    rows = {r["stage"]: r for r in json.loads(status.stdout.strip().splitlines()[-1])}
    bad = {k: r["reason"] for k, r in rows.items() if r["state"] == "damaged"}
    pivot = plan.cfg.pivot.name
    assert set(bad) == {f"represent[{first.name}]", f"train[{second.name}]", f"align[{second.name}]",
                        f"evaluate[{pivot}]"}, bad
    assert "sha256" in bad[f"represent[{first.name}]"] and "sha256" in bad[f"train[{second.name}]"]
    assert "has 100 bytes" in bad[f"align[{second.name}]"] and "not a path inside" in bad[f"evaluate[{pivot}]"]
    assert {r["state"] for k, r in rows.items() if k not in bad} == {"done"}
    assert "damaged" in status.stderr
    # true sizes: a representation counts its shards, not only its own manifest's files
    spec = plan.cfg.pivot
    shards = [plan.represent_shard(spec, i) for i in range(plan.cfg.represent.shards)]
    on_disk = sum(p.stat().st_size for a in shards for p in (root / a).iterdir() if p.name in
                  {f.path for f in store.manifest(a).files})
    assert rows[f"represent[{pivot}]"]["size"] == store.manifest(plan.represent(spec)).size + on_disk

    rerun = cli(*run_args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        run = latest_flow_run(client, plan.cfg.name)
        task_runs = final_task_runs(client, run.id)
    states = {r.name: r.state.name for r in task_runs}
    n = plan.cfg.represent.shards
    recomputed = {f"represent[model={first.name}, shard=2/{n}]", f"align[source={second.name}, shard=1/{n}]",
                  f"train[target={second.name}]", f"evaluate[model={pivot}]"}
    assert {name for name, s in states.items() if s != "Cached"} == recomputed, states
    assert all(states[name] == "Completed" for name in recomputed), states
    assert {a: store.manifest(a).digest for a in damaged} == digests, "recomputed to other bytes"
    assert (root / plan.report() / "report.json").read_bytes() == report
    assert not stale.exists()
    again = cli(*status_args, "--verify", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {r["state"] for r in json.loads(again.stdout.strip().splitlines()[-1])} == {"done"}
