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
    lp = lambda x: float(np.float16(x))  # noqa: E731  (the source's log-probs, as stored)
    # Duplicates merge by summing probabilities (they used to keep the larger, as the published
    # scripts do). These synthetic log-probs are no distribution, so a sum can pass 1 (log > 0).
    merged_10 = math.log(math.exp(lp(-0.1)) + math.exp(lp(-1.0)))  # 0.241
    merged_31 = math.log(math.exp(lp(-0.2)) + math.exp(lp(-0.4)))  # 0.398
    expect_ids = [
        [10, 12, 0],  # t=2 <-> u=2: 20->10 (-0.1) and 21->10 (-1.0) merge into one entry; 22->12
        [12, 0, 0],   # t=3 unpaired: one-hot on the LABEL, token 12 at t=3 (not the input 11 at t-1)
        [13, 0, 0],   # t=4 <-> u=3, but nothing of 23..25 maps: fallback to the label 13
        [30, 0, 0],   # seq 1, t=1 <-> u=1, which the source did not supervise: fallback
        [31, 5, 0],   # t=2 <-> u=2: 26->31 (-0.2) and 28->31 (-0.4) merge; 27->5 (-0.3)
    ]
    expect_lp = [[merged_10, -2.0, NEG], [0, NEG, NEG], [0, NEG, NEG], [0, NEG, NEG], [merged_31, -0.3, NEG]]
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
    # an embedding padded past the tokenizer (64 tokens, 128 rows): still the identity
    padded = Representation(**{**pivot.arrays(), "meta": {**pivot.meta, "vocab_size": 128}})
    again = project(padded, padded, None, ident)
    assert again.stats["identity"] is True and np.array_equal(again.topk_ids, out.topk_ids)


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


# -- the hand-worked rows: Mistral v1 pivot, tekken source, real tokenizers ----------------
def _real_rep(ids, sup, topk_ids, topk_lp, dtype):
    return Representation(
        input_ids=np.asarray(ids, dtype), seq_offsets=np.array([0, len(ids)], np.int64),
        sup_positions=np.asarray(sup, np.uint16), sup_offsets=np.array([0, len(sup)], np.int64),
        topk_ids=np.asarray(topk_ids, dtype), topk_logprobs=np.asarray(topk_lp, np.float16),
        metric_ce=np.ones(1, np.float32), meta={})


def test_context_rows_map_onto_the_pivot_tokens_their_text_starts_with():
    """``It's bullying.\nStop`` tokenised by Mistral v1 (`` It`` ``'`` ``s`` ``▁bul`` ``lying`` ``.``
    ``\n`` ``Stop``) and tekken (`` It`` ``'s`` ``Ġbullying`` ``.Ċ`` ``Stop``), paired by the offsets,
    projected through a ``prefix`` vocabulary map: every expected id below is read off the
    tokenizers' own outputs, the log-probs worked out by hand."""
    from fusechat_core.align.sequence import TokenSeq, align_offsets, prefix_starts
    from fusechat_core.align.vocab import PREFIX, Vocabulary, build_vocab_map, vocabulary
    from fusechat_core.models import load_tokenizer

    v1, tk = load_tokenizer("builtin:mistral-v1"), load_tokenizer("builtin:tekken")
    pv, sv = vocabulary(v1), vocabulary(tk)
    text = " It's bullying.\nStop"
    seqs = []
    for tok, vocab in ((v1, pv), (tk, sv)):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        strings = [vocab.strings[i] for i in enc["input_ids"]]
        seqs.append((enc["input_ids"], TokenSeq(strings, prefix_starts(text, np.array(enc["offset_mapping"]),
                                                                       strings=strings))))
    (p_ids, p), (s_ids, s) = seqs
    # preconditions, the tokenizers' own splits (v1's dummy space merges into the text's own)
    assert p.strings == [" It", "'", "s", " bul", "lying", ".", "\n", "Stop"]
    assert s.strings == [" It", "'s", " bullying", ".\n", "Stop"]
    pair = align_offsets([p], [s])[0]
    assert pair.tolist() == [0, 1, -1, 2, -1, 3, -1, 4]
    tid = {x: tk.convert_tokens_to_ids(tk.tokenize(x))[0] for x in
           (" bullying", " bull", "'s", "'", ".\n", ".\n\n", ".", "Stop")}
    assert len(set(tid.values())) == len(tid)  # each is one tekken token
    pid = {x: i for i, x in zip(p_ids, p.strings)}  # v1 ids of the pivot's own pieces
    twin_bull = pv.strings.index(" bull")  # v1 has a token "▁bull" (it writes "bullying" as ▁bul + lying)
    # A source vocabulary holding only the candidates, at their real tekken ids.
    strings = [None] * len(sv)
    for i in tid.values():
        strings[i] = sv.strings[i]
    small = Vocabulary(strings, np.zeros(len(sv), bool), np.zeros(len(sv), bool), sv.family)
    vmap = build_vocab_map(small, pv, mapping="prefix", pivot_tokenizer=v1)
    # the rule: the pivot token each candidate's text starts with (its exact twin, else v1's first piece)
    assert vmap.ids[tid[" bullying"]] == pid[" bul"] and vmap.kind[tid[" bullying"]] == PREFIX
    assert vmap.ids[tid[" bull"]] == twin_bull and vmap.kind[tid[" bull"]] == EXACT
    assert vmap.ids[tid[".\n"]] == pid["."] and vmap.ids[tid[".\n\n"]] == pid["."]
    assert vmap.ids[tid["'s"]] == pid["'"] and vmap.ids[tid["'"]] == pid["'"]

    pivot = _real_rep(p_ids, [1, 2, 3, 4, 5, 6, 7], np.zeros((7, 3)), np.zeros((7, 3)), np.uint16)
    s_top = [[tid["'s"], tid["'"], tid["."]],                    # u=1, after " It"
             [tid[" bullying"], tid[" bull"], tid[".\n"]],       # u=2, after " It's"
             [tid[".\n"], tid[".\n\n"], tid["."]],              # u=3, after " It's bullying"
             [tid["Stop"], tid["'"], tid["."]]]                   # u=4, after "...bullying.\n"
    s_lp = [[-0.2, -2.0, -3.0], [-0.5, -1.5, -2.5], [-0.3, -1.6, -2.0], [-0.1, -3.0, -4.0]]
    source = _real_rep(s_ids, [1, 2, 3, 4], s_top, s_lp, np.uint32)
    out = project(pivot, source, [pair], vmap.padded(len(sv)))
    lp = lambda x: float(np.float16(x))  # noqa: E731
    lse = lambda *xs: math.log(sum(math.exp(lp(x)) for x in xs))  # noqa: E731
    rows = [  # (ids, log-probs, fallback) per pivot row t = 1..7
        # t=1 "'" after " It" <- tekken "'s": "'s" and "'" both start with "'": summed; "." on "."
        ([pid["'"], pid["."], 0], [lse(-0.2, -2.0), lp(-3.0), NEG], False),
        # t=2 "s" after " It'": inside tekken's "'s", no source row: one-hot on the NEXT token "s"
        ([pid["s"], 0, 0], [0.0, NEG, NEG], True),
        # t=3 " bul" after " It's" <- " bullying": v1 starts it with "▁bul"; " bull" has a twin
        ([pid[" bul"], twin_bull, pid["."]], [lp(-0.5), lp(-1.5), lp(-2.5)], False),
        # t=4 "lying" after " It's bul": inside " bullying": the label
        ([pid["lying"], 0, 0], [0.0, NEG, NEG], True),
        # t=5 "." after " It's bullying" <- ".\n": ".\n", ".\n\n" and "." all start with ".": one entry
        ([pid["."], 0, 0], [lse(-0.3, -1.6, -2.0), NEG, NEG], False),
        # t=6 "\n" after "...bullying.": inside ".\n": the label
        ([pid["\n"], 0, 0], [0.0, NEG, NEG], True),
        # t=7 "Stop" after "...bullying.\n" <- "Stop"
        ([pid["Stop"], pid["'"], pid["."]], [lp(-0.1), lp(-3.0), lp(-4.0)], False),
    ]
    assert out.topk_ids.tolist() == [r[0] for r in rows]
    np.testing.assert_allclose(out.topk_logprobs.astype(np.float32),
                               np.array([r[1] for r in rows], np.float16).astype(np.float32))
    assert out.fallback.tolist() == [r[2] for r in rows]


def test_a_cut_source_view_falls_back_to_the_label_beyond_its_prefix(case):
    """The source saw only ``1 20`` of sequence 0 (a cut view, listed in ``cut_rows``):
    every pivot row of it falls back to its label, and the source is ranked as the pivot there."""
    pivot, _, vmap, _ = case
    source = _rep([[1, 20], [1, 40, 41]], [[1], [2]], [[5, 6, 7], [26, 27, 28]],
                  [[-0.3, -0.4, -0.5], [-0.2, -0.3, -0.4]], [0.1, 0.5])
    source.meta["cut_rows"] = [0]
    out = project(pivot, source, [np.array([0, 1, -1, -1, -1]), np.array([0, 1, 2])], vmap)
    assert out.fallback.tolist() == [True, True, True, True, False]  # seq 1 as before: source supervises t=2 only
    assert out.topk_ids[:3, 0].tolist() == [11, 12, 13]  # the labels
    # sequence 0: the pivot's own 2.0, not the source's 0.1 over a prefix; sequence 1: 0.5 · 1 / 2
    assert out.metric_ce.tolist() == pytest.approx([2.0, 0.25])
    assert out.stats["source_cut_sequences"] == 1


def test_a_sequence_the_pivot_saw_cut_ranks_the_source_as_the_pivot(case):
    """The pivot saw only a prefix of sequence 0 (its ``cut_rows``), the source all of it: the
    two cross-entropies are of different text (here the source's 1.5 would beat the pivot's
    2.0 on a comparison that means nothing), so the sequence is a tie: the pivot's value."""
    pivot, source, vmap, pairing = case
    pivot.meta["cut_rows"] = [0]
    out = project(pivot, source, pairing, vmap)
    # sequence 0: the pivot's own 2.0; sequence 1, whole in both: 0.5 · 1 / 2 as before
    assert out.metric_ce.tolist() == pytest.approx([2.0, 0.25])


def test_projection_in_row_chunks_is_the_projection_in_one_piece(case, monkeypatch):
    """A long shard is merged a chunk of rows at a time (memory): any chunk size gives the
    same rows and the same mass figures as one piece."""
    import importlib

    project_module = importlib.import_module("fusechat_core.align.project")  # the package exports the function

    pivot, source, vmap, pairing = case
    whole = project(pivot, source, pairing, vmap)
    for rows in (1, 2):
        monkeypatch.setattr(project_module, "PROJECT_CHUNK_ROWS", rows)
        chunked = project(pivot, source, pairing, vmap)
        assert np.array_equal(chunked.topk_ids, whole.topk_ids)
        assert np.array_equal(chunked.topk_logprobs, whole.topk_logprobs)
        assert np.array_equal(chunked.fallback, whole.fallback)
        got, want = dict(chunked.stats), dict(whole.stats)
        assert got.pop("mass_sums") == pytest.approx(want.pop("mass_sums"))
        assert got == pytest.approx(want)
