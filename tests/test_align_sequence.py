"""Sequence alignment: hand-worked DTW, a double-loop DTW as a second implementation,
and offsets against DTW on real tokenizers over varied and natural text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fusechat_core.align.sequence import (
    TokenSeq,
    align_dtw,
    align_offsets,
    common_spans,
    content_char_map,
    dtw_matrix,
    dtw_strings,
    pairing_key,
    trimmed_spans,
)
from fusechat_core.align.vocab import vocabulary
from fusechat_core.chat import ChatFormatter, to_messages
from fusechat_core.models import load_tokenizer

VARIED = [
    "Plain prose: the quick brown fox jumps over the lazy dog, twice.",
    "def area(r):\n    \"\"\"Circle area.\"\"\"\n    return 3.14159 * r ** 2  # O(1)\n",
    "Numbers 1234567890, 0.000123, -42, 1e-9, 2024-02-26 and 3/4.",
    "Unicode: café, naïve, Straße, 日本語のテキスト, Привет мир, emoji 😀👍🏽.",
    "Whitespace runs:    four spaces,\t\ttabs,\n\n\nnewlines   and trailing   ",
    "<|im_start|>user\nMarkup [INST] inside [/INST] text</s> <s> stays text<|im_end|>",
]


def _seq(tok, vocab, text, *, spans=True):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    strings = [vocab.strings[i] for i in enc["input_ids"]]
    return TokenSeq(strings, trimmed_spans(text, np.array(enc["offset_mapping"])) if spans else None), enc


@pytest.fixture(scope="module")
def toks():
    out = {}
    for n in ("mistral-v1", "mistral-v3", "tekken"):
        tok = load_tokenizer(f"builtin:{n}")
        out[n] = (tok, vocabulary(tok))
    return out


# -- DTW ------------------------------------------------------------------------------------
def test_dtw_hand_worked_example():
    # costs (Levenshtein):   ab   c    d
    #                  a      1   1    1
    #                  bc     2   1    2
    #                  d      2   1    0
    # D row 0: 1, 1+1=2, 2+1=3
    # D row 1: 2+1=3, 1+min(2,3,1)=2, 2+min(3,2,2)=4
    # D row 2: 2+3=5, 1+min(2,5,3)=3, 0+min(4,3,2)=2
    # back from (2,2): diag 2 < left 3 < up 4 -> (1,1): diag 1 -> (0,0). Path = the diagonal;
    # only d/d spells the same text, so only pivot 2 pairs.
    D = dtw_matrix(np.array([[[1, 1, 1], [2, 1, 2], [2, 1, 0]]], dtype=np.int32))
    assert D[0].tolist() == [[1, 2, 3], [3, 2, 4], [5, 3, 2]]
    res = align_dtw([TokenSeq(["a", "bc", "d"])], [TokenSeq(["ab", "c", "d"])])
    assert res[0].tolist() == [-1, -1, 2]
    # pivot ["ab", "c"] vs source ["a", "b", "c"]:
    # D row 0: 1, 2, 4;  row 1: 1+1=2, 1+min(2,2,1)=2, 0+min(4,2,2)=2
    # back from (1,2): diag D[0,1]=2 ties left D[1,1]=2 -> diagonal wins -> (0,1) -> left -> (0,0).
    # "ab" lies on two cells (not 1-to-1); "c" on one, with "c": paired.
    assert dtw_matrix(np.array([[[1, 1, 2], [1, 1, 0]]], dtype=np.int32))[0].tolist() == [[1, 2, 4], [2, 2, 2]]
    assert align_dtw([TokenSeq(["ab", "c"])], [TokenSeq(["a", "b", "c"])])[0].tolist() == [-1, 2]


def _naive_dtw(keys_a, keys_b):
    """The reference's double loop and backtracking, then the one-cell + same-text rule."""
    a, b = dtw_strings(keys_a), dtw_strings(keys_b)
    from rapidfuzz.distance import Levenshtein

    inf = float("inf")
    n, m = len(a), len(b)
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = Levenshtein.distance(a[i - 1], b[j - 1]) + min(D[i - 1][j], D[i][j - 1], D[i - 1][j - 1])
    i, j, path = n, m, []
    while True:
        path.append((i - 1, j - 1))
        if (i, j) == (1, 1):
            break
        opts = [D[i - 1][j - 1] if i > 1 and j > 1 else inf, D[i - 1][j] if i > 1 else inf,
                D[i][j - 1] if j > 1 else inf]
        mv = opts.index(min(opts))
        i, j = (i - 1, j - 1) if mv == 0 else (i - 1, j) if mv == 1 else (i, j - 1)
    ka, kb = [pairing_key(x) for x in keys_a], [pairing_key(x) for x in keys_b]
    out = [-1] * n
    for p, s in path:
        same_text_in_column = sum(y == s and ka[x] == kb[y] for x, y in path)
        if sum(x == p for x, _ in path) == 1 and ka[p] == kb[s] and same_text_in_column == 1:
            out[p] = s
    return np.array(D)[1:, 1:], out


def test_vectorised_dtw_equals_double_loop_in_batches():
    rng = random.Random(3)
    words = ["a", "ab", "abc", "b", "c", "", "x", "the", "he", "t", "\n"]
    pivots, sources = [], []
    for _ in range(25):
        pivots.append(TokenSeq([rng.choice(words) for _ in range(rng.randint(1, 30))]))
        sources.append(TokenSeq([rng.choice(words) for _ in range(rng.randint(1, 30))]))
    got = align_dtw(pivots, sources, max_cells=3000)  # several batches of mixed lengths
    for p, s, g in zip(pivots, sources, got):
        _, want = _naive_dtw(p.strings, s.strings)
        assert g.tolist() == want


# -- offsets and DTW on real tokenizers ----------------------------------------------------------
def test_identical_splits_align_exactly_one_to_one(toks):
    text = "The river carries a quiet song over old hills, and the morning rain returns slowly."
    (t1, v1), (t3, v3) = toks["mistral-v1"], toks["mistral-v3"]
    p, pe = _seq(t1, v1, text)
    s, se = _seq(t3, v3, text)
    # precondition, checked independently: both split the text into the same pieces
    assert t1.convert_ids_to_tokens(pe["input_ids"]) == t3.convert_ids_to_tokens(se["input_ids"])
    ident = np.arange(len(p))
    assert align_offsets([p], [s])[0].tolist() == ident.tolist()
    assert align_dtw([p], [s])[0].tolist() == ident.tolist()


@pytest.mark.parametrize("source", ["mistral-v3", "tekken"])
@pytest.mark.parametrize("text", VARIED, ids=["prose", "code", "numbers", "unicode", "whitespace", "markup"])
def test_offsets_pairs_spell_the_same_text(toks, source, text):
    """Every pair the offsets make covers the same characters; on the sentencepiece pair most tokens pair."""
    (tp, vp), (ts, vs) = toks["mistral-v1"], toks[source]
    p, pe = _seq(tp, vp, text)
    s, se = _seq(ts, vs, text)
    pair = align_offsets([p], [s])[0]
    po, so = np.array(pe["offset_mapping"]), np.array(se["offset_mapping"])
    for i in np.flatnonzero(pair >= 0):
        j = pair[i]
        assert text[po[i][0]:po[i][1]].strip() == text[so[j][0]:so[j][1]].strip()
        assert p.strings[i].strip() == s.strings[j].strip()
    # a pair is 1-to-1: no source token is used twice
    used = pair[pair >= 0]
    assert len(used) == len(set(used.tolist()))
    if source == "mistral-v3" and "Markup" not in text:
        assert (pair >= 0).mean() > 0.9


def test_byte_pieces_of_one_character_never_pair(toks):
    """tekken spells 😀 as three byte pieces sharing one span: none of them is 1-to-1."""
    (tp, vp), (ts, vs) = toks["mistral-v1"], toks["tekken"]
    text = "a 😀 b"
    p, _ = _seq(tp, vp, text)
    s, se = _seq(ts, vs, text)
    pair = align_offsets([p], [s])[0]
    emoji_src = [j for j, (a, b) in enumerate(se["offset_mapping"]) if "😀" in text[a:b]]
    assert len(emoji_src) > 1
    assert not set(pair.tolist()) & set(emoji_src)


def _natural(n):
    from tests.corpus import natural_conversations

    return natural_conversations(n, chars=1500)


def test_offsets_and_dtw_agree_on_natural_text(toks):
    """The two methods pair the same way on ≥ 99 % of pivot positions within a tokenizer family and
    ≥ 98 % across families (the in-repo corpus is denser in emoji, scripts and whitespace runs, where
    byte-level and SentencePiece pieces straddle each other, than the MT-Bench text used before)."""
    convs = _natural(16)
    for source, min_agree in (("mistral-v3", 0.99), ("tekken", 0.98)):
        (tp, vp), (ts, vs) = toks["mistral-v1"], toks[source]
        ps, ss = [], []
        for conv in convs:
            text = "\n\n".join(t["value"] for t in conv)
            ps.append(_seq(tp, vp, text)[0])
            ss.append(_seq(ts, vs, text)[0])
        o = np.concatenate(align_offsets(ps, ss))
        d = np.concatenate(align_dtw(ps, ss))
        assert (o == d).mean() >= min_agree, (source, (o == d).mean())
        assert (o[d >= 0] == d[d >= 0]).mean() >= 0.99, source
        assert (o >= 0).mean() >= (d >= 0).mean()  # offsets miss no pair that DTW finds, in bulk


def test_different_templates_pair_only_through_shared_content(toks):
    (tp, vp) = toks["mistral-v1"]
    conv = [{"from": "human", "value": "What is 12 * 12?"}, {"from": "gpt", "value": "It is 144, of course."}]
    pf, sf = ChatFormatter(tp, "mistral"), ChatFormatter(tp, "chatml")
    msgs = to_messages(conv)
    contents = [m["content"] for m in msgs]
    seqs = []
    for f in (pf, sf):
        text = f.text(msgs)
        enc = tp(text, add_special_tokens=False, return_offsets_mapping=True)
        cmap, total = content_char_map(text, contents)
        assert total == sum(len(c) for c in contents)
        spans = common_spans(trimmed_spans(text, np.array(enc["offset_mapping"])), cmap)
        seqs.append((TokenSeq([vp.strings[i] for i in enc["input_ids"]], spans), text, enc))
    (p, ptext, pe), (s, stext, se) = seqs
    pair = align_offsets([p], [s])[0]
    paired_text = [ptext[pe["offset_mapping"][i][0]:pe["offset_mapping"][i][1]].strip()
                   for i in np.flatnonzero(pair >= 0)]
    # same tokenizer: every content token pairs, except the final "." that v1 merges
    # with chatml's "<|im_end|>" (plain text to v1) into one token straddling markup
    assert any(stext[a:b] == ".<" for a, b in se["offset_mapping"])
    assert "".join(paired_text) == "".join(contents).replace(" ", "")[:-1]
    for i in np.flatnonzero(pair >= 0):
        a, b = pe["offset_mapping"][i]
        c, d = se["offset_mapping"][pair[i]]
        assert ptext[a:b].strip() == stext[c:d].strip()
    # template markup ([INST], <|im_start|>, </s>) never pairs
    for i, (a, b) in enumerate(pe["offset_mapping"]):
        if "INST" in ptext[a:b] or ptext[a:b] in ("<s>", "</s>"):
            assert pair[i] == -1


def test_banded_dtw_equals_full_dtw(toks):
    """Exactly the full DTW when the band spans the pair; on natural text with a band of 64,
    the same pairing; pairs a band cannot cross fall back to the full DTW."""
    from fusechat_core.align.sequence import align_dtw_banded

    rng = random.Random(5)
    words = ["a", "ab", "abc", "b", "c", "", "x", "the", "he", "t"]
    ps = [TokenSeq([rng.choice(words) for _ in range(rng.randint(1, 50))]) for _ in range(20)]
    ss = [TokenSeq([rng.choice(words) for _ in range(rng.randint(1, 50))]) for _ in range(20)]
    full = align_dtw(ps, ss)
    assert all(np.array_equal(a, b) for a, b in zip(full, align_dtw_banded(ps, ss, width=64)))
    # narrow bands: lopsided pairs (a band cannot cross) are computed in full, the rest banded
    narrow = align_dtw_banded(ps, ss, width=8)
    assert all(len(a) == len(b) for a, b in zip(full, narrow))
    for p, s, a, b in zip(ps, ss, full, narrow):
        if len(s) > 8 and (len(p) - 1) * 4 < len(s) - 8:
            assert np.array_equal(a, b)
    (tp, vp), (ts, vs) = toks["mistral-v1"], toks["tekken"]
    texts = ["\n\n".join(t["value"] for t in conv) for conv in _natural(6)]
    ps = [_seq(tp, vp, t)[0] for t in texts]
    ss = [_seq(ts, vs, t)[0] for t in texts]
    assert np.array_equal(np.concatenate(align_dtw(ps, ss)), np.concatenate(align_dtw_banded(ps, ss)))
