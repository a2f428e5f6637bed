"""``represent.batch_tokens``: batches cut by a budget of padded tokens instead of a count.

Checked against the definition (every batch's sequences × longest length within the
budget, every row once, longest first), against a ``batch_size`` run of the same
batches (byte-identical shard files) and of other batches (same figures within float
tolerance), and for the address rule: a config that never sets ``batch_tokens`` keeps the
address it always had.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fusechat_core.chat import ChatFormatter
from fusechat_core.config import ConfigError, ModelSpec, RepresentConfig, parse_config
from fusechat_core.models import load_causal_lm, load_tokenizer
from fusechat_core.plan import RunPlan
from fusechat_core.represent import (
    REPRESENTATION_FILE,
    RepresentError,
    collect_shard,
    encode_rows,
    length_batches,
    write_shard,
)
from fusechat_core.stages import stage_address
from fusechat_core.store import ArtifactStore


@pytest.mark.parametrize("seed", range(5))
def test_batches_never_exceed_the_budget_and_cover_every_row_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    budget = rng.randint(300, 3000)
    batches = length_batches(lengths, 8, batch_tokens=budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [i for b in batches for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b, nxt in zip(batches, batches[1:] + [None]):
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget
        if nxt is not None:  # greedy: the next row would not have fitted
            assert (len(b) + 1) * max(lengths[i] for i in b + [nxt[0]]) > budget
    # a count, not a budget, when none is given: the old behaviour
    assert [len(b) for b in length_batches(lengths, 8)] == [min(8, len(lengths) - i)
                                                           for i in range(0, len(lengths), 8)]


def test_a_budget_below_max_length_is_a_config_error_and_a_long_row_a_clear_one():
    with pytest.raises(ValueError, match="batch_tokens"):
        RepresentConfig(max_length=512, batch_tokens=256)
    with pytest.raises(RepresentError, match="batch_tokens"):
        length_batches([10, 600], 8, batch_tokens=512)


def _rows() -> list[dict]:
    from fusechat_core.data.synthetic import generate

    rows = list(generate("markov", 5, 2)) + list(generate("arithmetic", 4, 2))
    return [{**r, "id": f"row-{i}"} for i, r in enumerate(rows)]


def _shard_bytes(tmp_path, label, rep) -> bytes:
    store = ArtifactStore(f"file://{tmp_path / label}")
    with store.writer("represent/x/shard-00000-of-00001") as w:
        write_shard(w, rep)
    return (store.fetch("represent/x/shard-00000-of-00001") / REPRESENTATION_FILE).read_bytes()


def test_representations_equal_a_batch_size_run(tiny_models, tmp_path):
    folder = tiny_models["pivot"]
    model = load_causal_lm(ModelSpec(name="pivot", path=str(folder)), "cpu")
    tok = load_tokenizer(str(folder))
    fmt = ChatFormatter(tok)
    rows = _rows()
    lengths = [len(ids) for ids, _ in encode_rows(fmt, rows, 64)]
    longest = max(lengths)
    assert longest <= 64 and min(lengths) <= 32  # nothing cut; short rows can share a batch

    def run(**kw):
        return collect_shard(model, tok, fmt, rows, RepresentConfig(top_k=5, max_length=64, **kw), "cpu",
                             meta={"model": "pivot"})

    # The same batches (one batch of all rows): the same bytes.
    whole = len(rows) * longest
    assert length_batches(lengths, len(rows), whole) == length_batches(lengths, len(rows))
    by_count = run(batch_size=len(rows))
    by_tokens = run(batch_tokens=whole)
    assert _shard_bytes(tmp_path, "count", by_count) == _shard_bytes(tmp_path, "tokens", by_tokens)
    assert by_count.meta == by_tokens.meta

    # Other batches (a budget of one max_length row: short rows share a batch): the same
    # sequences and tokens, the same figures up to float rounding of other shapes.
    assert max(len(b) for b in length_batches(lengths, 1, 64)) > 1
    small = run(batch_tokens=64)
    single = run(batch_size=1)
    for name in ("input_ids", "seq_offsets", "sup_positions", "sup_offsets"):
        assert np.array_equal(getattr(small, name), getattr(single, name))
    np.testing.assert_allclose(small.topk_logprobs.astype(np.float32), single.topk_logprobs.astype(np.float32),
                               atol=2e-3)
    np.testing.assert_allclose(small.metric_ce, single.metric_ce, rtol=1e-4)
    agree = (small.topk_ids == single.topk_ids).mean()
    assert agree > 0.99  # ids differ only where two log-probs tie to rounding


def _cfg(represent: dict):
    return parse_config({
        "pivot": {"name": "p", "path": "org/pivot"}, "sources": [{"name": "s", "path": "org/source"}],
        "data": {"sources": [{"name": "d", "path": "org/data"}]}, "represent": represent})


def test_address_stays_for_configs_without_a_budget_and_follows_the_setting_in_use():
    cfg = _cfg({"top_k": 10, "batch_size": 8})
    plan = RunPlan(cfg)
    # The section as it was before batch_tokens existed (written out by hand).
    old = {"top_k": 10, "batch_size": 8, "max_length": 2048, "shards": 1, "device": "auto"}
    want = stage_address("represent", {"model": plan.identity(cfg.pivot), "represent": old},
                         {"dataset": plan.dataset}, key="p")
    assert plan.represent(cfg.pivot) == want
    a = RunPlan(_cfg({"batch_size": 8, "batch_tokens": 4096})).represent(cfg.pivot)
    b = RunPlan(_cfg({"batch_size": 32, "batch_tokens": 4096})).represent(cfg.pivot)
    c = RunPlan(_cfg({"batch_size": 8, "batch_tokens": 8192})).represent(cfg.pivot)
    assert a == b != c and a != want  # batch_size is unused under a budget; the budget counts
    with pytest.raises(ConfigError, match=r"^represent\.batch_tokens: "):
        _cfg({"batch_tokens": 1000})
