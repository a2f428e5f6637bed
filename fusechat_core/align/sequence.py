"""Sequence alignment (SPEC §1.3): which source token stands for each pivot token.

Both methods answer the same question for one rendered sequence pair: for
every pivot token ``t``, the index ``u`` of the source token that spells the
same piece of text **1-to-1**, or -1 where the pairing is 1-to-many,
many-to-1 or absent. Projection then only needs that one int array.

``offsets`` (the default; near linear): tokens of fast tokenizers carry
character spans. A pivot token and a source token pair 1-to-1 when their
spans, trimmed of surrounding whitespace, are equal and no other token on
either side has that trimmed span (byte pieces of one character, which share
its span, pair piece by piece when both sides split it identically).
Trimming is what makes ``▁▁▁▁`` + ``return`` pair with ``ĠĠĠ`` + ``Ġreturn``
on ``return`` (as DTW on marker-stripped strings does) while ``!`` + ``\\n``
against ``!\\n`` stays unpaired; whitespace-only tokens compare on their raw
span. Spans are in a *common coordinate* shared by both renderings (see
``common_spans``).

``dtw``: dynamic time warping on token strings alone (for tokenizers without
offsets), with the reference's cost, the edit distance between the token
strings with word-start markers (spaces, in canonical form) removed, and the
reference's backtracking tie-break (diagonal, then up, then left) and its
pairing rule: a pivot token pairs when it lies on one path cell and spells
the same text as that cell's source token (``pairing_key``). It is
vectorised, never a Python loop over n·m cells: a row of the recurrence
``D[i,j] = c[i,j] + min(D[i-1,j], D[i,j-1], D[i-1,j-1])`` is a min-plus
prefix scan, ``D[i,j] = C[j] + min_{k<=j}(min(D[i-1,k], D[i-1,k-1]) - C[k-1])``
with ``C`` the running sum of the row's costs (exact, since costs are
non-negative), computed for a whole batch of sequence pairs at once. The
integer D matrix equals the one a double loop computes, so the path is the
same.

``dtw-banded``: the same DTW on a band of 64 source tokens around the
character diagonal (n·64 cells instead of n·m), falling back to the full DTW
for a pair the band cannot cross; identical wherever the optimal path stays
within 32 tokens of the diagonal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusechat_core.registry import Registry

# Every Unicode whitespace code point lies below U+3001.
_WS = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)
_INF = np.int32(1 << 29)


@dataclass
class TokenSeq:
    """One rendered sequence as a sequence aligner sees it."""

    strings: list[str]  # canonical token strings (vocab.canonical form)
    spans: np.ndarray | None = None  # int64 [n, 2] trimmed spans in common coordinates; -1: none

    def __len__(self) -> int:
        return len(self.strings)


Aligner = Callable[[Sequence[TokenSeq], Sequence[TokenSeq]], list[np.ndarray]]
SEQUENCE_ALIGNERS: Registry[Aligner] = Registry("sequence alignment method")


# -- spans -------------------------------------------------------------------------
def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def trimmed_spans(text: str, offsets: np.ndarray) -> np.ndarray:
    """Token spans with leading/trailing whitespace trimmed; whitespace-only tokens keep their span.

    ``offsets`` is int [n, 2] of character offsets into ``text``. Empty spans
    (some special tokens) come back as (-1, -1): they spell nothing to pair on.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    n_chars = len(text)
    out = np.full_like(offsets, -1)
    if not len(offsets):
        return out
    ws = np.isin(_codes(text), _WS)
    idx = np.arange(n_chars + 1, dtype=np.int64)
    # next_non_ws[p]: first non-whitespace position >= p (n_chars if none)
    nxt = np.where(np.append(~ws, True), idx, n_chars + 1)
    nxt = np.minimum.accumulate(nxt[::-1])[::-1]
    # prev_non_ws[p]: last non-whitespace position <= p (-1 if none)
    prv = np.where(np.append(~ws, False), idx, -1)
    prv = np.maximum.accumulate(prv)
    a, b = offsets[:, 0], offsets[:, 1]
    nonempty = (b > a) & (a >= 0) & (b <= n_chars)
    a_c, b_c = np.clip(a, 0, n_chars), np.clip(b - 1, 0, n_chars)
    first, last = nxt[a_c], prv[b_c]
    has_text = nonempty & (first < b)
    out[has_text, 0] = first[has_text]
    out[has_text, 1] = last[has_text] + 1
    ws_only = nonempty & ~has_text
    out[ws_only] = offsets[ws_only]
    return out


def content_char_map(text: str, contents: Sequence[str]) -> tuple[np.ndarray, int]:
    """Map each character of a rendering to its place in the conversation's contents.

    Two models may render one conversation with different chat templates;
    what both renderings share is the message contents. Each content is found
    in order in ``text``; its characters map to ``base_k + offset`` where
    ``base_k`` is the total length of the contents before it. Template markup
    (and a content the template altered, so it is not found verbatim) maps to
    -1, so tokens there are never paired and fall back to the label.
    Returns (int64 [len(text)] map, total content length).
    """
    cmap = np.full(len(text), -1, dtype=np.int64)
    pos = base = 0
    for c in contents:
        at = text.find(c, pos) if c else -1
        if at >= 0:
            cmap[at:at + len(c)] = np.arange(base, base + len(c))
            pos = at + len(c)
        base += len(c)
    return cmap, base


def common_spans(trimmed: np.ndarray, char_map: np.ndarray | None) -> np.ndarray:
    """Trimmed spans moved into common coordinates; a span that is not one contiguous
    run of shared text becomes (-1, -1)."""
    if char_map is None:
        return trimmed
    out = np.full_like(trimmed, -1)
    ok = trimmed[:, 0] >= 0
    a, b = trimmed[ok, 0], trimmed[ok, 1]
    ca, cb = char_map[a], char_map[b - 1]
    good = (ca >= 0) & (cb >= 0) & (cb - ca == b - 1 - a)
    rows = np.flatnonzero(ok)[good]
    out[rows, 0] = ca[good]
    out[rows, 1] = cb[good] + 1
    return out


# -- offsets method ------------------------------------------------------------------
def align_spans(pivot_spans: np.ndarray, source_spans: np.ndarray, pivot_strings: Sequence[str] | None = None,
                source_strings: Sequence[str] | None = None) -> np.ndarray:
    """For each pivot token, the source token with the same (unique) span, else -1.

    Several tokens can share one span: the byte pieces of one character
    (SentencePiece byte fallback, byte-level BPE). When both sides split that
    character into the same pieces (same count, same strings, in order) they
    pair piece by piece; otherwise none of them pairs.
    """
    n = len(pivot_spans)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(source_spans) == 0:
        return out
    width = int(max(pivot_spans.max(), source_spans.max())) + 2
    pk = np.where(pivot_spans[:, 0] >= 0, pivot_spans[:, 0] * width + pivot_spans[:, 1], -1)
    sk = np.where(source_spans[:, 0] >= 0, source_spans[:, 0] * width + source_spans[:, 1], -1)
    pu, p_inv, pc = np.unique(pk, return_inverse=True, return_counts=True)
    su, sc = np.unique(sk, return_counts=True)
    p_count = pc[p_inv]
    s_order = np.argsort(sk, kind="stable")
    s_sorted = sk[s_order]
    where = np.clip(np.searchsorted(s_sorted, pk), 0, len(sk) - 1)
    found = (s_sorted[where] == pk) & (pk >= 0)
    s_count = np.where(found, sc[np.clip(np.searchsorted(su, pk), 0, len(su) - 1)], 0)
    ok = found & (p_count == 1) & (s_count == 1)
    out[ok] = s_order[where[ok]]
    if pivot_strings is not None and source_strings is not None:
        shared = np.flatnonzero(found & (p_count > 1) & (p_count == s_count))
        # Few tokens (pieces of multi-byte characters): a plain loop over groups is fine.
        groups: dict[int, list[int]] = {}
        for i in shared.tolist():
            groups.setdefault(int(pk[i]), []).append(i)
        for key, p_idx in groups.items():
            start = int(np.searchsorted(s_sorted, key))
            s_idx = s_order[start:start + len(p_idx)].tolist()  # stable sort: in sequence order
            if [pivot_strings[i] for i in p_idx] == [source_strings[j] for j in s_idx]:
                out[p_idx] = s_idx
    return out


@SEQUENCE_ALIGNERS.register("offsets")
def align_offsets(pivots: Sequence[TokenSeq], sources: Sequence[TokenSeq]) -> list[np.ndarray]:
    out = []
    for p, s in zip(pivots, sources, strict=True):
        if p.spans is None or s.spans is None:
            raise ValueError("offsets alignment needs character spans for both tokenizers; use method 'dtw'")
        out.append(align_spans(p.spans, s.spans, p.strings or None, s.strings or None))
    return out


# -- DTW -----------------------------------------------------------------------------------
def pairing_key(token: str) -> str:
    """What two paired tokens must share: their text without surrounding whitespace, or all of
    it for a whitespace-only token (``"  "`` and ``" "`` predict different text). The same
    rule as the offsets method's trimmed spans."""
    stripped = token.strip()
    return stripped if stripped else token


def dtw_strings(strings: Sequence[str]) -> list[str]:
    """The DTW cost compares strings without word-start markers (spaces in canonical form)."""
    return [s.replace(" ", "") for s in strings]


def _batch_costs(pivots: Sequence[Sequence[str]], sources: Sequence[Sequence[str]]) -> np.ndarray:
    """int32 [B, N, M] edit distances of every token pair, one rapidfuzz cdist per sequence pair."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    B = len(pivots)
    N = max(len(x) for x in pivots)
    M = max(len(x) for x in sources)
    # Padded cells keep cost 0: a cell only feeds cells at or after it in both
    # axes, and each pair's path starts at its own last cell, so they never count.
    out = np.zeros((B, N, M), dtype=np.int32)
    for k in range(B):
        # one thread: a single pair's matrix is too small to pay for a thread pool
        out[k, :len(pivots[k]), :len(sources[k])] = cdist(pivots[k], sources[k], scorer=Levenshtein.distance,
                                                          dtype=np.int32, workers=1)
    return out


def _keys(pivots: Sequence[Sequence[str]], sources: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Pairing keys as int codes shared by both sides ([B, N], [B, M]; padding -1 / -2)."""
    N, M = max(len(x) for x in pivots), max(len(x) for x in sources)
    pk = np.full((len(pivots), N), -1, np.int64)
    sk = np.full((len(sources), M), -2, np.int64)
    flat = [t for seqs in (pivots, sources) for seq in seqs for t in seq]
    uniq, inv = np.unique(np.array(flat, dtype=object).astype(str), return_inverse=True)
    # the key of each distinct string once, then codes shared by both sides
    _, key_code = np.unique(np.array([pairing_key(t) for t in uniq.tolist()], dtype=object).astype(str),
                            return_inverse=True)
    codes = key_code.ravel()[inv.ravel()]
    at = 0
    for out, seqs in ((pk, pivots), (sk, sources)):
        for k, seq in enumerate(seqs):
            out[k, :len(seq)] = codes[at:at + len(seq)]
            at += len(seq)
    return pk, sk


def dtw_matrix(cost: np.ndarray) -> np.ndarray:
    """Accumulated cost D [B, N, M] of the DTW recurrence, one vectorised row at a time."""
    B, N, M = cost.shape
    D = np.empty((B, N, M), dtype=np.int32)
    # Row -1 is a virtual row whose only finite cell is "before (0, 0)".
    m_prev = np.full((B, M), _INF, dtype=np.int32)
    m_prev[:, 0] = 0
    # C_before[:, k] = sum of the row's costs left of column k; preallocated, the loop allocates nothing
    C_before = np.zeros((B, M), dtype=np.int32)
    best = np.empty((B, M), dtype=np.int32)
    for i in range(N):
        row = D[:, i, :]
        np.cumsum(cost[:, i, :-1], axis=1, dtype=np.int32, out=C_before[:, 1:])
        np.subtract(m_prev, C_before, out=best)
        np.minimum.accumulate(best, axis=1, out=best)
        # D[i, j] = C[j] + best[j] with C[j] = C_before[j] + cost[i, j]
        np.add(best, C_before, out=row)
        np.add(row, cost[:, i, :], out=row)
        np.minimum(row, _INF, out=row)
        # m[k] = min(D[i,k], D[i,k-1]): the cheaper of "from above" and "from the diagonal"
        m_prev[:, 0] = row[:, 0]
        np.minimum(row[:, 1:], row[:, :-1], out=m_prev[:, 1:])
    return D


def dtw_backtrack(D: np.ndarray, n: np.ndarray, m: np.ndarray, p_key: np.ndarray,
                  s_key: np.ndarray) -> list[np.ndarray]:
    """1-to-1 pairing from the optimal paths, all pairs of the batch stepping together.

    At (i, j) the path moves to the cheapest of diagonal, up, left, in that
    order on ties (the reference's ``argmin([diag, up, left])``). As in the
    reference, a pivot token is paired when it lies on exactly one path cell
    and the two tokens spell the same text (same ``pairing_key``, given as int
    codes ``p_key`` [B, N] and ``s_key`` [B, M]): DTW also walks through cells
    of unequal tokens (`` persu`` against `` persuas``), whose distributions
    predict different things. The source token may cover further pivot tokens
    (``world`` of ``Ġworld`` after a ``▁▁``), but only one of them with the
    same text, so no source row serves two pivot rows.
    """
    B, N, M = D.shape
    big = np.int64(1) << 40

    def value(b: np.ndarray, r: np.ndarray, c: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return np.where(ok, D[b, np.maximum(r, 0), np.maximum(c, 0)], big)

    return _walk_back(value, B, N, M, n, m, p_key, s_key)


def _walk_back(value: Callable[..., np.ndarray], B: int, N: int, M: int, n: np.ndarray, m: np.ndarray,
               p_key: np.ndarray,
               s_key: np.ndarray) -> list[np.ndarray]:
    """The backtracking walk shared by full and banded DTW; ``value(b, i, j, ok)`` reads
    D at (i, j) for pairs ``b``, or a huge cost where ``ok`` is False or the cell is off the band."""
    i = n.astype(np.int64) - 1
    j = m.astype(np.int64) - 1
    cnt_p = np.zeros((B, N), dtype=np.int32)
    same_s = np.zeros((B, M), dtype=np.int32)  # path cells of each source token with equal text
    match = np.full((B, N), -1, dtype=np.int64)
    active = (i >= 0) & (j >= 0)
    bidx = np.arange(B)
    while active.any():
        b, ii, jj = bidx[active], i[active], j[active]
        cnt_p[b, ii] += 1
        same_s[b, jj] += p_key[b, ii] == s_key[b, jj]
        match[b, ii] = jj
        done = (ii == 0) & (jj == 0)
        diag = value(b, ii - 1, jj - 1, (ii > 0) & (jj > 0))
        up = value(b, ii - 1, jj, ii > 0)
        left = value(b, ii, jj - 1, jj > 0)
        move = np.argmin(np.stack([diag, up, left]), axis=0)
        i[b] = ii - (move <= 1)
        j[b] = jj - ((move == 0) | (move == 2))
        active[b[done]] = False
    out = []
    for k in range(B):
        mk = match[k, :n[k]]
        ok = (cnt_p[k, :n[k]] == 1) & (mk >= 0)
        ok[ok] &= (p_key[k, np.flatnonzero(ok)] == s_key[k, mk[ok]]) & (same_s[k, mk[ok]] == 1)
        out.append(np.where(ok, mk, -1))
    return out


@SEQUENCE_ALIGNERS.register("dtw")
def align_dtw(pivots: Sequence[TokenSeq], sources: Sequence[TokenSeq], *,
              max_cells: int = 1 << 24) -> list[np.ndarray]:
    """DTW pairing for many sequence pairs, batched so a batch's D stays under ``max_cells``."""
    out: list[np.ndarray | None] = [None] * len(pivots)
    if len(pivots) != len(sources):
        raise ValueError("pivots and sources differ in length")
    order = sorted(range(len(pivots)), key=lambda k: (len(pivots[k]), len(sources[k])))
    batch: list[int] = []

    def flush() -> None:
        if not batch:
            return
        live = [k for k in batch if len(pivots[k]) and len(sources[k])]
        for k in batch:
            if k not in live:
                out[k] = np.full(len(pivots[k]), -1, dtype=np.int64)
        if live:
            ps = [dtw_strings(pivots[k].strings) for k in live]
            ss = [dtw_strings(sources[k].strings) for k in live]
            D = dtw_matrix(_batch_costs(ps, ss))
            p_key, s_key = _keys([pivots[k].strings for k in live], [sources[k].strings for k in live])
            res = dtw_backtrack(D, np.array([len(x) for x in ps]), np.array([len(x) for x in ss]), p_key, s_key)
            for k, r in zip(live, res):
                out[k] = r
        batch.clear()

    for k in order:
        N = max([len(pivots[x]) for x in batch] + [len(pivots[k])])
        M = max([len(sources[x]) for x in batch] + [len(sources[k])])
        if batch and (len(batch) + 1) * N * M > max_cells:
            flush()
        batch.append(k)
    flush()
    return out  # type: ignore[return-value]


def align_sequences(method: str, pivots: Sequence[TokenSeq], sources: Sequence[TokenSeq]) -> list[np.ndarray]:
    return SEQUENCE_ALIGNERS.get(method)(pivots, sources)


# -- banded DTW ------------------------------------------------------------------------------
def band_starts(a: Sequence[str], b: Sequence[str], width: int) -> np.ndarray:
    """First source column of each pivot row's band of ``width`` columns.

    Both token sequences spell (nearly) the same text, so pivot token i sits
    near the source token covering the same character offset: the band is
    centred there (character offsets from the canonical strings' lengths, no
    tokenizer offsets needed). Starts never decrease, move by at most
    ``width // 2`` per row (so consecutive bands overlap and a path can cross
    them), start at column 0 and end with the last column in the last band.
    """
    n, m = len(a), len(b)
    if m <= width:
        return np.zeros(n, dtype=np.int64)
    pa = np.cumsum([0] + [len(x) for x in a[:-1]])
    pb = np.cumsum([0] + [len(x) for x in b[:-1]])
    centre = np.searchsorted(pb, pa, side="right") - 1
    w = np.clip(centre - width // 2, 0, m - width).astype(np.int64)
    w[0], w[-1] = 0, m - width
    step = width // 2
    w = np.maximum.accumulate(w)
    ramp = np.arange(n, dtype=np.int64) * step
    # forward, w[i] = min(w[i], w[i-1] + step): no jump wider than half a band
    w = np.minimum.accumulate(w - ramp) + ramp
    w[-1] = m - width
    # backward, w[i] = max(w[i], w[i+1] - step): the last band stays reachable
    w = np.maximum.accumulate((w - ramp)[::-1])[::-1] + ramp
    return w


def _band_costs(pivots: Sequence[Sequence[str]], sources: Sequence[Sequence[str]], starts: list[np.ndarray],
                width: int) -> np.ndarray:
    """int32 [B, N, width]: cost of pivot row i against source columns starts[i] .. starts[i]+width-1."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    B, N = len(pivots), max(len(x) for x in pivots)
    out = np.zeros((B, N, width), dtype=np.int32)
    cols = np.arange(width)
    for k in range(B):
        pu, pi = np.unique(np.asarray(pivots[k], dtype=object).astype(str), return_inverse=True)
        su, si = np.unique(np.asarray(sources[k], dtype=object).astype(str), return_inverse=True)
        table = cdist(pu.tolist(), su.tolist(), scorer=Levenshtein.distance, dtype=np.int32, workers=1)
        j = np.minimum(starts[k][:, None] + cols[None, :], len(sources[k]) - 1)
        out[k, :len(pivots[k])] = table[pi.ravel()[:, None], si.ravel()[j]]
    return out


def banded_dtw_matrix(cost: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """D [B, N, W] of the DTW recurrence inside the bands (cells outside count as unreachable).

    ``starts`` [B, N]: each row's first column. Row i's column c is source
    column starts[i] + c; the previous row is re-indexed by the shift
    starts[i] - starts[i-1] before the same min-plus prefix scan as
    ``dtw_matrix``.
    """
    B, N, W = cost.shape
    D = np.empty((B, N, W), dtype=np.int32)
    # m_ext[c]: cheapest way into column c of the next row from this one (up or diagonal);
    # column W is the diagonal out of the last band cell, beyond it nothing.
    m_ext = np.full((B, W + 2), _INF, dtype=np.int32)
    m_ext[:, 0] = 0  # the virtual row before (0, 0)
    C_before = np.zeros((B, W), dtype=np.int32)
    best = np.empty((B, W), dtype=np.int32)
    cols = np.arange(W)[None, :]
    shift = np.zeros((B, 1), dtype=np.int64)
    for i in range(N):
        if i:
            shift = (starts[:, i] - starts[:, i - 1])[:, None]
        m_cur = np.take_along_axis(m_ext, np.minimum(cols + shift, W + 1), axis=1)
        row = D[:, i, :]
        np.cumsum(cost[:, i, :-1], axis=1, dtype=np.int32, out=C_before[:, 1:])
        np.subtract(m_cur, C_before, out=best)
        np.minimum.accumulate(best, axis=1, out=best)
        np.add(best, C_before, out=row)
        np.add(row, cost[:, i, :], out=row)
        np.minimum(row, _INF, out=row)
        m_ext[:, 0] = row[:, 0]
        np.minimum(row[:, 1:], row[:, :-1], out=m_ext[:, 1:W])
        m_ext[:, W] = row[:, W - 1]
    return D


def banded_backtrack(D: np.ndarray, starts: np.ndarray, n: np.ndarray, m: np.ndarray, p_key: np.ndarray,
                     s_key: np.ndarray, M: int) -> list[np.ndarray]:
    """``dtw_backtrack`` on band coordinates: same moves, same tie-break, same pairing rule."""
    B, N, W = D.shape
    big = np.int64(1) << 40

    def value(b: np.ndarray, r: np.ndarray, col: np.ndarray, ok: np.ndarray) -> np.ndarray:
        rr = np.maximum(r, 0)
        c = col - starts[b, rr]
        inside = ok & (c >= 0) & (c < W)
        return np.where(inside, D[b, rr, np.clip(c, 0, W - 1)], big)

    return _walk_back(value, B, N, M, n, m, p_key, s_key)


@SEQUENCE_ALIGNERS.register("dtw-banded")
def align_dtw_banded(pivots: Sequence[TokenSeq], sources: Sequence[TokenSeq], *, width: int = 64,
                     max_cells: int = 1 << 23) -> list[np.ndarray]:
    """DTW restricted to a band of ``width`` source tokens around the character diagonal.

    The same recurrence, tie-break and pairing as ``align_dtw``, on n·width
    cells instead of n·m: identical wherever the optimal path stays inside the
    band, which it does unless the two tokenizations drift more than
    ``width // 2`` tokens apart. A pair no wider than ``width`` is computed exactly.
    """
    out: list[np.ndarray | None] = [None] * len(pivots)
    # A band can only reach the last column if half a band per row covers the length gap;
    # such pairs (and any whose band turns out unreachable) take the full DTW.
    full = [k for k in range(len(pivots))
            if len(sources[k]) > width and (len(pivots[k]) - 1) * (width // 2) < len(sources[k]) - width]
    order = sorted(set(range(len(pivots))) - set(full), key=lambda k: len(pivots[k]))
    batch: list[int] = []

    def flush() -> None:
        live = [k for k in batch if len(pivots[k]) and len(sources[k])]
        for k in batch:
            if k not in live:
                out[k] = np.full(len(pivots[k]), -1, dtype=np.int64)
        if live:
            ps = [dtw_strings(pivots[k].strings) for k in live]
            ss = [dtw_strings(sources[k].strings) for k in live]
            W = min(width, max(len(x) for x in ss))
            st = [band_starts(pivots[k].strings, sources[k].strings, W) for k in live]
            N = max(len(x) for x in ps)
            starts = np.zeros((len(live), N), dtype=np.int64)
            for r, s0 in enumerate(st):
                starts[r, :len(s0)] = s0
                starts[r, len(s0):] = s0[-1]
            D = banded_dtw_matrix(_band_costs(ps, ss, st, W), starts)
            n = np.array([len(x) for x in ps])
            m = np.array([len(x) for x in ss])
            last = D[np.arange(len(live)), n - 1, m - 1 - starts[np.arange(len(live)), n - 1]]
            unreachable = last >= _INF
            full.extend(k for k, bad in zip(live, unreachable) if bad)
            p_key, s_key = _keys([pivots[k].strings for k in live], [sources[k].strings for k in live])
            res = banded_backtrack(D, starts, np.where(unreachable, 0, n), m, p_key, s_key, s_key.shape[1])
            for k, r, bad in zip(live, res, unreachable):
                if not bad:
                    out[k] = r
        batch.clear()

    for k in order:
        N = max([len(pivots[x]) for x in batch] + [len(pivots[k])])
        if batch and (len(batch) + 1) * N * width > max_cells:
            flush()
        batch.append(k)
    flush()
    if full:
        for k, r in zip(full, align_dtw([pivots[k] for k in full], [sources[k] for k in full])):
            out[k] = r
    return out  # type: ignore[return-value]
