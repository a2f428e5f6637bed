"""Vocabulary mapping (SPEC §1.3): each source token id → one pivot token id.

Token strings are first put into one *canonical* form so that tokenizers of
different families compare on what the tokens actually spell:

- SentencePiece (Mistral v1/v3, Llama 2): ``▁`` is a space, ``<0x0A>`` is the
  byte 0x0A;
- byte-level BPE (GPT-2 style, tekken): every character stands for one byte
  through the GPT-2 byte↔unicode table (``Ġ`` is a space, ``Ċ`` a newline);
- added/special tokens (``<s>``, ``[INST]``, ``<|end_of_turn|>``) are control
  tokens and spell their own content.

The canonical form is the token's bytes decoded as UTF-8 with
``surrogateescape``, so a token holding part of a multi-byte character still
has a distinct, comparable string (one code point per undecodable byte).

Matching, in order:

1. **Exact (EM)**: same canonical string. When several pivot tokens spell the
   same string (SentencePiece has both ``A`` and the byte token ``<0x41>``),
   a source token prefers a pivot token of its own kind (ordinary for
   ordinary, byte-fallback for byte-fallback: the one the pivot would emit in
   the same situation, and what makes a tokenizer map onto itself as the
   identity), then the lowest id.
2. **Prefix** (``mapping: prefix`` only): otherwise the pivot token the pivot
   tokenizer itself starts that text with. A source that spells `` lantern``
   as one token means "the next text is ' lantern'", which a Mistral pivot
   writes as ``▁lan`` + ``tern``: its mass belongs on ``▁lan``. MinED sends it
   to `` later`` instead (`` maiden`` to `` made``), a word the pivot would
   never write there, and in the demo that made distilling a tekken source
   worse than no fusion on the domain it is the expert of. Tokens whose text
   the pivot cannot start cleanly (a token boundary must fall where the text
   begins) go on to MinED.
3. **MinED**: otherwise the pivot token at minimum Levenshtein distance.
   **Tie-break: lowest distance, then lowest pivot id** (among the
   representatives of rule 1). Computed with ``rapidfuzz.process.cdist`` in
   chunks on every core.

Special tokens match only special tokens and only exactly: mapping
``[TOOL_CALLS]`` to whichever control token is a few edits away would put
probability mass on a meaningless target, so an unmatched special token is
unmapped (its mass is dropped, and counted). ``mined_threshold`` (normalised
distance, ``d / max(len)``) leaves too-distant tokens unmapped as well.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

UNMAPPED, EXACT, MINED, PREFIX = 0, 1, 2, 3
_SP_SPACE = "\u2581"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_family(tokenizer: Any) -> Literal["byte_level", "sentencepiece"]:
    """How a tokenizer spells bytes, read from its decoder (not guessed from its name)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        # A slow SentencePiece tokenizer has no backend; its pieces use ▁ and <0xXX>.
        return "sentencepiece"
    # the decoder's own state, not the whole tokenizer's JSON: serialising tekken's 131,072
    # tokens and merges to read one field took a second per call
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
    stack = [decoder]
    while stack:
        d = stack.pop()
        if d.get("type") == "ByteLevel":
            return "byte_level"
        stack.extend(d.get("decoders") or [])
    return "sentencepiece"


def _sp_bytes(piece: str) -> tuple[bytes, bool]:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)]), True
        except ValueError:
            pass
    return piece.replace(_SP_SPACE, " ").encode("utf-8"), False


def _bl_bytes(piece: str) -> bytes:
    table = _byte_decoder()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:  # a piece outside the byte alphabet (a user-added word): its own text
        return piece.encode("utf-8")


@dataclass
class Vocabulary:
    """A tokenizer's tokens in canonical form, indexed by id (``None`` for holes in the id space)."""

    strings: list[str | None]
    special: np.ndarray  # bool [V]: added/control tokens
    byte_fallback: np.ndarray  # bool [V]: SentencePiece <0xXX> tokens
    family: str

    def __len__(self) -> int:
        return len(self.strings)


def canonical(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def vocabulary(tokenizer: Any) -> Vocabulary:
    """The canonical strings of every token id of ``tokenizer``."""
    family = tokenizer_family(tokenizer)
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    strings: list[str | None] = [None] * size
    special = np.zeros(size, dtype=bool)
    byte_fb = np.zeros(size, dtype=bool)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    for piece, i in vocab.items():
        if i in added:
            continue
        if family == "byte_level":
            strings[i] = canonical(_bl_bytes(piece))
        else:
            raw, is_byte = _sp_bytes(piece)
            strings[i] = canonical(raw)
            byte_fb[i] = is_byte
    for i, content in added.items():
        if i < size:
            strings[i] = content
            special[i] = True
    return Vocabulary(strings, special, byte_fb, family)


@dataclass
class VocabMap:
    """``ids[s]`` = pivot id for source id ``s`` (-1: unmapped); ``kind`` = UNMAPPED/EXACT/MINED."""

    ids: np.ndarray  # int32 [V_source]
    kind: np.ndarray  # uint8 [V_source]
    distance: np.ndarray  # int32 [V_source]; 0 for exact, -1 for unmapped
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        n = len(self.ids)
        return bool(np.all(self.kind == EXACT) and np.array_equal(self.ids, np.arange(n, dtype=np.int32)))

    def padded(self, size: int) -> VocabMap:
        """The map over ``size`` ids: a model's embedding may have rows past its tokenizer."""
        if size <= len(self.ids):
            return self
        pad = size - len(self.ids)
        return VocabMap(np.concatenate([self.ids, np.full(pad, -1, np.int32)]),
                        np.concatenate([self.kind, np.zeros(pad, np.uint8)]),
                        np.concatenate([self.distance, np.full(pad, -1, np.int32)]), self.stats)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"ids": self.ids, "kind": self.kind, "distance": self.distance}


def _representatives(pivot: Vocabulary, want_special: bool, bytes_first: bool = False) -> dict[str, int]:
    """canonical string → pivot id: tokens of the preferred kind first, then lowest id."""
    order = sorted((i for i, s in enumerate(pivot.strings) if s is not None and pivot.special[i] == want_special),
                   key=lambda i: (bool(pivot.byte_fallback[i]) != bytes_first, i))
    out: dict[str, int] = {}
    for i in order:
        out.setdefault(pivot.strings[i], i)  # type: ignore[arg-type]
    return out


def build_vocab_map(source: Vocabulary, pivot: Vocabulary, *,
                    mapping: Literal["mined", "exact", "prefix"] = "mined", threshold: float | None = None,
                    chunk_rows: int = 4096, pivot_tokenizer: Any = None) -> VocabMap:
    """Map every source id to a pivot id: exact match, else (``prefix``) the pivot tokenizer's
    first piece of the token's text, else MinED (see the module doc)."""
    t0 = time.perf_counter()
    n = len(source)
    ids = np.full(n, -1, np.int32)
    kind = np.zeros(n, np.uint8)
    dist = np.full(n, -1, np.int32)
    ordinary = _representatives(pivot, want_special=False)
    ordinary_bytes = _representatives(pivot, want_special=False, bytes_first=True)
    specials = _representatives(pivot, want_special=True)
    pending: list[int] = []
    for i, s in enumerate(source.strings):
        if s is None:
            continue
        table = specials if source.special[i] else ordinary_bytes if source.byte_fallback[i] else ordinary
        j = table.get(s)
        if j is not None:
            ids[i], kind[i], dist[i] = j, EXACT, 0
        elif not source.special[i]:
            pending.append(i)
    n_exact = int((kind == EXACT).sum())
    if mapping == "prefix" and pending:
        if pivot_tokenizer is None:
            raise ValueError("vocab mapping 'prefix' needs the pivot tokenizer")
        pending = _prefix(source, pending, pivot_tokenizer, pivot, ids, kind, dist)
    if mapping in ("mined", "prefix") and pending:
        _mined(source, pending, ordinary, ids, kind, dist, threshold, chunk_rows)
    n_mined = int((kind == MINED).sum())
    n_prefix = int((kind == PREFIX).sum())
    present = sum(s is not None for s in source.strings)
    stats = {"source_tokens": present, "exact": n_exact, "prefix": n_prefix, "mined": n_mined,
             "unmapped": present - n_exact - n_prefix - n_mined,
             "unmapped_special": int(sum(1 for i, s in enumerate(source.strings)
                                         if s is not None and source.special[i] and kind[i] == UNMAPPED)),
             "mean_mined_distance": float(dist[kind == MINED].mean()) if n_mined else 0.0,
             "seconds": round(time.perf_counter() - t0, 3), "mapping": mapping, "threshold": threshold,
             "tie_break": "exact: same kind (ordinary/byte) first, then lowest pivot id; "
                          "prefix: the pivot tokenizer's first token of the text; "
                          "MinED: lowest edit distance, then lowest pivot id"}
    vm = VocabMap(ids, kind, dist, stats)
    stats["identity"] = vm.is_identity
    return vm


_LEAD = "\n"  # a context the pivot tokenizer ends a token at, so the source text starts a new one


def _prefix(source: Vocabulary, pending: list[int], tokenizer: Any, pivot: Vocabulary, ids: np.ndarray,
            kind: np.ndarray, dist: np.ndarray) -> list[int]:
    """Map each pending source token to the pivot token that begins its text; returns the rest."""
    todo = [i for i in pending if not any("\udc80" <= c <= "\udcff" for c in source.strings[i])]  # type: ignore[union-attr]
    rest = sorted(set(pending) - set(todo))
    for a in range(0, len(todo), 8192):
        part = todo[a:a + 8192]
        enc = tokenizer([_LEAD + source.strings[i] for i in part], add_special_tokens=False,  # type: ignore[operator]
                        return_offsets_mapping=True)
        for i, toks, offs in zip(part, enc["input_ids"], enc["offset_mapping"]):
            j = next((k for k, (x, y) in enumerate(offs) if x >= len(_LEAD) and y > x), None)
            # the text must start a token of its own: nothing before it reaches into the text
            clean = j is not None and offs[j][0] == len(_LEAD) and all(y <= len(_LEAD) for _, y in offs[:j])
            if clean and toks[j] < len(pivot) and not pivot.special[toks[j]]:
                ids[i], kind[i], dist[i] = toks[j], PREFIX, 0
            else:
                rest.append(i)
    return sorted(rest)


def _mined(source: Vocabulary, pending: list[int], ordinary: dict[str, int], ids: np.ndarray,
           kind: np.ndarray, dist: np.ndarray, threshold: float | None, chunk_rows: int) -> None:
    """MinED for the source tokens without an exact match, exactly, in growing radii.

    Radius 1 (half of all MinED tokens) by symmetric deletion: two strings at
    distance <= 1 share a string obtained by deleting at most one character
    from each, so a hash of those variants yields every candidate, verified
    exactly. Then Levenshtein(a, b) >= |len(a) - len(b)|: a query whose nearest
    pivot token is within radius r is found among the pivot tokens whose length
    is within r of its own, so the rest go through cdist at r = 2, 4, 8 against
    that fraction of the vocabulary, and finally against all of it. A query is
    resolved only when its minimum is <= r, and then every candidate at that
    distance has been seen, so the result (and the lowest-id tie-break) is the
    same as one full cdist.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    # Choices in ascending pivot id, so argmin's first-minimum rule *is* the lowest-id tie-break.
    choice_ids = np.array(sorted(ordinary.values()), dtype=np.int32)
    by_id = {v: k for k, v in ordinary.items()}
    choices = np.array([by_id[int(j)] for j in choice_ids], dtype=object)
    choice_len = np.array([len(c) for c in choices], dtype=np.int32)
    queries = np.array([source.strings[i] for i in pending], dtype=object)
    q_len = np.array([len(q) for q in queries], dtype=np.int32)
    rows_all = np.asarray(pending, dtype=np.int64)
    best_id = np.full(len(queries), -1, np.int64)
    best_d = np.full(len(queries), 255, np.int32)
    todo = _within_one(queries, choices, best_id, best_d)
    for radius in (2, 4, 8, None):
        if not len(todo):
            break
        still = []
        for length in np.unique(q_len[todo]):
            sel = todo[q_len[todo] == length]
            if radius is None:
                cand = np.arange(len(choices))
            else:
                cand = np.flatnonzero(np.abs(choice_len - length) <= radius)
            if not len(cand):
                still.append(sel)
                continue
            cutoff = 254 if radius is None else radius
            for start in range(0, len(sel), chunk_rows):
                part = sel[start:start + chunk_rows]
                # uint8 keeps a chunk at rows × candidates bytes; past the cutoff reads as cutoff + 1
                d = cdist(list(queries[part]), list(choices[cand]), scorer=Levenshtein.distance,
                          dtype=np.uint8, workers=-1, score_cutoff=cutoff)
                arg = d.argmin(axis=1)
                bd = d[np.arange(len(part)), arg].astype(np.int32)
                done = bd <= cutoff
                best_id[part[done]] = cand[arg[done]]
                best_d[part[done]] = bd[done]
                still.append(part[~done])
        todo = np.concatenate(still) if still else np.zeros(0, np.int64)
    found = best_id >= 0
    ok = found.copy()
    if threshold is not None:
        norm = best_d / np.maximum(np.maximum(q_len, choice_len[np.maximum(best_id, 0)]), 1)
        ok &= norm <= threshold
    rows = rows_all[ok]
    ids[rows] = choice_ids[best_id[ok]]
    kind[rows] = MINED
    dist[rows] = best_d[ok]


def _deletions(s: str) -> set[str]:
    return {s, *(s[:k] + s[k + 1:] for k in range(len(s)))}


def _within_one(queries: np.ndarray, choices: np.ndarray, best_id: np.ndarray, best_d: np.ndarray) -> np.ndarray:
    """Resolve queries with a choice at distance <= 1 (lowest choice index on ties); return the others."""
    from rapidfuzz.distance import Levenshtein

    index: dict[str, list[int]] = {}
    for ci, c in enumerate(choices):  # ascending index, so each list is sorted
        for v in _deletions(c):
            index.setdefault(v, []).append(ci)
    dist = Levenshtein.distance
    left = []
    for qi, q in enumerate(queries):
        cands: set[int] = set()
        for v in _deletions(q):
            cands.update(index.get(v, ()))
        d, hit = min(((dist(q, choices[ci], score_cutoff=1), ci) for ci in cands), default=(2, -1))
        if d <= 1:
            best_id[qi] = hit
            best_d[qi] = d
        else:
            left.append(qi)
    return np.asarray(left, dtype=np.int64)
