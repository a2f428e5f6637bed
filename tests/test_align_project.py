"""Projection of a source's top-k onto the pivot's rows, checked against hand-worked expectations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusechat_core.align.project import project, same_sequences
from fusechat_core.align.vocab import EXACT, MINED, UNMAPPED, VocabMap
from fusechat_core.represent import Representation

NEG = -np.inf


def _rep(seqs, sup, topk_ids, topk_lp, ce, vocab=64):
    lens = [len(s) for s in seqs]
    return Representation(
        input_ids=np.concatenate([np.asarray(s, np.uint16) for s in seqs]),
        seq_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        sup_positions=np.concatenate([np.asarray(p, np.uint16) for p in sup]),
        sup_offsets=np.concatenate([[0], np.cumsum([len(p) for p in sup])]).astype(np.int64),
        topk_ids=np.asarray(topk_ids, np.uint16).reshape(-1, 3),
        topk_logprobs=np.asarray(topk_lp, np.float16).reshape(-1, 3),
        metric_ce=np.asarray(ce, np.float32), meta={"vocab_size": vocab})


def _vmap(entries, size=64):
    ids = np.full(size, -1, np.int32)
    kind = np.zeros(size, np.uint8)
    for s, (p, k) in entries.items():
        ids[s], kind[s] = p, k
    return VocabMap(ids, kind, np.where(kind == EXACT, 0, np.where(kind == MINED, 1, -1)).astype(np.int32))


@pytest.fixture
def case():
    # sequence 0: pivot 1 10 11 12 13 (targets at 2, 3, 4); source 1 20 21 22 (targets at 1, 2, 3)
    # sequence 1: pivot 1 30 31 (targets 1, 2);              source 1 40 41 (target 2 only)
    pivot = _rep([[1, 10, 11, 12, 13], [1, 30, 31]], [[2, 3, 4], [1, 2]],
                 np.arange(15) % 7, np.full(15, -1.0), [2.0, 3.0])
    source = _rep([[1, 20, 21, 22], [1, 40, 41]], [[1, 2, 3], [2]],
                  [[5, 6, 7], [20, 21, 22], [23, 24, 25], [26, 27, 28]],
                  [[-0.3, -0.4, -0.5], [-0.1, -1.0, -2.0], [-0.5, -0.7, -3.0], [-0.2, -0.3, -0.4]],
                  [1.5, 0.5])
    vmap = _vmap({20: (10, EXACT), 21: (10, MINED), 22: (12, EXACT),  # 21 lands on 10 too
                  23: (-1, UNMAPPED), 24: (-1, UNMAPPED), 25: (-1, UNMAPPED),
                  26: (31, EXACT), 27: (5, EXACT), 28: (31, MINED)})
    # pivot token -> paired source token: seq 0: 2<->2, 3 unpaired, 4<->3; seq 1: identity
    pairing = [np.array([0, 1, 2, -1, 3]), np.array([0, 1, 2])]
    return pivot, source, vmap, pairing


def test_hand_worked_projection(case):
    pivot, source, vmap, pairing = case
    out = project(pivot, source, pairing, vmap)
    assert out.topk_ids.dtype == np.int32 and out.topk_logprobs.dtype == np.float16
    assert out.fallback.dtype == bool and out.sup_offsets.dtype == np.int64
    assert out.sup_offsets.tolist() == [0, 3, 5]
    expect_ids = [
        [10, 12, 0],  # t=2 <-> u=2: 20->10 (-0.1) and 21->10 (-1.0) merge keeping -0.1; 22->12
        [12, 0, 0],   # t=3 unpaired: one-hot on the LABEL, token 12 at t=3 (not the input 11 at t-1)
        [13, 0, 0],   # t=4 <-> u=3, but nothing of 23..25 maps: fallback to the label 13
        [30, 0, 0],   # seq 1, t=1 <-> u=1, which the source did not supervise: fallback
        [31, 5, 0],   # t=2 <-> u=2: 26->31 (-0.2), 27->5 (-0.3), 28->31 (-0.4) dropped
    ]
    expect_lp = [[-0.1, -2.0, NEG], [0, NEG, NEG], [0, NEG, NEG], [0, NEG, NEG], [-0.2, -0.3, NEG]]
    assert out.topk_ids.tolist() == expect_ids
    np.testing.assert_allclose(out.topk_logprobs.astype(np.float32),
                               np.array(expect_lp, np.float16).astype(np.float32))
    assert out.fallback.tolist() == [False, True, True, True, False]
    # the source's total NLL (1.5 × 3 tokens, 0.5 × 1) per pivot supervised token (3, 2), so
    # MinCE compares the two models' likelihoods of the same text
    assert out.metric_ce.tolist() == [1.5, 0.25]
    st = out.stats
    assert (st["rows"], st["one_to_one"], st["fallback"], st["fallback_unmapped_topk"]) == (5, 2, 3, 1)
    e = math.exp
    # mass over paired rows (rows 1, 2, 3 of the source), in float16 as stored
    lp = lambda x: float(np.float16(x))  # noqa: E731
    total = sum(e(lp(x)) for x in (-0.1, -1.0, -2.0, -0.5, -0.7, -3.0, -0.2, -0.3, -0.4))
    exact = sum(e(lp(x)) for x in (-0.1, -2.0, -0.2, -0.3))
    mined = sum(e(lp(x)) for x in (-1.0, -0.4))
    assert st["mass_exact"] == pytest.approx(exact / total, rel=1e-5)
    assert st["mass_mined"] == pytest.approx(mined / total, rel=1e-5)
    assert st["mass_unmapped"] == pytest.approx(1 - (exact + mined) / total, rel=1e-4)


def test_off_by_one_fallback_would_be_caught(case):
    """Every fallback row's one-hot is the pivot's input id AT the row's position."""
    pivot, source, vmap, _ = case
    out = project(pivot, source, [np.full(5, -1), np.full(3, -1)], vmap)
    assert out.fallback.all()
    t = pivot.sup_positions.astype(int)
    seq = np.repeat([0, 1], [3, 2])
    labels = pivot.input_ids[pivot.seq_offsets[seq] + t]
    previous = pivot.input_ids[pivot.seq_offsets[seq] + t - 1]
    assert out.topk_ids[:, 0].tolist() == labels.tolist()
    assert (labels != previous).all()  # so the old off-by-one would fail this test


def test_identity_passes_distributions_through(case):
    pivot, _, _, _ = case
    ident = VocabMap(np.arange(64, dtype=np.int32), np.full(64, EXACT, np.uint8), np.zeros(64, np.int32))
    assert same_sequences(pivot, pivot)
    out = project(pivot, pivot, None, ident)
    assert out.stats["identity"] is True
    assert np.array_equal(out.topk_ids, pivot.topk_ids.astype(np.int32))
    assert np.array_equal(out.topk_logprobs, pivot.topk_logprobs)
    assert not out.fallback.any()


def test_identical_sequences_with_renumbered_vocabulary_still_map_ids(case):
    """Same ids on the data but another vocabulary (ids of the top-k differ): mapped, not copied."""
    pivot, _, _, _ = case
    shifted = _vmap({i: ((i + 1) % 64, EXACT) for i in range(64)})
    out = project(pivot, pivot, None, shifted)
    assert out.stats["identity"] is False
    assert out.topk_ids.tolist() == ((pivot.topk_ids.astype(int) + 1) % 64).tolist()
    assert not out.fallback.any()


def test_mismatched_inputs_fail_clearly(case):
    pivot, source, vmap, pairing = case
    with pytest.raises(ValueError, match="pairing covers 7 pivot tokens"):
        project(pivot, source, [pairing[0][:4], pairing[1]], vmap)
    with pytest.raises(ValueError, match="pairing has 1 sequences"):
        project(pivot, source, pairing[:1], vmap)


def test_unordered_source_rows_are_refused(case):
    pivot, source, vmap, pairing = case
    source.sup_positions = source.sup_positions[[1, 0, 2, 3]]
    with pytest.raises(ValueError, match="not strictly increasing"):
        project(pivot, source, pairing, vmap)
