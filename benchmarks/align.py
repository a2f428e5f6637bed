"""Token-alignment benchmark (issues 4 and 17).

Sequence alignment of the stage's methods against a plain pure-Python DTW
(the reference's double loop and the pairing rule, written here), on the
same conversation pairs: the pivot (Mistral v1 SentencePiece, 32k) against a
source with a very different tokenizer (tekken byte-level BPE, 131k) and one
with nearly the same (Mistral v3), each conversation rendered with the same
chat template and cut to ~512 pivot tokens. The text is natural and lives in
the repository (``tests/corpus.py``): hand-written chat questions and long
answers (code, lists, several scripts, emoji, whitespace runs) and Python
standard-library documentation.

**What a pairing is worth**, over the pivot's supervised rows (row ``t``
predicts pivot token ``t`` from the text before it), for each method:

- ``coverage``: the share of rows given a source distribution (a source
  token ``u`` paired with ``t``; the source renders the same text, so it
  supervises ``u`` as well);
- ``prefix_precision``: the share of those rows whose source row is
  conditioned on exactly the pivot's text prefix: the bytes spelled by
  source tokens ``0..u-1`` equal those spelled by pivot tokens ``0..t-1``;
- ``ceiling``: the share of rows whose prefix ends on a source token
  boundary (some source token is preceded by exactly those bytes): the most
  coverage any rule can reach at precision 1.

Bytes are counted from the canonical token strings (``vocab.py``), not from
the offsets the ``offsets`` method uses, so the check is independent of both
methods. SentencePiece's dummy space before the text's first piece is the one
difference allowed between the two concatenations; a pair of sequences that
spell different text otherwise is left out (the count is printed).

Also prints the timings, whether the vectorised DTW pairs exactly as the
naive one, how often the offsets method agrees with DTW, full against banded
DTW on a few pairs cut to 2048 pivot tokens, the time to build the MinED
vocabulary map tekken → Mistral v1, and ends with

    coverage: tekken→v1 C | v3→v1 C          (default method, offsets)
    prefix_precision: tekken→v1 P | v3→v1 P
    ceiling: tekken→v1 X | v3→v1 X
    banded_speedup_2048: B          (full DTW time / banded DTW time, 2048 tokens)
    align_speedup_vs_naive_dtw: R   (default method, offsets, vs naive DTW)
    agreement_with_dtw: F           (share of pivot positions, offsets vs DTW)
    mined_map_seconds: S
    verify_share_of_align: V        (verifying the shards read, over itself + alignment; <= 0.05)
    verify_share_of_align_stage: W  (the same, over the WHOLE align stage's time; <= 0.05)

``verify_share_of_align`` sets the verification against the pairing alone (an upper
bound). ``verify_share_of_align_stage`` times the stage itself: the function the align
task calls (``align.align_shard_artifact``: reading the dataset, both representation
shards and the vocabulary map from the store, re-rendering, pairing, projecting the top-k,
writing the aligned shard) on a real store: the dataset stage's artifact built from the
natural conversations, representation shards of the pivot (Mistral v1) and of a tekken
source written by the representation stage's writer (real tokenisation at
``--stage-tokens``; the top-k, ``--stage-top-k`` wide, is synthetic: the label, then other
ids), the prefix vocabulary map (the demo's). It is timed with the store's verification
as it is (every byte read hashed against the manifest; nothing remembered from an earlier
read), and the seconds spent hashing (``store.VERIFY_SECONDS``) are its share.

Run: ``.venv/bin/python benchmarks/align.py [--pairs 200] [--tokens 512]
[--baseline-pairs N] [--long-pairs 4] [--stage-seqs 300] [--stage-only]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.corpus import natural_conversations  # noqa: E402  (after the path set-up)


# -- the baseline: the reference's DTW as a plain double loop ---------------------------------
def naive_dtw_pairing(tokens_a: list[str], tokens_b: list[str]) -> list[int]:
    """Pure-Python DTW (cost: Levenshtein of marker-stripped strings, C per cell as the
    reference's ``editdistance.eval``), backtracking diagonal > up (pivot) > left (source),
    then the context pairing rule written out plainly: walking the path forward, a cell
    entered diagonally pairs its two tokens when both sides spelled the same text since
    the last pair; where they spelled different text (neither a prefix of the other),
    pairing restarts there."""
    from rapidfuzz.distance import Levenshtein

    from fusechat_core.align.sequence import dtw_strings

    a, b = dtw_strings(tokens_a), dtw_strings(tokens_b)
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
    path.reverse()
    out = [-1] * n
    last = (0, 0)
    for k, (p, s) in enumerate(path):
        if k and path[k - 1] != (p - 1, s - 1):
            continue
        x, y = b"".join(_bytes(tokens_a[last[0]:p])), b"".join(_bytes(tokens_b[last[1]:s]))
        if x == y:
            out[p] = s
            last = (p, s)
        elif not (x.startswith(y) or y.startswith(x)):
            last = (p, s)
    return out


def timed(fn, *args):
    """(fn(*args), wall seconds it took)."""
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def prepare(pivot_ref: str, source_ref: str, convs: list, max_tokens: int):
    """Rendered, tokenised, cut pairs: (TokenSeq pivot, TokenSeq source, supervised mask)."""
    from fusechat_core.align.sequence import TokenSeq, prefix_starts
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
        p_str = [pv.strings[i] for i in r.input_ids]
        s_str = [sv.strings[i] for i in enc["input_ids"]]
        ps.append(TokenSeq(p_str, prefix_starts(r.text, np.array(r.offsets), strings=p_str)))
        ss.append(TokenSeq(s_str, prefix_starts(text, np.array(enc["offset_mapping"]), strings=s_str)))
        sup.append(np.array(r.labels) != -100)
    return ps, ss, sup


def _bytes(strings: list[str]) -> list[bytes]:
    return [x.encode("utf-8", "surrogateescape") for x in strings]


def prefix_metrics(ps, ss, sup, pairing) -> dict[str, float]:
    """coverage, prefix_precision and ceiling over the pivot's supervised rows (see the module doc).

    Independent of the aligners: a token's text prefix is the bytes of the tokens before it
    (canonical strings, ``vocab.py``), so two rows share a prefix when those byte counts are
    equal on a text both tokenizations spell. SentencePiece's dummy prefix (v1 writes the
    text's first ``[`` as `` [``) is the one difference allowed; a pair whose concatenations
    differ otherwise is counted and left out of precision and ceiling.
    """
    rows = covered = precise = ceiling = odd = 0
    for p, s, m, pair in zip(ps, ss, sup, pairing):
        bp, bs = _bytes(p.strings), _bytes(s.strings)
        jp, js = b"".join(bp), b"".join(bs)
        op = os_ = 0
        if jp == b" " + js:
            op = 1
        elif js == b" " + jp:
            os_ = 1
        elif jp != js:
            odd += 1
            continue
        cp = np.cumsum([0] + [len(x) for x in bp[:-1]]) - op  # bytes before each pivot token
        cs = np.cumsum([0] + [len(x) for x in bs[:-1]]) - os_
        pair = np.asarray(pair)
        rows += int(m.sum())
        got = m & (pair >= 0)
        covered += int(got.sum())
        precise += int((cs[pair[got]] == cp[got]).sum())
        ceiling += int(np.isin(cp[m], cs).sum())
    return {"coverage": covered / max(rows, 1), "prefix_precision": precise / max(covered, 1),
            "ceiling": ceiling / max(rows, 1), "rows": rows, "texts_differ": odd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--baseline-pairs", type=int, default=None,
                    help="time the naive DTW on the first N pairs only (default: all)")
    ap.add_argument("--long-pairs", type=int, default=4,
                    help="pairs cut to 2048 pivot tokens for the full vs banded DTW timing (0: skip)")
    ap.add_argument("--stage-seqs", type=int, default=300,
                    help="dataset rows for the whole-stage timing (0: skip it)")
    ap.add_argument("--stage-tokens", type=int, default=512)
    ap.add_argument("--stage-top-k", type=int, default=10)
    ap.add_argument("--stage-shards", type=int, default=2)
    ap.add_argument("--stage-only", action="store_true", help="only the whole-stage timing")
    ap.add_argument("--project-rows", type=int, default=800_000,
                    help="supervised rows of the projection memory figure (0: skip it)")
    args = ap.parse_args()
    if args.stage_only:
        stage_timing(args)
        return

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
        off, t_off = timed(align_offsets, ps, ss)
        dtw, t_dtw = timed(align_dtw, ps, ss)
        banded, t_band = timed(align_dtw_banded, ps, ss)
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
        pm = {name: prefix_metrics(ps, ss, sup, pr) for name, pr in (("offsets", off), ("dtw", dtw))}
        for name, x in pm.items():
            print(f"{name:8s} coverage {x['coverage']:.4f}  prefix_precision {x['prefix_precision']:.4f}  "
                  f"(ceiling {x['ceiling']:.4f}; {x['rows']} supervised pivot rows; "
                  f"{x['texts_differ']} pairs spelling different text left out)")
        results[source] = dict(naive=t_naive, dtw=t_dtw, band=t_band, off=t_off, agree=agree, same=same, pm=pm,
                               verify=verify_shard_reads(ps, ss, sup, source))

    if args.long_pairs:
        ps, ss, _ = prepare("builtin:mistral-v1", "builtin:tekken", natural_conversations(args.long_pairs, chars=12000),
                            2048)
        full_l, t_full_l = timed(align_dtw, ps, ss)
        band_l, t_band_l = timed(align_dtw_banded, ps, ss)
        same_l = np.mean(np.concatenate(full_l) == np.concatenate(band_l))
        print(f"\n2048 tokens, tekken, {len(ps)} pairs ({np.mean([len(p) for p in ps]):.0f} pivot tokens): full DTW "
              f"{t_full_l / len(ps):.3f} s/pair, banded {t_band_l / len(ps):.3f} s/pair, "
              f"same pairing on {same_l:.2%}")
        print(f"banded_speedup_2048: {t_full_l / t_band_l:.2f}")

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
    names = {"builtin:tekken": "tekken→v1", "builtin:mistral-v3": "v3→v1"}
    for key in ("coverage", "prefix_precision", "ceiling"):
        print(f"{key}: " + " | ".join(f"{names[k]} {r['pm']['offsets'][key]:.4f}" for k, r in results.items())
              + "  (default method, offsets)")
    print(f"align_speedup_vs_naive_dtw: {main_r['naive'] / main_r['off']:.1f}")
    print(f"agreement_with_dtw: {main_r['agree']:.4f}")
    print(f"mined_map_seconds: {mined_s:.1f}")
    share = main_r["verify"] / (main_r["off"] + main_r["verify"])
    print(f"verification of the shards read (pivot and source representations, vocabulary map): "
          f"{main_r['verify'] * 1e3:.1f} ms against {main_r['off'] * 1e3:.1f} ms of sequence alignment alone "
          f"(an upper bound: the stage also projects every distribution)")
    print(f"verify_share_of_align: {share:.4f}")
    if args.project_rows:
        projection_memory(args.project_rows)
    if args.stage_seqs:
        stage_timing(args)


def projection_memory(rows: int, k: int = 10, seq_len: int = 400, vocab: int = 32000) -> None:
    """Peak memory ``project`` allocates beyond its inputs, per supervised row: random top-k
    rows of a shard of ``rows`` rows, every row paired, every id mapped (one more than the
    pivot's id: no identity shortcut). Rows are merged in chunks, so the figure per row falls
    as shards grow instead of staying at the [rows, k, k] temporaries' ~1.1 kB."""
    import tracemalloc

    from fusechat_core.align.project import project
    from fusechat_core.align.vocab import EXACT, VocabMap
    from fusechat_core.represent import Representation

    rng = np.random.default_rng(0)
    n_seq = max(1, rows // (seq_len - 1))
    ids = rng.integers(0, vocab, n_seq * seq_len).astype(np.uint16)
    seq_offsets = np.arange(n_seq + 1, dtype=np.int64) * seq_len
    positions = np.tile(np.arange(1, seq_len, dtype=np.uint16), n_seq)
    sup_offsets = np.arange(n_seq + 1, dtype=np.int64) * (seq_len - 1)

    def representation() -> Representation:
        lp = np.sort(np.log(rng.dirichlet(np.ones(k), len(positions)) * 0.9), axis=1)[:, ::-1]
        return Representation(ids, seq_offsets, positions, sup_offsets,
                              rng.integers(0, vocab, (len(positions), k)).astype(np.uint16),
                              np.ascontiguousarray(lp.astype(np.float16)), np.ones(n_seq, np.float32),
                              meta={"vocab_size": vocab})

    pivot, source = representation(), representation()
    shifted = VocabMap(np.roll(np.arange(vocab, dtype=np.int32), 1), np.full(vocab, EXACT, np.uint8),
                       np.zeros(vocab, np.int32))
    pairing = [np.arange(seq_len, dtype=np.int64) for _ in range(n_seq)]
    tracemalloc.start()
    project(pivot, source, pairing, shifted)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\nprojection of {len(positions)} rows (top-{k}): {peak / 2**20:.0f} MiB allocated at peak")
    print(f"project_peak_bytes_per_row: {peak / len(positions):.0f}")


def _synthetic_shard(spec, rows, index: int, shards: int, max_length: int, k: int):
    """A REPRESENTATION shard of ``rows``' part ``index`` with the model's real tokenisation and a
    synthetic top-k (the label, then k-1 other ids; descending log-probs)."""
    from fusechat_core.chat import IGNORE
    from fusechat_core.models import formatter_for
    from fusechat_core.represent import Representation, id_dtype, position_dtype, shard_rows

    fmt = formatter_for(spec)
    part = [rows[j] for j in shard_rows(len(rows), index, shards)]
    vocab = len(fmt.tokenizer)
    rng = np.random.default_rng(index)
    ids, seq_off, sup, sup_off, tk = [], [0], [], [0], []
    for row in part:
        r = fmt.encode(row["conversations"], max_length)
        ids += r.input_ids
        seq_off.append(len(ids))
        pos = [t for t in range(1, len(r.labels)) if r.labels[t] != IGNORE]
        sup += pos
        sup_off.append(len(sup))
        labels = np.asarray(r.input_ids, np.int64)[pos]
        tk.append(np.concatenate([labels[:, None], rng.integers(0, vocab, (len(pos), k - 1))], axis=1))
    top = np.concatenate(tk) if tk else np.zeros((0, k), np.int64)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k), len(top)) + 1e-6), axis=1)[:, ::-1]
    dt = id_dtype(vocab)
    meta = {"model": spec.name, "vocab_size": vocab, "top_k": k, "max_length": max_length,
            "row_ids": [r["id"] for r in part], "n_seq": len(part), "n_tokens": len(ids), "n_supervised": len(sup)}
    return Representation(np.array(ids, dt), np.array(seq_off, np.int64), np.array(sup, position_dtype(max_length)),
                          np.array(sup_off, np.int64), top.astype(dt), np.ascontiguousarray(lp, np.float16),
                          np.ones(len(part), np.float32), meta)


def stage_timing(args) -> dict[str, float]:
    """The whole align stage (``align_shard_artifact``), timed with verification, and the
    verification's share of it (see the module docstring)."""
    import json
    import tempfile

    from fusechat_core import store as store_mod
    from fusechat_core.align import align_shard_artifact, build_vocab_map_artifact
    from fusechat_core.config import parse_config
    from fusechat_core.data import build_dataset_artifact, read_split
    from fusechat_core.plan import RunPlan
    from fusechat_core.represent import write_shard

    with tempfile.TemporaryDirectory(prefix="fusechat-bench-align-stage-") as tmp:
        data = Path(tmp) / "chat.jsonl"
        data.write_text("\n".join(json.dumps({"conversations": c}, ensure_ascii=False)
                                  for c in natural_conversations(args.stage_seqs)))
        cfg = parse_config({
            "name": "bench-align", "store": f"file://{tmp}/store",
            "pivot": {"name": "pivot", "path": "builtin:mistral-v1", "chat_template": "mistral"},
            "sources": [{"name": "tekken", "path": "builtin:tekken", "chat_template": "mistral"}],
            "data": {"sources": [{"path": str(data), "name": "chat"}], "max_length": args.stage_tokens,
                     "heldout_fraction": 0.05},
            "represent": {"top_k": args.stage_top_k, "max_length": args.stage_tokens, "shards": args.stage_shards},
            "align": {"vocab_mapping": "prefix"},
        })
        store = store_mod.ArtifactStore(cfg.store)
        plan = RunPlan(cfg)
        build_dataset_artifact(cfg, store, plan.dataset)
        rows = read_split(store, plan.dataset, "train")
        source = cfg.sources[0]
        for spec in cfg.models:
            for i in range(cfg.represent.shards):
                rep = _synthetic_shard(spec, rows, i, cfg.represent.shards, cfg.represent.max_length,
                                       cfg.represent.top_k)
                with store.writer(plan.represent_shard(spec, i), meta=rep.meta) as w:
                    write_shard(w, rep)
        build_vocab_map_artifact(cfg, store, plan.vocab_map(source), source, progress=lambda _: None)
        read_bytes = sum(store.require(a).size for a in
                         [plan.dataset, plan.vocab_map(source)]
                         + [plan.represent_shard(m, i) for m in cfg.models for i in range(cfg.represent.shards)])

        def one_pass() -> tuple[float, float]:
            with store_mod._VERIFIED_LOCK:
                store_mod._VERIFIED_READS.clear()  # nothing remembered: every byte read is hashed
            v0, t0 = store_mod.VERIFY_SECONDS[0], time.perf_counter()
            for i in range(cfg.represent.shards):
                align_shard_artifact(cfg, store, source, i, progress=lambda _: None)
            return time.perf_counter() - t0, store_mod.VERIFY_SECONDS[0] - v0

        one_pass()  # warm-up: tokenizers loaded and cached, as in a running worker
        passes = [one_pass() for _ in range(3)]
        total, verify = min(passes, key=lambda p: p[0])
    share = verify / total
    print(f"\n== whole align stage (align_shard_artifact), {len(rows)} rows in {cfg.represent.shards} shards, "
          f"pivot builtin:mistral-v1, source builtin:tekken, top-{cfg.represent.top_k}, "
          f"max_length {cfg.represent.max_length}; {read_bytes / 2**20:.1f} MiB of artifacts read")
    print(f"stage wall time {total:.3f} s (best of {len(passes)}: " + ", ".join(f"{p[0]:.3f}" for p in passes)
          + f"); of it hashing what was read {verify * 1e3:.1f} ms "
          f"({read_bytes / max(verify, 1e-9) / 2**20:.0f} MiB/s); without it {total - verify:.3f} s")
    print(f"verify_share_of_align_stage: {share:.4f}")
    return {"total": total, "verify": verify, "share": share}


def verify_shard_reads(ps, ss, sup, source: str, k: int = 10) -> float:
    """Seconds the align stage spends verifying what it reads for these pairs: the pivot's and
    the source's REPRESENTATION shards (as many bytes as the contract stores for them: ids,
    supervised positions, top-k ids and float16 log-probs) and the vocabulary map, hashed
    against their manifests when the store hands them out (``fetch``), as the stage does."""
    import tempfile

    from fusechat_core.store import VERIFY_SECONDS, ArtifactStore

    n_p, n_s = sum(len(p) for p in ps), sum(len(s) for s in ss)
    sup_p = int(sum(int(np.sum(m)) for m in sup))
    sup_s = int(sup_p * n_s / max(n_p, 1))
    id_s = 4 if "tekken" in source else 2  # int32 ids above 65,536 entries
    sizes = {"pivot": n_p * 2 + sup_p * (2 + k * 4), "source": n_s * id_s + sup_s * (2 + k * (id_s + 2)),
             "vocab_map": (131072 if "tekken" in source else 32768) * 9}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fusechat-bench-align-") as tmp:
        store = ArtifactStore(f"file://{tmp}/store")
        for name, size in sizes.items():
            with store.writer(f"bench/{name}") as w:
                w.write_bytes("data.bin", rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        before = VERIFY_SECONDS[0]
        for name in sizes:
            store.fetch(f"bench/{name}")
        return VERIFY_SECONDS[0] - before


if __name__ == "__main__":
    main()
