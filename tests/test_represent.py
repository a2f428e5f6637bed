"""Source representations on tiny real models of the paper's three architectures.

Independent checks: an unpadded full forward pass of the same model per sequence,
``torch.topk(log_softmax(logits))`` and ``F.cross_entropy`` on the chat formatter's own
labels; a fresh uninterrupted run for the resume test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusechat_core.chat import IGNORE, ChatFormatter
from fusechat_core.config import ModelSpec, RepresentConfig, parse_config
from fusechat_core.data import build_dataset_artifact, read_split
from fusechat_core.models import ModelLoadError, load_causal_lm, load_tokenizer
from fusechat_core.plan import RunPlan
from fusechat_core.represent import (
    ARRAYS,
    META_FILE,
    REPRESENTATION_FILE,
    Representation,
    RepresentError,
    collect_shard,
    commit_representation,
    read_shard,
    represent_model,
    same_tokenization,
    shard_rows,
    write_shard,
)
from fusechat_core.store import MANIFEST, ArtifactStore

REPO = Path(__file__).resolve().parents[1]
K = 6


def _rows() -> list[dict]:
    """Conversations of different lengths, one of them multi-turn, so batches need padding."""
    from fusechat_core.data.synthetic import generate

    rows = list(generate("markov", 4, 1)) + list(generate("arithmetic", 2, 1))
    rows.append({"conversations": [{"from": "human", "value": "Hi there, who are you?"},
                                   {"from": "gpt", "value": "A small model. How can I help?"},
                                   {"from": "human", "value": "Reverse the word: stone"},
                                   {"from": "gpt", "value": "enots"}]})
    return [{**r, "id": f"row-{i}"} for i, r in enumerate(rows)]


def _direct(model, ids: np.ndarray, labels: np.ndarray, k: int):
    """Top-k and CE from a plain, unpadded forward pass of one sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    pos = np.nonzero(labels != IGNORE)[0]
    pos = pos[pos >= 1]
    top = torch.topk(lp[pos - 1], k, dim=-1)
    tgt = torch.as_tensor(labels[1:])
    ce = F.cross_entropy(logits[:-1], tgt, ignore_index=IGNORE).item() if len(pos) else float("nan")
    return pos, top.indices.numpy(), top.values.numpy(), ce


@pytest.mark.parametrize("name", ["pivot", "mixtral", "llama"])
def test_topk_and_ce_equal_a_direct_forward(tiny_models, tmp_path, name):
    folder = tiny_models[name]
    spec = ModelSpec(name=name, path=str(folder))
    model = load_causal_lm(spec, "cpu")
    tok = load_tokenizer(str(folder))
    fmt = ChatFormatter(tok)
    rows = _rows()
    cfg = RepresentConfig(top_k=K, batch_size=3, max_length=512)
    rep = collect_shard(model, tok, fmt, rows, cfg, "cpu", meta={"model": name})

    vocab = model.config.vocab_size
    want_ids = np.uint16 if vocab < 65536 else np.int32
    assert rep.input_ids.dtype == want_ids and rep.topk_ids.dtype == want_ids
    assert rep.topk_logprobs.dtype == np.float16 and rep.sup_positions.dtype == np.uint16
    assert rep.n_seq == len(rows) and rep.meta["row_ids"] == [r["id"] for r in rows]

    # Round trip through the store: what a reader sees is what was computed.
    store = ArtifactStore(f"file://{tmp_path}/store")
    with store.writer("represent/x/shard-00000-of-00001") as w:
        write_shard(w, rep)
    rep = read_shard(store, "represent/x/shard-00000-of-00001")

    lengths = set()
    for s, row in enumerate(rows):
        r = fmt.encode(row["conversations"], cfg.max_length)
        ids, labels = np.asarray(r.input_ids), np.asarray(r.labels)
        lengths.add(len(ids))
        pos, top_ids, top_lp, ce = _direct(model, ids, labels, K)
        np.testing.assert_array_equal(rep.ids(s).astype(np.int64), ids)
        # masked positions are absent: exactly the supervised positions are stored
        np.testing.assert_array_equal(rep.sup_positions[rep.rows(s)].astype(np.int64), pos)
        got_lp = rep.topk_logprobs[rep.rows(s)].astype(np.float32)
        np.testing.assert_allclose(got_lp, top_lp, rtol=2e-3, atol=2e-3)
        got_ids = rep.topk_ids[rep.rows(s)].astype(np.int64)
        # ids agree wherever their log-probs are not a near tie (random tiny models have some)
        distinct = np.abs(top_lp[:, :, None] - top_lp[:, None, :]) + np.eye(K) * 1 > 1e-4
        clear = distinct.all(axis=2)
        assert clear.mean() > 0.5
        np.testing.assert_array_equal(got_ids[clear], top_ids[clear])
        assert np.all(np.diff(got_lp, axis=1) <= 0)  # descending
        assert rep.metric_ce[s] == pytest.approx(ce, rel=1e-4)
    assert len(lengths) > 1  # the batches did hold padding


def _small_shard() -> Representation:
    """Three sequences (10, 5, 15 tokens), the middle one without supervision."""
    rng = np.random.default_rng(0)
    sup = [np.arange(1, 10), np.arange(0), np.arange(1, 15)]
    rows, k = sum(map(len, sup)), 4
    return Representation(
        input_ids=rng.integers(0, 60000, 30).astype(np.uint16), seq_offsets=np.array([0, 10, 15, 30], np.int64),
        sup_positions=np.concatenate(sup).astype(np.uint16), sup_offsets=np.array([0, 9, 9, 23], np.int64),
        topk_ids=rng.integers(0, 60000, (rows, k)).astype(np.uint16),
        topk_logprobs=-np.sort(rng.random((rows, k)), axis=1).astype(np.float16),
        metric_ce=np.array([1.5, np.nan, 0.25], np.float32), meta={"row_ids": ["a", "b", "c"], "top_k": k})


def test_the_one_reader_maps_the_file_and_reads_back_what_was_written(tmp_path):
    """read_shard (the reader alignment and training share) hands out arrays backed by the
    shard file, so opening a shard never copies its top-k tables into memory."""
    from safetensors.numpy import load_file

    store = ArtifactStore(f"file://{tmp_path}/store")
    want = _small_shard()
    with store.writer("represent/x/shard-00000-of-00001") as w:
        write_shard(w, want)
    rep = read_shard(store, "represent/x/shard-00000-of-00001")
    path = store.fetch("represent/x/shard-00000-of-00001") / REPRESENTATION_FILE
    independent = load_file(str(path))  # safetensors' own reader
    for name in ARRAYS:
        got = getattr(rep, name)
        assert got.dtype == getattr(want, name).dtype and got.shape == getattr(want, name).shape, name
        np.testing.assert_array_equal(got, getattr(want, name))
        np.testing.assert_array_equal(got, independent[name])
    assert rep.meta == want.meta
    for name in ("input_ids", "sup_positions", "topk_ids", "topk_logprobs"):
        arr = getattr(rep, name)
        assert isinstance(arr, np.memmap) and arr.base is not None and Path(arr.filename) == path.resolve(), name
        assert not arr.flags.writeable and not arr.flags.owndata, name
    # a batch's rows are a view of the mapping, not a copy of the table
    assert np.shares_memory(rep.topk_ids[rep.rows(2)], rep.topk_ids)
    # one mapping of the file, each array a view of it: a file descriptor per file, not per
    # array (a training rank held 64 shards × 12 arrays: 768 descriptors, over a common 1024 limit)
    import gc

    del got, arr
    del rep
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    held = [read_shard(store, "represent/x/shard-00000-of-00001") for _ in range(5)]
    assert len(os.listdir("/proc/self/fd")) - fds == 5 and len(held) == 5


def test_the_one_reader_refuses_broken_shards(tmp_path):
    import shutil

    from safetensors.numpy import save_file

    from fusechat_core.represent import open_shard

    store = ArtifactStore(f"file://{tmp_path}/store")
    with store.writer("represent/x/shard-00000-of-00001") as w:
        write_shard(w, _small_shard())
    folder = shutil.copytree(store.fetch("represent/x/shard-00000-of-00001"), tmp_path / "copy")
    path = folder / REPRESENTATION_FILE
    path.write_bytes(path.read_bytes()[:-40])  # truncated: the last tensor runs past the end
    with pytest.raises(RepresentError, match="copy/representation.safetensors: unreadable"):
        open_shard(folder)
    arrays = {n: a for n, a in _small_shard().arrays().items() if n != "metric_ce"}
    save_file(arrays, str(path))
    with pytest.raises(RepresentError, match="missing arrays metric_ce"):
        open_shard(folder)
    save_file({**arrays, "metric_ce": np.zeros(2, np.float32)}, str(path))
    with pytest.raises(RepresentError, match=r"metric_ce must be \[3\]"):
        open_shard(folder, "shard 0")


def test_full_forward_path_equals_head_only_path(tiny_models):
    folder = tiny_models["mixtral"]
    model = load_causal_lm(ModelSpec(name="m", path=str(folder)), "cpu")
    tok = load_tokenizer(str(folder))
    cfg = RepresentConfig(top_k=K, batch_size=4)
    a = collect_shard(model, tok, ChatFormatter(tok), _rows(), cfg, "cpu", head_only=True)
    b = collect_shard(model, tok, ChatFormatter(tok), _rows(), cfg, "cpu", head_only=False)
    assert a.meta["head_only"] and not b.meta["head_only"]
    np.testing.assert_allclose(a.topk_logprobs.astype(np.float32), b.topk_logprobs.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(a.metric_ce, b.metric_ce, rtol=1e-5)


def test_sequence_without_supervision_is_kept_with_nan_ce(tiny_models):
    folder = tiny_models["pivot"]
    model = load_causal_lm(ModelSpec(name="p", path=str(folder)), "cpu")
    tok = load_tokenizer(str(folder))
    fmt = ChatFormatter(tok)
    long_question = {"id": "cut", "conversations": [{"from": "human", "value": "word " * 40},
                                                    {"from": "gpt", "value": "answer"}]}
    rows = [_rows()[4], long_question, _rows()[5]]
    rep = collect_shard(model, tok, fmt, rows, RepresentConfig(top_k=3, max_length=20, batch_size=2), "cpu")
    assert rep.n_seq == 3 and len(rep.ids(1)) == 20
    assert rep.rows(1).start == rep.rows(1).stop and np.isnan(rep.metric_ce[1])
    assert rep.meta["n_without_supervision"] == 1
    assert np.isfinite(rep.metric_ce[[0, 2]]).all()
    # the row longer than max_length is kept, cut, and listed as cut (a cut view)
    longer = [i for i, r in enumerate(rows) if len(fmt.encode(r["conversations"]).input_ids) > 20]
    assert 1 in longer and rep.meta["cut_rows"] == longer and rep.meta["n_cut"] == len(longer)


def test_top_k_larger_than_vocabulary_is_a_clear_error(tiny_models):
    folder = tiny_models["pivot"]
    model = load_causal_lm(ModelSpec(name="p", path=str(folder)), "cpu")
    tok = load_tokenizer(str(folder))
    with pytest.raises(RepresentError, match="represent.top_k"):
        collect_shard(model, tok, ChatFormatter(tok), _rows()[:1], RepresentConfig(top_k=256).model_copy(
            update={"top_k": 10**6}), "cpu")


def test_load_causal_lm_errors_name_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="'src'.*demo"):
        load_causal_lm(ModelSpec(name="src", path="demo:src"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="'bad': cannot load"):
        load_causal_lm(ModelSpec(name="bad", path=str(tmp_path / "empty")))
    from fusechat_core.models import pick_device

    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            pick_device("cuda")


# -- the stage: shards, resume, commit, same-tokenization ----------------------------------------------

def _run_config(tiny_models, store_url: str, shards: int, extra_sources=()) -> dict:
    return {
        "name": "represent-test",
        "store": store_url,
        "seed": 5,
        "pivot": {"name": "pivot", "path": str(tiny_models["pivot"])},
        "sources": [{"name": "mixtral", "path": str(tiny_models["mixtral"])},
                    {"name": "llama", "path": str(tiny_models["llama"])}, *extra_sources],
        "data": {"sources": [{"path": "demo:markov", "count": 9}, {"path": "demo:arithmetic", "count": 5}],
                 "heldout_fraction": 0.1, "max_length": 256},
        "represent": {"top_k": 4, "batch_size": 4, "max_length": 256, "shards": shards, "device": "cpu"},
    }


def _setup(tiny_models, tmp_path, shards, extra_sources=()):
    raw = _run_config(tiny_models, f"file://{tmp_path}/store", shards, extra_sources)
    cfg = parse_config(raw)
    store = ArtifactStore(cfg.store)
    plan = RunPlan(cfg)
    build_dataset_artifact(cfg, store, plan.dataset)
    return raw, cfg, store, plan


_KILL_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from fusechat_core.config import parse_config
    from fusechat_core.plan import RunPlan
    from fusechat_core.represent import represent_model
    from fusechat_core.store import ArtifactStore

    cfg = parse_config(json.loads(sys.argv[1]))
    store, plan = ArtifactStore(cfg.store), RunPlan(cfg)
    spec = plan.model(sys.argv[2])
    kill_at = int(sys.argv[3])

    def progress(event):
        # From shard kill_at on, the process dies (SIGKILL, as a preempted node) right after the
        # shard's data file is written, before its meta and manifest exist.
        if event["event"] == "batch" and event["shard"] == kill_at:
            os.environ["FUSECHAT_KILL_AFTER_FILE"] = "representation.safetensors"

    represent_model(cfg, store, plan, spec, progress=progress)
""")


def test_killed_stage_reruns_only_missing_shards(tiny_models, tmp_path):
    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=4)
    spec = plan.model("mixtral")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(raw), "mixtral", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    addresses = [plan.represent_shard(spec, i) for i in range(4)]
    assert [store.is_complete(a) for a in addresses] == [True, True, False, False]
    root = Path(store.root)
    assert (root / addresses[2] / REPRESENTATION_FILE).exists()  # the torn shard's orphan file
    before = {i: ((root / addresses[i] / MANIFEST).stat().st_mtime_ns,
                  (root / addresses[i] / REPRESENTATION_FILE).stat().st_mtime_ns,
                  store.manifest(addresses[i]).created) for i in (0, 1)}

    # A resumed run computes exactly the missing shards and leaves the complete ones untouched.
    summaries = represent_model(cfg, store, plan, spec)
    assert [s["computed"] for s in summaries] == [False, False, True, True]
    for i in (0, 1):
        assert ((root / addresses[i] / MANIFEST).stat().st_mtime_ns,
                (root / addresses[i] / REPRESENTATION_FILE).stat().st_mtime_ns,
                store.manifest(addresses[i]).created) == before[i]
    assert all(store.is_complete(a) for a in addresses)

    # ... and ends where an uninterrupted run ends, byte for byte.
    fresh = ArtifactStore(f"file://{tmp_path}/fresh")
    fresh_cfg = cfg.model_copy(update={"store": fresh.url})
    build_dataset_artifact(fresh_cfg, fresh, plan.dataset)
    represent_model(fresh_cfg, fresh, plan, spec)
    for a in addresses:
        assert store.manifest(a).digest == fresh.manifest(a).digest

    # The stage artifact lists its shards; its rows are the dataset's, in order, with none lost.
    man = commit_representation(cfg, store, plan, spec)
    assert store.is_complete(plan.represent(spec))
    assert [s["address"] for s in man.meta["shards"]] == addresses
    train = read_split(store, plan.dataset, "train")
    assert man.meta["n_seq"] == len(train)
    ids = [rid for a in addresses for rid in store.read_json(a, META_FILE)["row_ids"]]
    assert ids == [r["id"] for r in train]
    for i, a in enumerate(addresses):
        assert store.read_json(a, META_FILE)["row_ids"] == [train[j]["id"] for j in shard_rows(len(train), i, 4)]


def test_a_shard_s_error_names_the_model_and_the_shard(tiny_models, tmp_path):
    """An error inside a shard (a budget, a row, a token id) said neither which model nor which
    of 64 shards at paper scale: the task's one line now does."""
    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=2)
    pivot = plan.model("pivot")
    big = cfg.model_copy(update={"represent": cfg.represent.model_copy(update={"top_k": 10**6})})
    with pytest.raises(RepresentError, match=r"^represent pivot shard 2/2: .*represent\.top_k"):
        represent_model(big, store, plan, pivot, 1)


def test_commit_refuses_shards_computed_on_different_devices(tiny_models, tmp_path):
    """`represent.device: auto` on a pod that sees no GPU (a missing GPU limit) computes its
    shards on the CPU: other last bits than the GPU shards beside them, under one address, and
    they were committed as one artifact. The shard's manifest says where it ran; commit refuses
    a mixture, naming the devices and shards. (The GPU shard here is a CPU one that says cuda:
    this machine has no GPU; what is tested is the refusal.)"""
    import shutil

    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=2)
    pivot = plan.model("pivot")
    represent_model(cfg, store, plan, pivot)
    assert {store.manifest(plan.represent_shard(pivot, i)).meta["device"] for i in range(2)} == {"cpu"}
    second = plan.represent_shard(pivot, 1)
    folder = tmp_path / "gpu-shard"
    shutil.copytree(store.fetch(second), folder, ignore=shutil.ignore_patterns(".*", MANIFEST))
    store.delete(second)
    store.put_dir(second, folder, meta={**store.manifest(plan.represent_shard(pivot, 0)).meta, "device": "cuda",
                                        "shard": 1})
    with pytest.raises(RepresentError, match=r"^represent pivot: shards were computed on different devices "
                                             r"\(cpu: shards \[0\]; cuda: shards \[1\]\)"):
        commit_representation(cfg, store, plan, pivot)


def test_commit_refuses_missing_shards_and_same_tokenization(tiny_models, tmp_path):
    twin = {"name": "twin", "path": str(tiny_models["pivot"])}
    other_template = {"name": "chatml", "path": str(tiny_models["pivot"]), "chat_template": "chatml"}
    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=2, extra_sources=(twin, other_template))
    pivot = plan.model("pivot")
    represent_model(cfg, store, plan, pivot, 0)
    with pytest.raises(RepresentError, match=r"shards \[1\] of 2 are not complete"):
        commit_representation(cfg, store, plan, pivot)
    mans = {}
    for name in ("pivot", "twin", "chatml", "mixtral"):
        spec = plan.model(name)
        represent_model(cfg, store, plan, spec)
        mans[name] = commit_representation(cfg, store, plan, spec)
    assert same_tokenization(mans["pivot"], mans["twin"])
    assert not same_tokenization(mans["pivot"], mans["chatml"])  # same vocabulary, other rendering
    assert not same_tokenization(mans["pivot"], mans["mixtral"])  # another vocabulary
    a = read_shard(store, plan.represent_shard(pivot, 1))
    b = read_shard(store, plan.represent_shard(plan.model("twin"), 1))
    assert same_tokenization(a, b) and np.array_equal(a.input_ids, b.input_ids)
    # the check is what it claims: ids really differ where it says so
    c = read_shard(store, plan.represent_shard(plan.model("chatml"), 1))
    assert c.input_ids.shape != a.input_ids.shape or not np.array_equal(c.input_ids, a.input_ids)


def test_prefect_flow_maps_shards_and_skips_them_on_rerun(tiny_models, tmp_path):
    from prefect import flow

    from tasks._stage import result_storage_for
    from tasks.represent import submit_represent

    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=2)
    cfg = cfg.model_copy(update={"sources": cfg.sources[:1]})  # pivot and mixtral: 4 shard tasks
    plan = RunPlan(cfg)
    build_dataset_artifact(cfg, store, plan.dataset)  # the tokenizers are inputs of the dataset

    @flow(name="represent-test")
    def run_represent() -> dict:
        futures, _ = submit_represent(cfg, plan, result_storage=result_storage_for(cfg.store))
        return {name: (f.result(), f.state.name) for name, f in futures.items()}

    state = run_represent(return_state=True)
    first, first_run = state.result(), state.state_details.flow_run_id
    assert {n: s for n, (_, s) in first.items()} == {"pivot": "Completed", "mixtral": "Completed"}
    for spec in cfg.models:
        man = store.require(plan.represent(spec))
        assert first[spec.name][0]["digest"] == man.digest
        assert [s["address"] for s in man.meta["shards"]] == [plan.represent_shard(spec, i) for i in range(2)]
    # the last commit let go of the model: the stages after this one get the GPU
    from fusechat_core import represent as represent_module

    assert not represent_module._MODEL_SLOT
    # every computed shard left a progress artifact, finished at 100 %
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:  # this flow run's: the server is the session's
        made = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first_run])))
        progress = [a for a in made if a.type == "progress" and "Representations of" in (a.description or "")]
    assert len(progress) >= 4 and all(a.data == 100.0 for a in progress)
    # one shard lost (a wiped prefix, a torn write): only it and its commit run again
    lost = plan.represent_shard(plan.model("mixtral"), 1)
    kept = plan.represent_shard(plan.model("mixtral"), 0)
    kept_created = store.manifest(kept).created
    store.delete(lost)
    store.invalidate(plan.represent(plan.model("mixtral")))
    second = run_represent()
    assert second["pivot"][1] == "Cached" and second["mixtral"][1] == "Completed"
    assert store.is_complete(lost) and store.manifest(kept).created == kept_created
    assert second["mixtral"][0]["digest"] == first["mixtral"][0]["digest"]


def test_a_failed_shard_fails_the_run_with_its_own_error(tiny_models, tmp_path, monkeypatch):
    """Prefect leaves a model's commit Pending when one of its shards fails: the run must fail
    with the shard's error (its one line names the row), not "Run is in PENDING state"."""
    from flows.pipeline import fusechat_pipeline
    from fusechat_core import represent as represent_module

    raw, cfg, store, plan = _setup(tiny_models, tmp_path, shards=2)
    cfg = cfg.model_copy(update={"sources": cfg.sources[:1]})  # pivot and mixtral
    plan = RunPlan(cfg)
    real = represent_module.collect_shard

    def failing(*args, meta=None, **kwargs):  # a fault in one shard, as a bad row would be
        if meta["model"] == "mixtral" and meta["shard"] == 1:
            raise RepresentError("represent mixtral shard 1: row row-5: no supervised token")
        return real(*args, meta=meta, **kwargs)

    monkeypatch.setattr(represent_module, "collect_shard", failing)
    with pytest.raises(RepresentError, match="row row-5: no supervised token"):
        fusechat_pipeline(config=cfg.model_dump(mode="json"), until="represent")
    mixtral = plan.model("mixtral")
    assert store.is_complete(plan.represent_shard(mixtral, 0)), "the good shard is kept for the rerun"
    assert not store.is_complete(plan.represent_shard(mixtral, 1))
    assert not store.is_complete(plan.represent(mixtral))
    assert store.is_complete(plan.represent(plan.model("pivot")))


def test_built_demo_model_loads_with_its_own_tokenizer(tiny_models):
    from fusechat_core.models import register_built_model
    from fusechat_core.represent import tokenizer_of

    spec = ModelSpec(name="built", path="demo:represent-test-built")
    with pytest.raises(ModelLoadError, match="'built'"):
        tokenizer_of(spec)
    register_built_model(spec.path, str(tiny_models["llama"]))
    assert len(tokenizer_of(spec)) == 131072  # the folder's tekken, not a default
    assert load_causal_lm(spec, "cpu").config.vocab_size == 131072
    # an explicit tokenizer reference wins over the folder's
    assert len(tokenizer_of(spec.model_copy(update={"tokenizer": "builtin:mistral-v1"}))) == 32000


def test_stage_on_s3_reads_back_what_a_local_store_holds(tiny_models, tmp_path, s3_env):
    raw, cfg, local, plan = _setup(tiny_models, tmp_path, shards=2)
    spec = plan.model("pivot")
    represent_model(cfg, local, plan, spec)
    s3_cfg = cfg.model_copy(update={"store": f"s3://fusechat-test/represent-{tmp_path.name}"})
    s3 = ArtifactStore(s3_cfg.store)
    build_dataset_artifact(s3_cfg, s3, plan.dataset)
    summaries = represent_model(s3_cfg, s3, plan, spec)
    assert all(s["computed"] for s in summaries)
    man = commit_representation(s3_cfg, s3, plan, spec)
    assert s3.is_complete(plan.represent(spec), verify=True) and man.meta["n_seq"] > 0
    for i in range(2):
        address = plan.represent_shard(spec, i)
        assert s3.manifest(address).digest == local.manifest(address).digest
        a, b = read_shard(s3, address), read_shard(local, address)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        assert a.meta == b.meta
