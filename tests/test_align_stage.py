"""The alignment stage end to end on a real store: real tokenizers, real dataset artifact,
representation shards written to the contract, the Prefect tasks' logic via ``.fn``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from fusechat_core.align import AlignError, open_aligned, read_representation, row_sequence
from fusechat_core.align.vocab import vocabulary
from fusechat_core.chat import IGNORE, ChatFormatter
from fusechat_core.config import parse_config
from fusechat_core.data import build_dataset_artifact, read_split
from fusechat_core.models import load_tokenizer, tokenizer_ref
from fusechat_core.plan import RunPlan
from fusechat_core.represent import Representation, id_dtype, write_shard
from fusechat_core.store import ArtifactStore

K = 4
VARIED = [
    ("Write a Python function that squares a number.",
     "Sure:\n\n```python\ndef square(x):\n    return x * x  # 3 ** 2 == 9\n```\n\nCall it as `square(12)` -> 144."),
    ("Translate 'good morning' to Japanese and German.",
     "おはようございます (ohayō gozaimasu); auf Deutsch: Guten Morgen! 😀"),
    ("List three primes above 1000.", "1009, 1013 and 1019.   They are   prime because none has a divisor ≤ 31."),
    ("What is <s> in a tokenizer?", "It is the [INST] beginning-of-sequence marker </s>, written <s>."),
]


def _dataset_file(tmp_path):
    from tests.corpus import natural_conversations

    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in VARIED]
    rows += [{"conversations": c} for c in natural_conversations(8, chars=500)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("align-stage")
    raw = {
        "name": "align-test", "store": f"file://{tmp / 'store'}",
        "pivot": {"name": "pivot", "path": str(tiny_models["pivot"])},
        "sources": [{"name": "mixtral", "path": str(tiny_models["mixtral"])},
                    {"name": "llama", "path": str(tiny_models["llama"])},
                    {"name": "twin", "path": str(tiny_models["pivot"]), "dtype": "float32"}],
        "data": {"sources": [{"path": str(_dataset_file(tmp)), "name": "chat"}], "max_length": 512,
                 "heldout_fraction": 0.1},
        "represent": {"top_k": K, "max_length": 160, "shards": 2},
        # MinED over tekken's 131k tokens takes ~15 s; it is tested on its own in test_align_vocab
        "align": {"vocab_mapping": "exact"},
    }
    cfg = parse_config(raw)
    store = ArtifactStore(cfg.store)
    plan = RunPlan(cfg)
    build_dataset_artifact(cfg, store, plan.dataset)
    rows = read_split(store, plan.dataset, "train")
    for spec in cfg.models:
        for i in range(cfg.represent.shards):
            write_representation(store, plan.represent_shard(spec, i), spec, rows, i, cfg)
    return cfg, store, plan


def write_representation(store, address, spec, rows, index, cfg, *, tokenizer=None, edit=None):
    """A REPRESENTATION shard from the real tokenisation, written by the representation
    stage's writer. The teacher is synthetic but checkable: its top-1 is the label
    (log 0.7), then three other ids. ``edit(rep)`` may change it before it is written."""
    tok = tokenizer or load_tokenizer(*tokenizer_ref(spec))
    fmt = ChatFormatter(tok, spec.chat_template)
    n = len(rows)
    part = rows[index * n // cfg.represent.shards:(index + 1) * n // cfg.represent.shards]
    ids, seq_off, sup, sup_off, tk, tl, ce = [], [0], [], [0], [], [], []
    lp = np.log([0.7, 0.15, 0.1, 0.05])
    for s, row in enumerate(part):
        r = fmt.encode(row["conversations"], cfg.represent.max_length)
        ids += r.input_ids
        seq_off.append(len(ids))
        pos = [t for t in range(1, len(r.labels)) if r.labels[t] != IGNORE]
        sup += pos
        sup_off.append(len(sup))
        for t in pos:
            label = r.input_ids[t]
            tk.append([label] + [(label + d) % len(tok) for d in (1, 2, 3)])
            tl.append(lp)
        ce.append(1.0 + s)
    dt = id_dtype(len(tok))
    meta = {"model": spec.name, "vocab_size": len(tok), "top_k": K, "row_ids": [r["id"] for r in part],
            "n_seq": len(part), "n_tokens": len(ids), "n_supervised": len(sup), "shard": index,
            "shards": cfg.represent.shards, "tokenizer": tokenizer_ref(spec)[0]}
    rep = Representation(np.array(ids, dt), np.array(seq_off, np.int64), np.array(sup, np.uint16),
                         np.array(sup_off, np.int64), np.array(tk, dt).reshape(-1, K),
                         np.array(tl, np.float16).reshape(-1, K), np.array(ce, np.float32), meta)
    if edit is not None:
        edit(rep)
    with store.writer(address, meta=meta) as w:
        write_shard(w, rep)  # the representation stage's own writer and contract check


def _align_all(cfg, store, plan, name):
    from tasks.align import align_shard, build_vocab_map, finish_align

    spec = plan.model(name)
    config = cfg.model_dump(mode="json")
    build_vocab_map.fn(config, plan.vocab_map(spec), store.url, name)
    refs = [align_shard.fn(config, plan.align_shard(spec, i), store.url, name, i)
            for i in range(cfg.represent.shards)]
    ref = finish_align.fn(config, plan.align(spec), store.url, name)
    assert ref["address"] == plan.align(spec)
    return refs, store.require(ref["address"]).meta


def _aligned(store, address):
    folder = store.fetch(address)
    arrays, meta = load_file(str(folder / "aligned.safetensors")), json.loads((folder / "meta.json").read_text())
    mapped = open_aligned(folder)  # the reader training uses reads back what safetensors reads
    assert mapped.stats == meta and isinstance(mapped.topk_ids, np.memmap)
    for name, want in arrays.items():
        got = getattr(mapped, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want)
    return arrays, meta


def _check_contract(arrays, pivot):
    assert arrays["sup_offsets"].dtype == np.int64 and np.array_equal(arrays["sup_offsets"], pivot.sup_offsets)
    rows = len(pivot.sup_positions)
    assert arrays["topk_ids"].dtype == np.int32 and arrays["topk_ids"].shape == (rows, K)
    assert arrays["topk_logprobs"].dtype == np.float16 and arrays["topk_logprobs"].shape == (rows, K)
    assert arrays["fallback"].dtype == bool and arrays["fallback"].shape == (rows,)
    lp = arrays["topk_logprobs"].astype(np.float32)
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # descending, -inf padding last
    assert (arrays["topk_ids"][np.isneginf(lp)] == 0).all()


def test_identity_source_costs_nothing_and_passes_through(run, monkeypatch):
    cfg, store, plan = run
    import fusechat_core.align as stage

    def boom(*a, **k):
        raise AssertionError("identity must not render or pair sequences")

    monkeypatch.setattr(stage, "pair_sequences", boom)
    _, summary = _align_all(cfg, store, plan, "twin")
    assert summary["identity"] is True and summary["share_fallback"] == 0
    for i in range(cfg.represent.shards):
        pivot = read_representation(store, plan.represent_shard(cfg.pivot, i))
        arrays, meta = _aligned(store, plan.align_shard(plan.model("twin"), i))
        _check_contract(arrays, pivot)
        assert np.array_equal(arrays["topk_ids"], pivot.topk_ids.astype(np.int32))
        assert np.array_equal(arrays["topk_logprobs"], pivot.topk_logprobs)
        assert meta["sequence_alignment"] == "identity"


@pytest.mark.parametrize("name", ["mixtral", "llama"])
def test_sources_land_on_pivot_rows_with_matching_tokens(run, name):
    cfg, store, plan = run
    refs, summary = _align_all(cfg, store, plan, name)
    pv = vocabulary(load_tokenizer(*tokenizer_ref(cfg.pivot)))
    man = store.require(plan.align(plan.model(name)))
    assert [s["digest"] for s in man.meta["shards"]] == [r["digest"] for r in refs]
    for i in range(cfg.represent.shards):
        pivot = read_representation(store, plan.represent_shard(cfg.pivot, i))
        arrays, meta = _aligned(store, plan.align_shard(plan.model(name), i))
        _check_contract(arrays, pivot)
        seq = row_sequence(pivot)
        labels = pivot.input_ids[pivot.seq_offsets[seq] + pivot.sup_positions.astype(np.int64)].astype(np.int64)
        fb = arrays["fallback"]
        # fallback: one-hot on the label (the token at the row's position), log-prob 0
        assert (arrays["topk_ids"][fb, 0] == labels[fb]).all()
        assert (arrays["topk_logprobs"][fb, 0] == 0).all() and np.isneginf(arrays["topk_logprobs"][fb, 1:]).all()
        # paired rows: the source's own top-1 (its label, log 0.7) lands on a pivot token
        # that spells the pivot's label, up to the word-start space
        top1 = arrays["topk_ids"][~fb, 0]
        same = [pv.strings[a].strip() == pv.strings[b].strip() for a, b in zip(top1, labels[~fb])]
        assert np.mean(same) > (0.99 if name == "mixtral" else 0.9), np.mean(same)
        # its log-prob passes through, unless (tekken, exact map) the label token has no pivot twin
        # (tekken's own template puts no space after [/INST], so answers start mid-word)
        kept = np.isclose(arrays["topk_logprobs"][~fb, 0].astype(float), np.log(0.7), atol=2e-3)
        assert kept.mean() == 1.0 if name == "mixtral" else kept.mean() > 0.9, kept.mean()
        src = read_representation(store, plan.represent_shard(plan.model(name), i))
        n_src, n_piv = np.diff(src.sup_offsets), np.diff(pivot.sup_offsets)
        # the source's NLL of the whole supervised text, per pivot token (MinCE's common scale)
        np.testing.assert_allclose(arrays["metric_ce"], src.metric_ce * n_src / n_piv, rtol=1e-6)
        assert meta["sequence_alignment"] == "offsets" and meta["identity"] is False
    assert summary["share_one_to_one"] > (0.9 if name == "mixtral" else 0.6)


def test_killed_shard_is_redone_alone_with_the_same_bytes(run):
    cfg, store, plan = run
    spec = plan.model("mixtral")
    _align_all(cfg, store, plan, "mixtral")
    first, second = plan.align_shard(spec, 0), plan.align_shard(spec, 1)
    before = {a: store.manifest(a).digest for a in (first, second)}
    created = store.manifest(second).created
    store.invalidate(first)  # as if killed before its manifest
    store.invalidate(plan.align(spec))
    assert not store.is_complete(first)
    _align_all(cfg, store, plan, "mixtral")
    assert store.manifest(first).digest == before[first]
    assert store.manifest(second).created == created  # untouched
    assert store.is_complete(plan.align(spec))


def test_representation_made_with_another_tokenizer_is_refused(run, tmp_path):
    cfg, store, plan = run
    spec = plan.model("mixtral")
    rows = read_split(store, plan.dataset, "train")
    other = ArtifactStore(f"file://{tmp_path}")
    for src in (cfg.pivot, spec):
        tok = load_tokenizer("builtin:tekken") if src is spec else None
        write_representation(other, plan.represent_shard(src, 0), src, rows, 0, cfg, tokenizer=tok)
    from fusechat_core.align import align_shard_artifact, build_vocab_map_artifact

    build_vocab_map_artifact(cfg, other, plan.vocab_map(spec), spec)
    other.put_dir(plan.dataset, store.fetch(plan.dataset))
    with pytest.raises(AlignError, match=r"^align mixtral shard 1/\d+: row .*source's re-rendered tokens differ"):
        align_shard_artifact(cfg, other, spec, 0)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_teacher_log_prob_is_refused_naming_shard_and_row(run, tmp_path, value):
    """+inf (or NaN) is no log-prob: the align stage refuses the source's shard when it reads
    it, with one line naming the shard and the row, instead of carrying it into training."""
    cfg, store, plan = run
    spec = plan.model("mixtral")
    rows = read_split(store, plan.dataset, "train")
    other = ArtifactStore(f"file://{tmp_path}")

    def poison(rep):
        rep.topk_logprobs[5, 1] = value

    for src in (cfg.pivot, spec):
        write_representation(other, plan.represent_shard(src, 0), src, rows, 0, cfg,
                             edit=poison if src is spec else None)
    from fusechat_core.align import align_shard_artifact, build_vocab_map_artifact

    build_vocab_map_artifact(cfg, other, plan.vocab_map(spec), spec)
    other.put_dir(plan.dataset, store.fetch(plan.dataset))
    with pytest.raises(AlignError) as err:
        align_shard_artifact(cfg, other, spec, 0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{plan.represent_shard(spec, 0)}: topk_logprobs row 5 is {value}")
    assert not other.is_complete(plan.align_shard(spec, 0))


def test_wrong_address_is_refused(run):
    cfg, store, plan = run
    from tasks.align import align_shard

    with pytest.raises(AlignError, match="not the plan's"):
        align_shard.fn(cfg.model_dump(mode="json"), "align/elsewhere", store.url, "llama", 0)


@pytest.mark.slow
def test_real_representation_stage_to_training_reader(tiny_models, tmp_path):
    """Shards made by the real representation stage (tiny models' forward passes) align,
    and the training stage's reader takes the aligned shards."""
    from fusechat_core.align import align_shard_artifact, build_vocab_map_artifact, finish_align_artifact
    from fusechat_core.fuse.batches import FusionData
    from fusechat_core.represent import commit_representation, represent_model

    raw = {"store": f"file://{tmp_path / 'store'}", "pivot": {"name": "pivot", "path": str(tiny_models["pivot"])},
           "sources": [{"name": "mixtral", "path": str(tiny_models["mixtral"])}],
           "data": {"sources": [{"path": str(_dataset_file(tmp_path)), "name": "chat"}], "max_length": 512,
                    "heldout_fraction": 0.1},
           "represent": {"top_k": 5, "max_length": 128, "shards": 2, "batch_size": 4, "device": "cpu"}}
    cfg = parse_config(raw)
    store, plan = ArtifactStore(cfg.store), RunPlan(cfg)
    build_dataset_artifact(cfg, store, plan.dataset)
    for m in cfg.models:
        represent_model(cfg, store, plan, m)
        commit_representation(cfg, store, plan, m)
    src = cfg.sources[0]
    build_vocab_map_artifact(cfg, store, plan.vocab_map(src), src)
    for i in range(2):
        align_shard_artifact(cfg, store, src, i)
    summary = finish_align_artifact(cfg, store, src)
    assert summary["share_one_to_one"] > 0.9 and summary["sequence_alignment"] == ["offsets"]
    data = FusionData([store.fetch(plan.represent_shard(cfg.pivot, i)) for i in range(2)],
                      [store.fetch(plan.align_shard(src, i)) for i in range(2)])
    batch = data.collate(list(range(min(3, len(data)))), pad_id=0)
    assert batch.teachers[1][0].shape == batch.teachers[0][0].shape
