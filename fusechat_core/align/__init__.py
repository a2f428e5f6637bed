"""The alignment stage (SPEC §1.3): each source's distributions, at the pivot's rows, in pivot ids.

Two artifacts per source:

- ``plan.vocab_map(source)``: the source → pivot vocabulary map (``vocab.py``),
  keyed by the two tokenizers only, so every run with the same pair reuses it.
- ``plan.align(source)``: made of one ALIGNED shard per representation shard
  (``plan.align_shard(source, i)``), each its own artifact, so a killed run
  redoes only unfinished shards; the stage artifact's manifest (shard
  addresses and digests, summed statistics) is written once all are complete.

Sequence pairing needs the text behind the stored token ids. Shard ``i`` of
the pivot and of the source hold the same dataset rows in the same order, so
each conversation is rendered again with each model's ``ChatFormatter``; the
re-rendered ids are checked against the shard (a different tokenizer or
template than the representation stage used is an error, never a silent
misalignment). A pivot row is paired with the source row that follows the
same text (``sequence.py``): positions in the rendered text when both models
render the conversation to the same text, and otherwise in the
conversation's message contents, the only text both renderings share
(``sequence.content_char_map``): tokens starting in template markup are then
never paired and those rows fall back to the label.

A source's representation may hold a cut view of a row (the dataset fits blocks to
the pivot's tokenizer only; see ``fusechat_core.represent``): the re-rendered ids
are compared on the stored prefix, pairing covers that prefix, and every pivot
row beyond it falls back to the label. Such sequences are counted
(``source_cut_sequences``) in each shard's and the stage's summary.

When the pivot's and the source's token ids are identical on the whole shard
(checked array against array), no text is rendered and no pairing computed:
the identity is the pairing, and with an identity vocabulary map the top-k
pass through untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusechat_core.align.project import ALIGNED_ARRAYS, Aligned, project, row_sequence, same_sequences
from fusechat_core.align.sequence import (
    SEQUENCE_ALIGNERS,
    TokenSeq,
    align_sequences,
    content_char_map,
    prefix_starts,
)
from fusechat_core.align.vocab import VocabMap, build_vocab_map, vocabulary
from fusechat_core.config import ModelSpec, RunConfig
from fusechat_core.represent import Representation, bad_logprob
from fusechat_core.store import ArtifactStore, StoreError

log = logging.getLogger("fusechat.align")

ALIGNED_FILE = "aligned.safetensors"
VOCAB_MAP_FILE = "vocab_map.safetensors"
META_FILE = "meta.json"

Progress = Callable[[str], None]


class AlignError(ValueError):
    """Alignment inputs do not fit together; the message is one line naming shard, row or field."""


# -- reading and writing the contracts -----------------------------------------------
def read_representation(store: ArtifactStore, address: str) -> Representation:
    """One REPRESENTATION shard, memory-mapped and checked against its contract (``represent.read_shard``)."""
    from fusechat_core.represent import RepresentError, read_shard

    try:
        return read_shard(store, address)
    except RepresentError as exc:
        raise AlignError(str(exc)) from None


def open_aligned(folder: str | Path, where: str | None = None) -> Aligned:
    """The one reader of an ALIGNED shard folder (as ``write_aligned`` writes it), memory-mapped
    like representation shards (``represent.open_arrays``) and checked; ``where`` names it in errors.
    """
    from fusechat_core.represent import RepresentError, open_arrays

    where = where or str(Path(folder) / ALIGNED_FILE)
    try:
        arrays, meta = open_arrays(folder, ALIGNED_FILE, ALIGNED_ARRAYS, where)
        aligned = Aligned(**arrays, stats=meta)
        aligned.validate(where)
    except (RepresentError, ValueError) as exc:
        raise AlignError(str(exc)) from None
    return aligned


def write_vocab_map(store: ArtifactStore, address: str, vmap: VocabMap, meta: dict[str, Any]) -> None:
    from safetensors.numpy import save

    meta = {**meta, **vmap.stats}
    with store.writer(address, meta={"stage": "vocab_map", **meta}) as w:
        w.write_bytes(VOCAB_MAP_FILE, save(vmap.tensors()))
        w.write_json(META_FILE, _deterministic(meta))


def read_vocab_map(store: ArtifactStore, address: str) -> VocabMap:
    from safetensors.numpy import load

    arrays = load(store.read_bytes(address, VOCAB_MAP_FILE))
    return VocabMap(arrays["ids"], arrays["kind"], arrays["distance"], store.read_json(address, META_FILE))


def write_aligned(store: ArtifactStore, address: str, aligned: Aligned, meta: dict[str, Any]) -> None:
    from safetensors.numpy import save

    meta = {**meta, **aligned.stats}
    with store.writer(address, meta={"stage": "align", **meta}) as w:
        w.write_bytes(ALIGNED_FILE, save(aligned.tensors()))
        w.write_json(META_FILE, _deterministic(meta))


def _deterministic(meta: dict[str, Any]) -> dict[str, Any]:
    # Timings go to the manifest only: a shard redone after a kill must be byte-identical.
    return {k: v for k, v in meta.items() if k != "seconds"}


# -- vocabulary map stage -------------------------------------------------------------
def model_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer a model's representations were made with (the representation stage's rule)."""
    from fusechat_core.models import tokenizer_of

    return tokenizer_of(spec)


def build_vocab_map_artifact(cfg: RunConfig, store: ArtifactStore, address: str, source: ModelSpec,
                             progress: Progress | None = None) -> dict[str, Any]:
    """The source → pivot vocabulary map of one source, written under ``address``."""
    from fusechat_core.models import tokenizer_ref

    say = progress or log.info
    pivot_tok = model_tokenizer(cfg.pivot)
    pivot_vocab = vocabulary(pivot_tok)
    source_vocab = vocabulary(model_tokenizer(source))
    vmap = build_vocab_map(source_vocab, pivot_vocab, mapping=cfg.align.vocab_mapping,
                           threshold=cfg.align.mined_threshold, pivot_tokenizer=pivot_tok)
    meta = {"source": source.name, "source_tokenizer": list(tokenizer_ref(source)),
            "pivot_tokenizer": list(tokenizer_ref(cfg.pivot)), "source_family": source_vocab.family,
            "pivot_family": pivot_vocab.family}
    write_vocab_map(store, address, vmap, meta)
    s = vmap.stats
    say(f"vocab map {source.name} → {cfg.pivot.name}: {s['exact']} exact, {s['prefix']} prefix, {s['mined']} MinED, "
        f"{s['unmapped']} unmapped, identity={s['identity']} ({s['seconds']} s)")
    return vmap.stats


# -- sequence pairing from text ---------------------------------------------------------
def _render(formatter: Any, conversations: Sequence[Any]) -> list[str]:
    from fusechat_core.chat import to_messages

    return [formatter.text(to_messages(c)) for c in conversations]


def _tokenised(formatter: Any, texts: list[str], rep: Representation, row_ids: Sequence[Any],
               who: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, offsets) of each rendering, cut to the shard's length and checked against it."""
    enc = formatter.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for s, (ids, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        stored = rep.ids(s)
        ids = np.asarray(ids[:len(stored)], dtype=np.int64)
        if len(ids) != len(stored) or not np.array_equal(ids, stored.astype(np.int64)):
            raise AlignError(f"align: row {row_ids[s]!r}: the {who}'s re-rendered tokens differ from its "
                             f"representation shard (was it made with another tokenizer or chat template?)")
        out.append((ids, np.asarray(offs[:len(stored)], dtype=np.int64).reshape(-1, 2)))
    return out


def pair_sequences(method: str, conversations: Sequence[Any], row_ids: Sequence[Any],
                   pivot: Representation, source: Representation, pivot_formatter: Any,
                   source_formatter: Any, pivot_strings: np.ndarray,
                   source_strings: np.ndarray) -> list[np.ndarray]:
    """For each sequence, the source token preceded by the same text as each pivot token (-1: none).

    ``pivot_strings``/``source_strings``: canonical token strings indexed by id
    (object arrays), for DTW's costs and text checks and for placing byte pieces.
    """
    from fusechat_core.chat import to_messages

    p_texts = _render(pivot_formatter, conversations)
    s_texts = _render(source_formatter, conversations)
    p_tok = _tokenised(pivot_formatter, p_texts, pivot, row_ids, "pivot")
    s_tok = _tokenised(source_formatter, s_texts, source, row_ids, "source")
    p_seqs, s_seqs = [], []
    for s, conv in enumerate(conversations):
        (pid, poff), (sid, soff) = p_tok[s], s_tok[s]
        p_str, s_str = list(pivot_strings[pid]), list(source_strings[sid])
        if method.startswith("dtw"):
            p_seqs.append(TokenSeq(p_str))
            s_seqs.append(TokenSeq(s_str))
            continue
        pt, st = p_texts[s], s_texts[s]
        p_map = s_map = None
        if pt != st:
            contents = [m["content"] for m in to_messages(conv)]
            p_map, s_map = content_char_map(pt, contents)[0], content_char_map(st, contents)[0]
        p_seqs.append(TokenSeq(p_str, prefix_starts(pt, poff, p_map, p_str)))
        s_seqs.append(TokenSeq(s_str, prefix_starts(st, soff, s_map, s_str)))
    return align_sequences(method, p_seqs, s_seqs)


def _strings(vocab: Any, size: int) -> np.ndarray:
    arr = np.array([s if s is not None else "" for s in vocab.strings] + [""] * max(0, size - len(vocab)),
                   dtype=object)
    return arr


# -- align stage ------------------------------------------------------------------------
def align_shard(cfg: RunConfig, source: ModelSpec, pivot_rep: Representation, source_rep: Representation,
                vmap: VocabMap, conversations: Sequence[Any], row_ids: Sequence[Any],
                tokenizers: Callable[[], tuple[Any, Any]]) -> Aligned:
    """The ALIGNED arrays of one shard (pure computation; no store access).

    ``tokenizers()`` gives (pivot's, source's) tokenizer; it is called only when
    the sequences differ, so the identity path loads nothing.
    """
    from fusechat_core.chat import ChatFormatter

    if list(pivot_rep.meta.get("row_ids", row_ids)) != list(source_rep.meta.get("row_ids", row_ids)):
        raise AlignError(f"align {source.name}: pivot and source shards hold different rows")
    if pivot_rep.n_seq != source_rep.n_seq or pivot_rep.n_seq != len(conversations):
        raise AlignError(f"align {source.name}: {pivot_rep.n_seq} pivot sequences, {source_rep.n_seq} source "
                         f"sequences, {len(conversations)} dataset rows")
    t0 = time.perf_counter()
    method = cfg.align.method
    if same_sequences(pivot_rep, source_rep):
        pairing, used = None, "identity"
    else:
        used = "offsets" if method == "auto" else method
        p_tok, s_tok = tokenizers()
        if used == "offsets" and not (getattr(p_tok, "is_fast", False) and getattr(s_tok, "is_fast", False)):
            used = "dtw"
        if used not in SEQUENCE_ALIGNERS:
            raise AlignError(f"align.method: unknown sequence alignment {used!r}")
        p_str = _strings(vocabulary(p_tok), int(pivot_rep.input_ids.max(initial=0)) + 1)
        s_str = _strings(vocabulary(s_tok), int(source_rep.input_ids.max(initial=0)) + 1)
        pairing = pair_sequences(used, conversations, row_ids, pivot_rep, source_rep,
                                 ChatFormatter(p_tok, cfg.pivot.chat_template),
                                 ChatFormatter(s_tok, source.chat_template), p_str, s_str)
    aligned = project(pivot_rep, source_rep, pairing, vmap)
    aligned.stats.update({"sequence_alignment": used, "seconds": round(time.perf_counter() - t0, 3)})
    return aligned


def align_shard_artifact(cfg: RunConfig, store: ArtifactStore, source: ModelSpec, index: int,
                         progress: Progress | None = None) -> dict[str, Any]:
    """Align shard ``index`` of ``source`` and write it under ``plan.align_shard(source, index)``."""
    from fusechat_core.data.build import split_size, split_table
    from fusechat_core.plan import RunPlan
    from fusechat_core.represent import shard_rows

    say = progress or log.info
    plan = RunPlan(cfg)
    shards = cfg.represent.shards
    pivot_rep = read_representation(store, plan.represent_shard(cfg.pivot, index))
    source_rep = read_representation(store, plan.represent_shard(source, index))
    if (bad := bad_logprob(source_rep.topk_logprobs)) is not None:  # the rows projected are the source's
        raise AlignError(f"{plan.represent_shard(source, index)}: topk_logprobs row {bad[0]} is {bad[1]}")
    vmap = read_vocab_map(store, plan.vocab_map(source))
    span = shard_rows(split_size(store, plan.dataset, "train"), index, shards)
    rows = split_table(store, plan.dataset, "train", rows=span).to_pylist()  # this shard's rows only
    row_ids = [r["id"] for r in rows]
    if "row_ids" in pivot_rep.meta and list(pivot_rep.meta["row_ids"]) != row_ids:
        raise AlignError(f"align {source.name} shard {index}: the pivot's shard rows are not dataset rows "
                         f"[{index}*n/{shards}, {index + 1}*n/{shards})")
    try:
        aligned = align_shard(cfg, source, pivot_rep, source_rep, vmap, [r["conversations"] for r in rows], row_ids,
                              lambda: (model_tokenizer(cfg.pivot), model_tokenizer(source)))
    except ValueError as exc:  # AlignError and the projection's checks: which source and shard, first
        said = str(exc).removeprefix("align: ")
        raise AlignError(f"align {source.name} shard {index + 1}/{shards}: {said}") from exc
    meta = {"source": source.name, "pivot": cfg.pivot.name, "shard": index, "shards": shards,
            "n_seq": pivot_rep.n_seq, "row_ids": row_ids, "top_k": int(aligned.topk_ids.shape[1]),
            "vocab_size": int(pivot_rep.meta.get("vocab_size", 0)) or None,
            "vocab_map": plan.vocab_map(source)}
    address = plan.align_shard(source, index)
    write_aligned(store, address, aligned, meta)
    st = aligned.stats
    say(f"align {source.name} shard {index + 1}/{shards}: {st['rows']} rows, "
        f"{st['share_one_to_one']:.1%} 1-to-1, {st['share_fallback']:.1%} fallback, "
        f"{st['source_cut_sequences']} sequences cut for the source, "
        f"mass exact {st['mass_exact']:.1%} / prefix {st['mass_prefix']:.1%} / MinED {st['mass_mined']:.1%} "
        f"({st['sequence_alignment']})")
    return st


def finish_align_artifact(cfg: RunConfig, store: ArtifactStore, source: ModelSpec) -> dict[str, Any]:
    """The stage artifact: written only once every shard is complete; lists them and sums their stats."""
    from fusechat_core.plan import RunPlan

    plan = RunPlan(cfg)
    shards, stats = [], []
    for i in range(cfg.represent.shards):
        addr = plan.align_shard(source, i)
        try:
            man = store.require(addr)
        except StoreError:
            raise AlignError(f"align {source.name}: shard {i} ({addr}) is not complete") from None
        shards.append({"address": addr, "digest": man.digest})
        stats.append(man.meta)
    summary = summarise(stats)
    with store.writer(plan.align(source), meta={"stage": "align", "source": source.name, "shards": shards,
                                                **summary}) as w:
        w.write_json("summary.json", {"shards": shards, **summary})
    return summary


def summarise(shard_stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rows = sum(s["rows"] for s in shard_stats)
    fb = sum(s["fallback"] for s in shard_stats)
    sums = {k: sum(s["mass_sums"].get(k, 0.0) for s in shard_stats) for k in ("total", "exact", "prefix", "mined")}
    denom = sums["total"] or 1.0
    return {"rows": rows, "fallback": fb,
            # sequences the source saw only a prefix of (represent's cut views): their rows
            # beyond the prefix are among the fallbacks
            "source_cut_sequences": sum(s.get("source_cut_sequences", 0) for s in shard_stats),
            "share_one_to_one": (rows - fb) / rows if rows else 0.0,
            "share_fallback": fb / rows if rows else 0.0, "mass_exact": sums["exact"] / denom,
            "mass_prefix": sums["prefix"] / denom, "mass_mined": sums["mined"] / denom,
            "mass_unmapped": max(0.0, sums["total"] - sums["exact"] - sums["prefix"] - sums["mined"]) / denom,
            "identity": all(s.get("identity") for s in shard_stats),
            "sequence_alignment": sorted({s.get("sequence_alignment", "?") for s in shard_stats})}


__all__ = ["ALIGNED_ARRAYS", "ALIGNED_FILE", "AlignError", "Aligned", "Representation", "VocabMap", "align_shard",
           "align_shard_artifact", "build_vocab_map", "build_vocab_map_artifact", "finish_align_artifact",
           "model_tokenizer", "open_aligned", "pair_sequences", "project", "read_representation", "read_vocab_map",
           "row_sequence", "vocabulary"]
