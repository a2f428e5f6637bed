"""Distribution projection (SPEC §1.3): a source's top-k, moved onto the pivot's rows.

The rows of an aligned shard are the pivot's supervised rows: row r is the
pivot's prediction of token ``t`` (= ``sup_positions[r]``) from the text
before it. When ``sequence.py`` pairs pivot token ``t`` with source token
``u`` (the same text precedes both) and the source supervised ``u``, the
source's row for ``u`` is a prediction of what follows that same text.

**Mapping its top-k onto pivot tokens, one rule for every row:** each source
candidate goes to the pivot token the vocabulary map gives it (``vocab.py``).
With ``align.vocab_mapping: prefix`` (the demo's) that is *the pivot token the
candidate's text starts with*: its exact twin, else the pivot tokenizer's
first piece of its text. So where the source predicts a longer piece than
the pivot's next token (`` bullying`` where the pivot writes ``▁bul`` +
``lying``; ``.\n`` where it writes ``.`` + ``\n``) the mass lands on the
pivot's first piece of it (``▁bul``, ``.``), and where it predicts a shorter
one (``'`` where the pivot writes ``'s``) on that shorter piece, a token the
pivot can write there too. With ``mined`` (the paper's) a candidate without
an exact twin goes to its minimum-edit-distance token instead, as in FuseLLM.
**Duplicates merge by summing their probabilities** (`` bullying`` and
`` bull`` both land on ``▁bul``: the pivot's next token is ``▁bul`` if
either is right); the published scripts keep the first (largest) entry
instead, which under-weights exactly the pieces many source tokens start
with. Candidates that map nowhere are dropped (their mass is counted).

Every other row falls back to a one-hot on the pivot's token ``t`` itself,
the *label* of the row, i.e. the next token after the input position
``t-1``: rows whose context ends inside a source token (``lying`` after
`` bul``), rows the source did not supervise, and paired rows whose top-k
maps nowhere (an empty teacher is no teacher). (The original FuseLLM code put
the one-hot on the input token ``t-1``, an off-by-one this module must not
repeat.)

Log-probs are carried as they are (not renormalised): the fusion function
renormalises over the kept entries at its temperature (SPEC §1.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusechat_core.align.vocab import EXACT, MINED, PREFIX, VocabMap
from fusechat_core.represent import Representation


def row_sequence(rep: Representation) -> np.ndarray:
    """Sequence index of every supervised row of a representation shard."""
    return np.repeat(np.arange(rep.n_seq, dtype=np.int64), np.diff(rep.sup_offsets.astype(np.int64)))


ALIGNED_ARRAYS = ("sup_offsets", "topk_ids", "topk_logprobs", "metric_ce", "fallback")


@dataclass
class Aligned:
    """The arrays of one ALIGNED shard and its statistics (read back: the shard's meta)."""

    sup_offsets: np.ndarray  # int64 [n_seq+1], the pivot's
    topk_ids: np.ndarray  # int32 [rows, k]
    topk_logprobs: np.ndarray  # float16 [rows, k]
    metric_ce: np.ndarray  # float32 [n_seq], the source's
    fallback: np.ndarray  # bool [rows]
    stats: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ALIGNED_ARRAYS}

    @property
    def n_seq(self) -> int:
        return len(self.sup_offsets) - 1

    def validate(self, where: str) -> None:
        """Shapes and offsets agree with each other (what a reader relies on); ValueError naming ``where``."""
        n, rows = self.n_seq, (int(self.sup_offsets.reshape(-1)[-1]) if self.sup_offsets.size else -1)
        checks = [
            (self.sup_offsets.ndim == 1 and n >= 0, "sup_offsets must be 1-D with n_seq+1 entries"),
            (n < 0 or (self.sup_offsets[0] == 0 and bool((np.diff(self.sup_offsets) >= 0).all())),
             "sup_offsets must start at 0 and not decrease"),
            (self.topk_ids.ndim == 2 and self.topk_ids.shape[0] == rows,
             f"topk_ids {list(self.topk_ids.shape)} must be [{rows}, k]"),
            (self.topk_logprobs.shape == self.topk_ids.shape,
             f"topk_logprobs {list(self.topk_logprobs.shape)} must have topk_ids' shape"),
            (self.metric_ce.shape == (n,), f"metric_ce must be [{n}]"),
            (self.fallback.shape == (rows,), f"fallback must be [{rows}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{where}: {message}")


def same_sequences(pivot: Representation, source: Representation) -> bool:
    """True when both models tokenised every sequence to the same ids (checked, never assumed)."""
    return (np.array_equal(pivot.seq_offsets, source.seq_offsets)
            and np.array_equal(pivot.input_ids.astype(np.int64, copy=False),
                               source.input_ids.astype(np.int64, copy=False)))


def _source_rows(pivot: Representation, source: Representation, pair_pos: np.ndarray,
                 row_seq: np.ndarray) -> np.ndarray:
    """For each pivot row, the source row predicting source position ``pair_pos`` (-1: none)."""
    s_seq = row_sequence(source)
    width = int(max(np.diff(source.seq_offsets).max(initial=0), np.diff(pivot.seq_offsets).max(initial=0))) + 1
    # Source rows are in (sequence, position) order, so their keys are sorted.
    s_key = s_seq * width + source.sup_positions.astype(np.int64)
    if len(s_key) > 1 and not (np.diff(s_key) > 0).all():
        raise ValueError("source sup_positions are not strictly increasing within each sequence")
    p_key = row_seq * width + pair_pos
    if len(s_key) == 0:
        return np.full(len(p_key), -1, np.int64)
    at = np.clip(np.searchsorted(s_key, p_key), 0, len(s_key) - 1)
    return np.where((pair_pos >= 1) & (s_key[at] == p_key), at, -1)


def comparable_metric_ce(pivot: Representation, source: Representation) -> np.ndarray:
    """The source's per-sequence cross-entropy on the pivot's scale, for MinCE to compare.

    ``metric_ce`` is a mean per token of the model's own tokenizer. Two tokenizers cut the
    same answer into different numbers of tokens, so their per-token means do not rank
    the teachers: in the demo, tekken spends 3.8 tokens on an arithmetic answer that
    Mistral v1 spends 4.65 on, and per-token MinCE picked llama for 32% of arithmetic
    sequences when its likelihood of the whole answer was the higher on 95%. The
    source's *total* NLL over the
    supervised text, divided by the pivot's supervised token count, ranks exactly as the
    two models' likelihoods of that text do. With one tokenization (the paper's case)
    the counts are equal and this is ``metric_ce`` itself.

    A sequence that either view cut (``meta.cut_rows`` of a representation: the model saw
    only its first ``represent.max_length`` tokens) has no two likelihoods of one text (the
    source's whole answer over the pivot's prefix count, or the other way round); it is
    ranked as good as the pivot, no better: its value is the pivot's own ``metric_ce``
    (MinCE keeps the pivot on ties, AvgCE weighs the two alike).
    """
    ce = source.metric_ce.astype(np.float64)
    n_source = np.diff(source.sup_offsets.astype(np.int64))
    n_pivot = np.diff(pivot.sup_offsets.astype(np.int64))
    if np.array_equal(n_source, n_pivot):
        scaled = source.metric_ce.astype(np.float32).copy()
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(n_pivot > 0, ce * n_source / np.maximum(n_pivot, 1), np.nan).astype(np.float32)
    cut = np.union1d(cut_sequences(source), cut_sequences(pivot))
    if len(cut):
        scaled[cut] = np.asarray(pivot.metric_ce, dtype=np.float32)[cut]
    return scaled


def cut_sequences(rep: Representation) -> np.ndarray:
    """Indices of the shard's sequences the model saw only a prefix of (``represent``'s cut views)."""
    return np.asarray((rep.meta or {}).get("cut_rows", []), dtype=np.int64)


PROJECT_CHUNK_ROWS = 1 << 16  # paired rows merged at once (``project``)


def _merge_candidates(topk_ids: np.ndarray, topk_lp: np.ndarray, vmap: VocabMap
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paired rows' source candidates on pivot ids: (ids, log-probs, rows left empty, the mass
    that mapped exactly, by minimum edit distance, by prefix, and in all)."""
    k = topk_ids.shape[1]
    raw_ids = topk_ids.astype(np.int64)
    raw_lp = topk_lp.astype(np.float32)
    # Descending log-prob first, so "first occurrence of an id" is "its larger log-prob".
    order = np.argsort(-raw_lp, axis=1, kind="stable")
    raw_ids = np.take_along_axis(raw_ids, order, axis=1)
    raw_lp = np.take_along_axis(raw_lp, order, axis=1)
    kind = vmap.kind[raw_ids]
    mapped = vmap.ids[raw_ids].astype(np.int64)
    mass = np.exp(raw_lp)
    masses = np.array([mass[kind == EXACT].sum(), mass[kind == MINED].sum(), mass[kind == PREFIX].sum(),
                       mass.sum()], dtype=np.float64)
    same = (mapped[:, :, None] == mapped[:, None, :]) & (mapped[:, :, None] >= 0)
    earlier_same = same & np.tri(k, k, -1, dtype=bool)[None]
    valid = (mapped >= 0) & ~earlier_same.any(axis=2)
    # Candidates landing on one pivot id merge into one entry holding their summed probability.
    with np.errstate(divide="ignore"):
        merged_lp = np.log((same * mass[:, None, :]).sum(axis=2)).astype(np.float32)
    # Kept entries to the front, in descending merged log-prob (ties: the source's order).
    pack = np.argsort(np.where(valid, -merged_lp, np.inf), axis=1, kind="stable")
    valid = np.take_along_axis(valid, pack, axis=1)
    out_ids = np.where(valid, np.take_along_axis(mapped, pack, axis=1), 0)
    out_lp = np.where(valid, np.take_along_axis(merged_lp, pack, axis=1), -np.inf)
    return out_ids, out_lp, ~valid.any(axis=1), masses


def project(pivot: Representation, source: Representation, pairing: Sequence[np.ndarray] | None,
            vmap: VocabMap) -> Aligned:
    """Map ``source``'s distributions onto ``pivot``'s supervised rows.

    ``pairing[s][t]`` is the source token preceded by the same text as pivot
    token ``t`` of sequence ``s`` (-1: none); ``None`` means the sequences are
    identical (verified by the caller with ``same_sequences``) so every token
    pairs with itself.
    """
    n_rows = len(pivot.sup_positions)
    k = source.topk_ids.shape[1] if source.topk_ids.ndim == 2 else 0
    if len(source.metric_ce) != pivot.n_seq:
        raise ValueError(f"source has {len(source.metric_ce)} sequences, pivot {pivot.n_seq}")
    sup_offsets = pivot.sup_offsets.astype(np.int64)
    metric_ce = comparable_metric_ce(pivot, source)
    top_id = int(source.topk_ids.max()) if source.topk_ids.size else -1
    # Identity over the tokenizer's ids, which every candidate is: the embedding rows past the
    # tokenizer (a model padded to a multiple of 64, as Qwen2.5's 151,665 tokens in 152,064
    # rows) map nowhere, but no candidate is one of them.
    identity = vmap.is_identity and top_id < len(vmap.ids)
    vmap = vmap.padded(max(int(source.meta.get("vocab_size") or 0), top_id + 1))

    if pairing is None and identity and np.array_equal(pivot.sup_offsets, source.sup_offsets) \
            and np.array_equal(pivot.sup_positions, source.sup_positions):
        # Identity: same tokens, same vocabulary, same rows. Nothing to compute.
        ids = source.topk_ids.astype(np.int32)
        p = np.exp(source.topk_logprobs.astype(np.float32))
        total = float(p.sum())
        stats = _stats(n_rows, np.zeros(n_rows, bool), 0, total, total, 0.0, identity=True)
        stats["source_cut_sequences"] = len(cut_sequences(source))
        return Aligned(sup_offsets, ids, source.topk_logprobs.astype(np.float16), metric_ce,
                       np.zeros(n_rows, bool), stats)

    row_seq = row_sequence(pivot)
    t = pivot.sup_positions.astype(np.int64)
    if pairing is None:
        pair_pos = t
    else:
        if len(pairing) != pivot.n_seq:
            raise ValueError(f"pairing has {len(pairing)} sequences, pivot {pivot.n_seq}")
        flat = np.concatenate([np.asarray(x, np.int64) for x in pairing]) if len(pairing) else np.zeros(0, np.int64)
        if len(flat) != len(pivot.input_ids):
            raise ValueError(f"pairing covers {len(flat)} pivot tokens, the shard has {len(pivot.input_ids)}")
        pair_pos = flat[pivot.seq_offsets[row_seq].astype(np.int64) + t]
    src_row = _source_rows(pivot, source, pair_pos, row_seq)
    paired = src_row >= 0

    ids = np.zeros((n_rows, k), np.int32)
    lps = np.full((n_rows, k), -np.inf, np.float32)
    empty = np.zeros(n_rows, bool)
    masses = np.zeros(4)  # exact, mined, prefix, all
    rows = np.nonzero(paired)[0]
    # In chunks: merging builds [rows, k, k] temporaries (~1.1 kB a row at k = 10), tens of GB
    # for a whole 95k-conversation shard at once.
    for start in range(0, len(rows), PROJECT_CHUNK_ROWS):
        chunk = rows[start:start + PROJECT_CHUNK_ROWS]
        ids[chunk], lps[chunk], empty[chunk], chunk_masses = _merge_candidates(
            source.topk_ids[src_row[chunk]], source.topk_logprobs[src_row[chunk]], vmap)
        masses += chunk_masses
    exact_mass, mined_mass, prefix_mass, total_mass = (float(m) for m in masses)
    fallback = ~paired | empty

    labels = pivot.input_ids[pivot.seq_offsets[row_seq].astype(np.int64) + t].astype(np.int32)
    ids[fallback] = 0
    lps[fallback] = -np.inf
    ids[fallback, 0] = labels[fallback]
    lps[fallback, 0] = 0.0
    stats = _stats(n_rows, fallback, int(empty.sum()), total_mass, exact_mass, mined_mass, identity=False,
                   prefix=prefix_mass)
    stats["source_cut_sequences"] = len(cut_sequences(source))
    return Aligned(sup_offsets, ids, lps.astype(np.float16), metric_ce, fallback, stats)


def _stats(n_rows: int, fallback: np.ndarray, n_empty: int, total: float, exact: float, mined: float, *,
           identity: bool, prefix: float = 0.0) -> dict[str, Any]:
    n_fb = int(fallback.sum())
    denom = total if total > 0 else 1.0
    return {
        "rows": n_rows,
        "one_to_one": n_rows - n_fb,
        "fallback": n_fb,
        "fallback_unmapped_topk": n_empty,
        "share_one_to_one": (n_rows - n_fb) / n_rows if n_rows else 0.0,
        "share_fallback": n_fb / n_rows if n_rows else 0.0,
        # shares of the paired rows' top-k probability mass
        "mass_exact": exact / denom,
        "mass_prefix": prefix / denom,
        "mass_mined": mined / denom,
        "mass_unmapped": max(0.0, total - exact - prefix - mined) / denom,
        # raw sums, so shard statistics add up to the stage's
        "mass_sums": {"total": total, "exact": exact, "prefix": prefix, "mined": mined},
        "identity": identity,
    }
