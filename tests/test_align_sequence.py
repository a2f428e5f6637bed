"""Sequence alignment: hand-worked DTW and context pairs, a double-loop DTW as a second
implementation, and offsets against DTW on real tokenizers over varied and natural text.

Pairs are checked against the rule itself, independently of the aligners: a pivot token and
the source token it takes are preceded by the same bytes (``_same_prefix``)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fusechat_core.align.sequence import (
    TokenSeq,
    align_dtw,
    align_offsets,
    content_char_map,
    dtw_matrix,
    dtw_strings,
    prefix_starts,
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


def _seq(tok, vocab, text, *, starts=True):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    strings = [vocab.strings[i] for i in enc["input_ids"]]
    where = prefix_starts(text, np.array(enc["offset_mapping"]), strings=strings) if starts else None
    return TokenSeq(strings, where), enc


def _b(strings):
    return b"".join(x.encode("utf-8", "surrogateescape") for x in strings)


def _prefix_bytes(strings):
    """Bytes spelled before each token, from the canonical strings (not from offsets)."""
    return np.cumsum([0] + [len(x.encode("utf-8", "surrogateescape")) for x in strings[:-1]])


def _same_prefix(p, s, pair):
    """Every pair's two tokens are preceded by the same bytes (SentencePiece's dummy space before
    the text's first piece aside). Returns how many pivot tokens have such a source token."""
    bp, bs = _b(p.strings), _b(s.strings)
    shift = 1 if bp == b" " + bs else -1 if bs == b" " + bp else 0
    assert shift or bp == bs
    cp = np.maximum(_prefix_bytes(p.strings) - max(shift, 0), 0)
    cs = np.maximum(_prefix_bytes(s.strings) - max(-shift, 0), 0)
    got = np.flatnonzero(pair >= 0)
    assert (cp[got] == cs[pair[got]]).all()
    return int(np.isin(cp[1:], cs).sum())


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
    # D row 2: 5, 1+min(2,5,3)=3, 0+min(4,3,2)=2
    # back from (2,2): diag 2 < left 3 < up 4 -> (1,1): diag 1 -> (0,0). Path = the diagonal.
    # Context pairs: (0,0) follow the same (empty) text; at (1,1) the pivot spelled "a", the
    # source "ab": no pair; at (2,2) both spelled "abc": pair. (The old next-token rule paired
    # only d/d: "a" and "ab" predict different pieces, but after the same context.)
    D = dtw_matrix(np.array([[[1, 1, 1], [2, 1, 2], [2, 1, 0]]], dtype=np.int32))
    assert D[0].tolist() == [[1, 2, 3], [3, 2, 4], [5, 3, 2]]
    res = align_dtw([TokenSeq(["a", "bc", "d"])], [TokenSeq(["ab", "c", "d"])])
    assert res[0].tolist() == [0, -1, 2]
    # pivot ["ab", "c"] vs source ["a", "b", "c"]:
    # D row 0: 1, 2, 4;  row 1: 1+1=2, 1+min(2,2,1)=2, 0+min(4,2,2)=2
    # back from (1,2): diag D[0,1]=2 ties left D[1,1]=2 -> diagonal wins -> (0,1) -> left -> (0,0).
    # (1,2) is entered diagonally and both sides spelled "ab" before it: "c" pairs with "c";
    # "ab" pairs with "a" (both start the text).
    assert dtw_matrix(np.array([[[1, 1, 2], [1, 1, 0]]], dtype=np.int32))[0].tolist() == [[1, 2, 4], [2, 2, 2]]
    assert align_dtw([TokenSeq(["ab", "c"])], [TokenSeq(["a", "b", "c"])])[0].tolist() == [0, 2]


# The rows: Mistral v1 pieces against tekken's (canonical strings, as the tokenizers give them).
V1_PIECES = [" It", "'", "s", " bul", "lying", ".", "\n", "Stop"]
TEKKEN_PIECES = [" It", "'s", " bullying", ".\n", "Stop"]
# Each pivot token, the source token preceded by the same text, worked out by hand:
# "'" and "'s" follow " It"; "s" follows " It'", inside "'s": none; " bul" and " bullying"
# follow " It's"; "lying" follows " It's bul", inside " bullying": none; "." and ".\n" follow
# " It's bullying"; "\n" follows "...bullying.", inside ".\n": none; "Stop" and "Stop" follow the same.
CONTEXT_PAIRS = [0, 1, -1, 2, -1, 3, -1, 4]


def test_context_pairs_hand_worked_rows():
    text = "".join(V1_PIECES)
    spans = lambda pieces: np.array([(sum(map(len, pieces[:k])), sum(map(len, pieces[:k + 1])))  # noqa: E731
                                     for k in range(len(pieces))])
    p = TokenSeq(V1_PIECES, prefix_starts(text, spans(V1_PIECES), strings=V1_PIECES))
    s = TokenSeq(TEKKEN_PIECES, prefix_starts(text, spans(TEKKEN_PIECES), strings=TEKKEN_PIECES))
    assert align_offsets([p], [s])[0].tolist() == CONTEXT_PAIRS
    # DTW sees strings only. Marker-stripped costs: "bul"/"'s" 3 < "bul"/"bullying" 5 and
    # "lying"/"bullying" 3, so the path is (0,0) (1,1) (2,1) (3,1) (4,2) (5,3) (6,3) (7,4): it puts
    # "bul" against "'s" and "lying" against "bullying". Cells entered diagonally: (1,1) pairs
    # (" It" on both sides before it); at (4,2) the pivot spelled "'s bul" since then and the
    # source "'s": not the same text, no pair; (3,1) is entered by a pivot step. So DTW loses the
    # " bul" row (label fallback) but pairs nothing wrongly; at (5,3) both spelled "'s bullying":
    # "." takes ".\n"; at (7,4) both spelled ".\n": "Stop" takes "Stop".
    dtw_pairs = [0, 1, -1, -1, -1, 3, -1, 4]
    assert align_dtw([p], [s])[0].tolist() == dtw_pairs
    assert _naive_dtw(V1_PIECES, TEKKEN_PIECES)[1] == dtw_pairs


def _naive_dtw(keys_a, keys_b):
    """The reference's double loop and backtracking, then the context rule written plainly."""
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
    path.reverse()
    out, last = [-1] * n, (0, 0)
    for k, (p, s) in enumerate(path):
        if k and path[k - 1] != (p - 1, s - 1):
            continue  # not entered diagonally: one side is inside a token
        x, y = _b(keys_a[last[0]:p]), _b(keys_b[last[1]:s])
        if x == y:
            out[p], last = s, (p, s)
        elif not (x.startswith(y) or y.startswith(x)):
            last = (p, s)  # different text: start again here
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
def test_offsets_pair_every_shared_context(toks, source, text):
    """Every pair the offsets make is preceded by the same bytes on both sides, and every pivot token
    that has such a source token gets it (the ceiling), checked from the token strings, not the offsets.
    (The old rule also asked for the same next token, and paired across whitespace runs split
    differently: ``return`` after four spaces with `` return`` after three.)"""
    (tp, vp), (ts, vs) = toks["mistral-v1"], toks[source]
    p, _ = _seq(tp, vp, text)
    s, _ = _seq(ts, vs, text)
    pair = align_offsets([p], [s])[0]
    ceiling = _same_prefix(p, s, pair)
    assert int((pair[1:] >= 0).sum()) == ceiling
    used = pair[pair >= 0]  # 1-to-1: no source row serves two pivot rows
    assert len(used) == len(set(used.tolist()))
    if source == "mistral-v3" and "Markup" not in text:  # v3 reads [INST] as one control token
        assert (pair >= 0).mean() > 0.9


def test_byte_pieces_pair_only_after_the_same_bytes(toks):
    """A piece starting inside a character pairs only with a piece after the same bytes of it:
    v1 and v3 spell 𝄞 with the same four byte-fallback pieces (all pair); tekken's pieces after
    the first start at other bytes than v1's (none of them pairs)."""
    (tp, vp), (t3, v3), (tt, vt) = toks["mistral-v1"], toks["mistral-v3"], toks["tekken"]
    text = "a 𝄞 b 😀 c"
    p, pe = _seq(tp, vp, text)
    inside = [i for i, (a, b) in enumerate(pe["offset_mapping"]) if text[a:b] == "𝄞"][1:]
    assert len(inside) == 3  # precondition: v1 spells 𝄞 as four byte pieces
    s3, _ = _seq(t3, v3, text)
    pair3 = align_offsets([p], [s3])[0]
    _same_prefix(p, s3, pair3)
    assert (pair3[inside] >= 0).all()
    st, se = _seq(tt, vt, text)
    pair_t = align_offsets([p], [st])[0]
    _same_prefix(p, st, pair_t)
    emoji_src = [j for j, (a, b) in enumerate(se["offset_mapping"]) if "😀" in text[a:b]]
    assert len(emoji_src) > 1
    assert not set(pair_t.tolist()) & set(emoji_src[1:])


def _natural(n):
    from tests.corpus import natural_conversations

    return natural_conversations(n, chars=1500)


def test_offsets_and_dtw_on_natural_text(toks):
    """Both methods pair only shared contexts; the offsets reach the ceiling, DTW (strings alone)
    most of it: ≥ 97 % of it within a tokenizer family, ≥ 85 % across families (its path misses
    boundaries where a cheaper edit-distance path cuts across them, see the hand-worked rows).
    DTW's pairs are the offsets' pairs. (Under the old next-token rule the two agreed on ≥ 98 %
    of positions; DTW now misses some of the context pairs the offsets add.)"""
    convs = _natural(16)
    for source, share in (("mistral-v3", 0.97), ("tekken", 0.85)):
        (tp, vp), (ts, vs) = toks["mistral-v1"], toks[source]
        ps, ss = [], []
        for conv in convs:
            text = "\n\n".join(t["value"] for t in conv)
            ps.append(_seq(tp, vp, text)[0])
            ss.append(_seq(ts, vs, text)[0])
        offsets, dtw = align_offsets(ps, ss), align_dtw(ps, ss)
        ceiling = sum(_same_prefix(p, s, o) for p, s, o in zip(ps, ss, offsets))
        assert ceiling == sum(_same_prefix(p, s, d) for p, s, d in zip(ps, ss, dtw))
        o, d = np.concatenate(offsets), np.concatenate(dtw)
        assert (o[d >= 0] == d[d >= 0]).all(), source
        assert (d >= 0).sum() >= share * (o >= 0).sum(), (source, (d >= 0).sum() / (o >= 0).sum())


def test_different_templates_pair_only_through_shared_content(toks):
    """Rendered with two templates, tokens pair when the same message contents precede them and
    they start on content: template markup never pairs."""
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
        strings = [vp.strings[i] for i in enc["input_ids"]]
        seqs.append((TokenSeq(strings, prefix_starts(text, np.array(enc["offset_mapping"]), cmap, strings)), text,
                     enc, cmap))
    (p, ptext, pe, pmap), (s, stext, se, smap) = seqs
    pair = align_offsets([p], [s])[0]
    for i in np.flatnonzero(pair >= 0):
        a, c = pe["offset_mapping"][i][0], se["offset_mapping"][pair[i]][0]
        assert pmap[a] >= 0 and pmap[a] == smap[c]  # both start on the same content character
    # template markup ([INST], <|im_start|>, </s>) never pairs
    for i, (a, b) in enumerate(pe["offset_mapping"]):
        if "INST" in ptext[a:b] or ptext[a:b] in ("<s>", "</s>"):
            assert pair[i] == -1
    # the answer's tokens after its first (which starts on the template's space) all pair, the
    # last "." too: under chatml v1 writes it with "<|im_end|>" as ".<", a token that starts on
    # content. (The old rule, same next-token text, could not pair "." with ".<".)
    at = ptext.index(contents[1])
    answer = [i for i, (a, b) in enumerate(pe["offset_mapping"]) if at <= a < at + len(contents[1])]
    assert any(stext[a:b] == ".<" for a, b in se["offset_mapping"])
    assert (pair[answer[1:]] >= 0).all(), [pe["offset_mapping"][i] for i in answer if pair[i] < 0]


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
