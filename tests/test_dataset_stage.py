"""The dataset stage in a real Prefect flow: build, skip when done, rebuild when needed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config
from fusechat_core.data import read_split
from fusechat_core.plan import RunPlan
from fusechat_core.store import LEASE, MANIFEST, VERIFIED, ArtifactStore

REPO = Path(__file__).resolve().parents[1]

GOOD_SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
    for i in range(30)
]
BROKEN_SHAREGPT = [
    ("invalid_json", '{"conversations": [ {"from": "human"'),
    # the greeting goes (a repair), and then nothing is answered
    ("no_assistant_turn",
     json.dumps({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "?"}]})),
    ("empty_turn", json.dumps({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]})),
    ("non_alternating", json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                                       {"from": "gpt", "value": "c"}]})),
    ("missing_conversations", json.dumps({"text": "no conversation here"})),
    ("invalid_json", "not json at all"),
]
GOOD_ALPACA = [{"instruction": f"Do task {i}", "input": "" if i % 2 else f"with input {i}", "output": f"Done {i}."}
               for i in range(20)]
BROKEN_ALPACA = [
    ("missing_output", json.dumps({"instruction": "no output"})),
    ("non_text_value", json.dumps({"instruction": "x", "output": 42})),
]
# A long conversation that must be split into blocks under max_length.
LONG = {"conversations": sum(([{"from": "human", "value": f"Turn {i}: " + "tell me more " * 20},
                               {"from": "gpt", "value": "Sure, " + "here is more detail " * 20}]
                              for i in range(6)), [])}


def _write_sources(folder: Path) -> tuple[Path, Path]:
    sg = folder / "chat.jsonl"
    lines = [json.dumps(r) for r in GOOD_SHAREGPT] + [b for _, b in BROKEN_SHAREGPT]
    lines += [json.dumps(GOOD_SHAREGPT[0]), json.dumps(LONG)]  # one exact duplicate, one long
    sg.write_text("\n".join(lines) + "\n")
    al = folder / "alpaca.jsonl"
    al.write_text("\n".join([json.dumps(r) for r in GOOD_ALPACA] + [b for _, b in BROKEN_ALPACA]) + "\n")
    return sg, al


def _config(folder: Path, store: str, chat_count: int | None = None) -> Path:
    sg, al = _write_sources(folder)
    cfg = {
        "name": "dataset-test",
        "store": store,
        "seed": 3,
        # hub ids that are never downloaded: the dataset stage needs only the tokenizers
        "pivot": {"name": "pivot", "path": "example/pivot-model", "tokenizer": "builtin:mistral-v1"},
        "sources": [{"name": "src", "path": "example/source-model", "tokenizer": "builtin:mistral-v3"}],
        "data": {"sources": [{"name": "chat", "path": str(sg), "format": "sharegpt", "count": chat_count},
                             {"name": "alpaca", "path": str(al), "format": "alpaca"}],
                 "max_length": 200, "heldout_fraction": 0.1},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path, capsys, *extra: str) -> dict:
    code = main(["run", str(path), "--until", "dataset", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])["stages"]["dataset"]


def _expected_skips(rows):
    out: dict[str, int] = {}
    for reason, _ in rows:
        out[reason] = out.get(reason, 0) + 1
    return out


def test_dataset_builds_skips_and_rebuilds(tmp_path, capsys):
    store_url = f"file://{tmp_path}/store"
    cfg_path = _config(tmp_path, store_url)
    first = _run(cfg_path, capsys)
    assert first["state"] == "Completed"
    store = ArtifactStore(store_url)
    stats = store.read_json(first["address"], "stats.json")
    assert stats["sources"]["chat"]["skipped"] == _expected_skips(BROKEN_SHAREGPT)
    assert stats["sources"]["alpaca"]["skipped"] == _expected_skips(BROKEN_ALPACA)
    # each reason's first row, by its line in the file: the broken lines follow the good ones
    where = {}
    for n, (reason, _) in enumerate(BROKEN_SHAREGPT, len(GOOD_SHAREGPT) + 1):
        where.setdefault(reason, f"chat.jsonl line {n}")
    assert stats["sources"]["chat"]["first_skipped"] == where
    assert stats["sources"]["chat"]["duplicates"] == 1
    assert stats["skipped_total"] == len(BROKEN_SHAREGPT) + len(BROKEN_ALPACA)

    rows = read_split(store, first["address"], "train") + read_split(store, first["address"], "heldout")
    # every good conversation is present exactly once (blocks of the long one aside)
    firsts = sorted(r["conversations"][0]["value"] for r in rows
                    if not r["conversations"][0]["value"].startswith("Turn"))
    assert firsts == sorted([r["conversations"][0]["value"] for r in GOOD_SHAREGPT] +
                            [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in GOOD_ALPACA])
    for r in rows:
        roles = [t["from"] for t in r["conversations"]]
        assert roles[0] == "human" and roles[-1] == "gpt"
        assert all(a != b for a, b in zip(roles, roles[1:]))
    # the long conversation is split into blocks that each fit max_length under both tokenizers
    from fusechat_core.models import load_tokenizer

    toks = [load_tokenizer("builtin:mistral-v1"), load_tokenizer("builtin:mistral-v3")]
    long_blocks = [r for r in rows if r["conversations"][0]["value"].startswith("Turn")]
    assert len(long_blocks) > 1
    for r in long_blocks:
        n = max(sum(len(t(x["value"], add_special_tokens=False)["input_ids"]) + 8 for x in r["conversations"])
                for t in toks)
        assert n <= 200
    assert [t for r in sorted(long_blocks, key=lambda r: r["id"]) for t in r["conversations"]] == \
        [{"from": t["from"], "value": t["value"].strip()} for t in LONG["conversations"]]

    mtime = os.path.getmtime(Path(store.root) / first["address"] / "train.parquet")
    second = _run(cfg_path, capsys)
    assert second["state"] == "Cached" and second["address"] == first["address"]
    assert second["digest"] == first["digest"]
    assert os.path.getmtime(Path(store.root) / first["address"] / "train.parquet") == mtime

    # a changed source count changes the address and rebuilds
    changed = _run(_config(tmp_path, store_url, chat_count=10), capsys)
    assert changed["state"] == "Completed" and changed["address"] != first["address"]
    assert store.read_json(changed["address"], "stats.json")["sources"]["chat"]["sampled"] == 10

    # a deleted manifest rebuilds, even though Prefect has a cached record
    (Path(store.root) / first["address"] / MANIFEST).unlink()
    rebuilt = _run(_config(tmp_path, store_url), capsys)
    assert rebuilt["state"] == "Completed" and rebuilt["address"] == first["address"]
    assert rebuilt["digest"] == first["digest"]


def _digests(store: ArtifactStore, address: str) -> dict[str, str]:
    root = Path(store.root) / address
    # the manifest and the store's bookkeeping (verified marker, lease) are not the artifact's bytes
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())
            if p.name not in (MANIFEST, VERIFIED, LEASE)}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group; when it dies, its whole group dies with it,
    as on a preempted node (the ephemeral Prefect server it started included)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env={**os.environ, **env},
                                stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, code, out.read(), err.read())


@pytest.mark.slow
def test_sigkill_mid_write_then_rerun_equals_uninterrupted(tmp_path, prefect_server, capsys):
    api = prefect_server.client_env(tmp_path / "prefect-home")  # the killed run starts no API of its own
    killed_store = f"file://{tmp_path}/killed"
    clean_store = f"file://{tmp_path}/clean"
    cfg_path = _config(tmp_path, killed_store)
    address = RunPlan(load_config(cfg_path)).dataset

    # die right after train.parquet is written, before the manifest: a preempted node
    proc = _cli(["run", str(cfg_path), "--until", "dataset"], {**api, "FUSECHAT_KILL_AFTER_FILE": "train.parquet"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = ArtifactStore(killed_store)
    assert (Path(store.root) / address / "train.parquet").exists()
    assert not store.is_complete(address)
    # what the node left is read in processes that were not killed: here (no torch import to pay for again)
    assert main(["status", str(cfg_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in status if r["stage"] == "dataset"] == ["partial"]

    again = _run(cfg_path, capsys)
    assert again["state"] == "Completed"
    assert store.is_complete(address, verify=True)

    clean = _run(cfg_path, capsys, "--store", clean_store)
    assert clean["state"] == "Completed"
    assert _digests(store, address) == _digests(ArtifactStore(clean_store), address)
    # the data is real: same row count as the stats say
    assert pq.read_table(Path(store.root) / address / "train.parquet").num_rows == \
        store.read_json(address, "stats.json")["train"]


def test_dataset_stage_on_s3(tmp_path, capsys, s3_env):
    store_url = "s3://fusechat-test/dataset-stage-" + tmp_path.name
    cfg_path = _config(tmp_path, store_url)
    first = _run(cfg_path, capsys)
    second = _run(cfg_path, capsys)
    assert (first["state"], second["state"]) == ("Completed", "Cached")
    assert ArtifactStore(store_url).is_complete(first["address"], verify=True)


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_a_shard_reads_only_the_row_groups_its_rows_are_in(scheme, tmp_path, request, monkeypatch):
    """Each of 64 shard tasks held the whole 95k-conversation split to slice its rows out of
    it (and on S3 streamed all of it): a span now reads the row groups it overlaps, and is
    the same rows as the whole split sliced, across group boundaries and empty."""
    import pyarrow.parquet as pq_mod

    from fusechat_core.data.build import ROW_GROUP_ROWS, Mixture, split_size, split_table, write_mixture

    if scheme == "s3":
        request.getfixturevalue("s3_env")
        store = ArtifactStore(f"s3://fusechat-test/{os.urandom(6).hex()}")
        monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    else:
        store = ArtifactStore(f"file://{tmp_path}/store")
    n = 2 * ROW_GROUP_ROWS + 100
    rows = [{"id": f"s-{i:06d}", "source": "s", "conversations": [{"from": "human", "value": f"q{i}"},
                                                                  {"from": "gpt", "value": f"a{i}"}]}
            for i in range(n)]
    with store.writer("dataset/x") as w:
        write_mixture(w, Mixture(rows, [], {}))
    assert split_size(store, "dataset/x") == n
    read: list[list[int]] = []
    real = pq_mod.ParquetFile.read_row_groups
    monkeypatch.setattr(pq_mod.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: read.append(list(groups)) or real(self, groups, **kw))
    for span, groups in ((range(0, 10), [0]), (range(ROW_GROUP_ROWS - 5, ROW_GROUP_ROWS + 5), [0, 1]),
                         (range(2 * ROW_GROUP_ROWS, n), [2]), (range(n, n), None)):
        read.clear()
        assert split_table(store, "dataset/x", rows=span).to_pylist() == rows[span.start:span.stop]
        assert read == ([groups] if groups else [])
    assert split_table(store, "dataset/x", columns=["id"], rows=range(5, 7)).to_pylist() == [
        {"id": "s-000005"}, {"id": "s-000006"}]
