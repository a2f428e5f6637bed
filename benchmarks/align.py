"""Token-alignment benchmark (issue 4).

Sequence alignment throughput of the stage's methods against a plain
pure-Python DTW (the reference's double loop, written here), on the same
conversation pairs: the pivot (Mistral v1 SentencePiece, 32k) against a
source with a very different tokenizer (tekken byte-level BPE, 131k), each
conversation rendered with the same chat template and cut to ~512 pivot
tokens. The text is natural and lives in the repository (``tests/corpus.py``):
hand-written chat questions and long answers (code, lists, several scripts,
emoji, whitespace runs) and Python standard-library documentation.

Prints the timings, whether the vectorised DTW pairs exactly as the naive
one, how often the offsets method agrees with DTW, the time to build the
MinED vocabulary map tekken → Mistral v1, and ends with

    align_speedup_vs_naive_dtw: R   (default method, offsets, vs naive DTW)
    agreement_with_dtw: F           (share of pivot positions, offsets vs DTW)
    mined_map_seconds: S

Run: ``.venv/bin/python benchmarks/align.py [--pairs 200] [--tokens 512]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.corpus import natural_conversations  # noqa: E402  (after the path set-up)


# -- the baseline: the reference's DTW as a plain double loop ---------------------------------
def naive_dtw_pairing(tokens_a: list[str], tokens_b: list[str]) -> list[int]:
    """Pure-Python DTW (cost: Levenshtein of marker-stripped strings, C per cell as the
    reference's ``editdistance.eval``), backtracking diagonal > up > left, then the
    pairing rule: the pivot token on one path cell, with a source token of the same
    text that no other pivot token of equal text shares."""
    from rapidfuzz.distance import Levenshtein

    from fusechat_core.align.sequence import dtw_strings, pairing_key

    a, b = dtw_strings(tokens_a), dtw_strings(tokens_b)
    ka, kb = [pairing_key(x) for x in tokens_a], [pairing_key(x) for x in tokens_b]
    dist = Levenshtein.distance
    inf = float("inf")
    n, m = len(a), len(b)
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(1, n + 1):
        ai, row, prev = a[i - 1], D[i], D[i - 1]
        for j in range(1, m + 1):
            row[j] = dist(ai, b[j - 1]) + min(prev[j], row[j - 1], prev[j - 1])
    i, j = n, m
    path = []
    while True:
        path.append((i - 1, j - 1))
        if i == 1 and j == 1:
            break
        opts = [D[i - 1][j - 1] if i > 1 and j > 1 else inf, D[i - 1][j] if i > 1 else inf,
                D[i][j - 1] if j > 1 else inf]
        move = opts.index(min(opts))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    cp = Counter(p for p, _ in path)
    cs = Counter(s for p, s in path if ka[p] == kb[s])
    out = [-1] * n
    for p, s in path:
        if cp[p] == 1 and ka[p] == kb[s] and cs[s] == 1:
            out[p] = s
    return out


def prepare(pivot_ref: str, source_ref: str, convs: list, max_tokens: int):
    """Rendered, tokenised, cut pairs: (TokenSeq pivot, TokenSeq source, supervised mask)."""
    from fusechat_core.align.sequence import TokenSeq, trimmed_spans
    from fusechat_core.align.vocab import vocabulary
    from fusechat_core.chat import ChatFormatter
    from fusechat_core.models import load_tokenizer

    pf = ChatFormatter(load_tokenizer(pivot_ref), "mistral")
    sf = ChatFormatter(load_tokenizer(source_ref), "mistral")
    pv, sv = vocabulary(pf.tokenizer), vocabulary(sf.tokenizer)
    ps, ss, sup = [], [], []
    for conv in convs:
        r = pf.encode(conv, max_tokens)
        text = r.text[:r.offsets[-1][1]]  # the source covers the same text as the cut pivot
        enc = sf.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ps.append(TokenSeq([pv.strings[i] for i in r.input_ids], trimmed_spans(r.text, np.array(r.offsets))))
        ss.append(TokenSeq([sv.strings[i] for i in enc["input_ids"]],
                           trimmed_spans(text, np.array(enc["offset_mapping"]))))
        sup.append(np.array(r.labels) != -100)
    return ps, ss, sup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--baseline-pairs", type=int, default=None,
                    help="time the naive DTW on the first N pairs only (default: all)")
    args = ap.parse_args()

    from fusechat_core.align.sequence import align_dtw, align_dtw_banded, align_offsets
    from fusechat_core.align.vocab import build_vocab_map, vocabulary
    from fusechat_core.models import load_tokenizer

    convs = natural_conversations(args.pairs)
    results = {}
    for source in ("builtin:tekken", "builtin:mistral-v3"):
        ps, ss, sup = prepare("builtin:mistral-v1", source, convs, args.tokens)
        n_tok = sum(len(p) for p in ps)
        print(f"\n== pivot builtin:mistral-v1 vs source {source}: {len(ps)} pairs, "
              f"{n_tok / len(ps):.0f} pivot / {sum(len(s) for s in ss) / len(ss):.0f} source tokens per pair")
        t = time.perf_counter()
        off = align_offsets(ps, ss)
        t_off = time.perf_counter() - t
        t = time.perf_counter()
        dtw = align_dtw(ps, ss)
        t_dtw = time.perf_counter() - t
        t = time.perf_counter()
        banded = align_dtw_banded(ps, ss)
        t_band = time.perf_counter() - t
        nb = args.baseline_pairs or len(ps)
        t = time.perf_counter()
        naive = [naive_dtw_pairing(p.strings, s.strings) for p, s in zip(ps[:nb], ss[:nb])]
        t_naive = (time.perf_counter() - t) * len(ps) / nb
        same = np.mean(np.concatenate([np.asarray(a) == b for a, b in zip(naive, dtw[:nb])]))
        o, d, m = np.concatenate(off), np.concatenate(dtw), np.concatenate(sup)
        agree = float(np.mean(o == d))
        both = (o >= 0) | (d >= 0)
        dtw_confirmed = float(np.mean(o[d >= 0] == d[d >= 0]))
        print(f"naive pure-Python DTW: {t_naive:8.2f} s  ({t_naive / len(ps) * 1e3:.1f} ms/pair"
              f"{'' if nb == len(ps) else f', timed on {nb} pairs'})")
        print(f"vectorised DTW:        {t_dtw:8.3f} s  ({t_dtw / len(ps) * 1e3:.2f} ms/pair)  "
              f"speed-up {t_naive / t_dtw:.0f}x, pairing identical to naive on {same:.2%} of pivot positions")
        same_b = np.mean(np.concatenate([np.asarray(a) == b for a, b in zip(naive, banded[:nb])]))
        print(f"banded DTW (64 wide):  {t_band:8.3f} s  ({t_band / len(ps) * 1e3:.2f} ms/pair)  "
              f"speed-up {t_naive / t_band:.0f}x, pairing identical to naive on {same_b:.2%} of pivot positions")
        print(f"offsets (default):     {t_off:8.3f} s  ({t_off / len(ps) * 1e3:.3f} ms/pair)  "
              f"speed-up {t_naive / t_off:.0f}x")
        print(f"paired pivot positions: offsets {np.mean(o >= 0):.2%}, DTW {np.mean(d >= 0):.2%}")
        differ = both & (o != d)
        only_offsets = f"{np.mean((o >= 0)[differ]):.0%}" if differ.any() else "-"
        print(f"offsets vs DTW agree on {agree:.2%} of pivot positions ({np.mean(o[m] == d[m]):.2%} of supervised);"
              f" {dtw_confirmed:.2%} of DTW's pairs are the offsets' pairs; of the disagreements, {only_offsets} "
              f"are pairs only the offsets make")
        results[source] = dict(naive=t_naive, dtw=t_dtw, band=t_band, off=t_off, agree=agree, same=same)

    t = time.perf_counter()
    pivot_vocab = vocabulary(load_tokenizer("builtin:mistral-v1"))
    source_vocab = vocabulary(load_tokenizer("builtin:tekken"))
    t_vocab = time.perf_counter() - t
    vm = build_vocab_map(source_vocab, pivot_vocab)
    mined_s = vm.stats["seconds"]
    print(f"\nMinED map tekken (131,072) → Mistral v1 (32,000): {mined_s:.1f} s "
          f"(+ {t_vocab:.1f} s reading both vocabularies); {vm.stats['exact']} exact, {vm.stats['mined']} MinED, "
          f"{vm.stats['unmapped']} unmapped (control tokens)")
    main_r = results["builtin:tekken"]
    print(f"DTW speed-up (tekken): vectorised {main_r['naive'] / main_r['dtw']:.1f}, "
          f"banded {main_r['naive'] / main_r['band']:.1f}")
    print(f"align_speedup_vs_naive_dtw: {main_r['naive'] / main_r['off']:.1f}")
    print(f"agreement_with_dtw: {main_r['agree']:.4f}")
    print(f"mined_map_seconds: {mined_s:.1f}")


if __name__ == "__main__":
    main()
