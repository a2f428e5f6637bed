"""Sequence alignment (SPEC §1.3): which source row stands for each pivot row.

**The pairing rule (ours): pair by context.** Pivot row ``t`` is the pivot's
distribution over the token that follows the text ``P`` spelled by pivot
tokens ``0..t-1``. It takes the source row whose context is the same text
``P``: the row predicting the source token ``u`` whose preceding source
tokens spell exactly ``P`` (the prefix ends on a source token boundary),
whatever tokens ``t`` and ``u`` are. ``▁bul`` + ``lying`` against
``Ġbullying``: the row predicting ``▁bul`` takes the row predicting
``Ġbullying`` (both follow the same text); the row predicting ``lying``
follows `` bul``, which ends inside a source token, so no source row has its
context and it keeps the label fallback (``project.py``). Both methods
answer with one int array per sequence pair, ``u`` for every pivot token
``t`` (-1: none), and ``project.py`` maps the source row's top-k onto pivot
tokens.

The published implementations pair differently, and both less strictly on
the context: FuseLLM and FuseChat v1 pair a pivot token lying on exactly one
DTW path cell with that cell's source token (FuseLLM's "hard" mode when the
two strings are equal, FuseChat v1 when the pivot string is contained in the
source's); FuseChat-2.0's default pairs one-cell tokens when one string ends
with the other. Those rules pair ``return`` after four spaces with
`` return`` after three (different contexts) and drop ``.`` against ``.\n``
(same context); ours does the opposite. Before this rule we paired only
1-to-1 tokens spelling the same text: on tekken → Mistral v1
(``benchmarks/align.py``) coverage 0.773 and prefix precision 0.978, against
a ceiling of 0.853; the context rule reaches the ceiling at precision 1.

``offsets`` (the default; linear): fast tokenizers give each token's
character span, so the text before token ``t`` is ``text[:start]`` whenever
no earlier token reaches past its start (``prefix_starts``; byte pieces
after the first of a character start inside it and get none). Pivot and
source tokens with the same start pair. When the two models render a
conversation with different chat templates, starts are taken in the
conversation's content coordinates (``content_char_map``): tokens starting
in template markup never pair, and "the same text" means the same message
contents before it.

``dtw``: dynamic time warping on token strings alone (for tokenizers without
offsets). The cost is FuseLLM's and FuseChat-2.0's, the edit distance
between the token strings with word-start markers (spaces, in canonical
form) removed; FuseChat v1 multiplies it by 0.1 when one string contains the
other, and FuseChat-2.0 compares the unstripped strings when stripping
leaves one empty; we do neither. The backtracking tie order is FuseChat-2.0's
(diagonal, then a pivot step, then a source step; FuseLLM and FuseChat v1
prefer the source step to the pivot step). The pairs are then read off the
path by the same context rule (``context_pairs``): a cell entered diagonally,
where both sides start a token, pairs when the tokens since the last pair
spell the same text on both sides. The DTW is vectorised, never a Python
loop over n·m cells: a row of the recurrence
``D[i,j] = c[i,j] + min(D[i-1,j], D[i,j-1], D[i-1,j-1])`` is a min-plus
prefix scan, ``D[i,j] = C[j] + min_{k<=j}(min(D[i-1,k], D[i-1,k-1]) - C[k-1])``
with ``C`` the running sum of the row's costs (exact, since costs are
non-negative), computed for a whole batch of sequence pairs at once. The
integer D matrix equals the one a double loop computes, so the path is the
same.

``dtw-banded``: the same DTW on a band of 64 source tokens around the
character diagonal (n·64 cells instead of n·m), falling back to the full DTW
for a pair the band cannot cross; identical wherever the optimal path stays
within 32 tokens of the diagonal. Kept by measurement (``benchmarks/align.py``,
tekken → v1, 4 pairs of 2048 pivot tokens, as the stage batches a shard):
2.1-3.7× faster than the full DTW on a loaded 2-core machine, same pairs. On a
lone pair it gains less (1.7×): the banded recurrence still steps row by row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fusechat_core.registry import Registry

_INF = np.int32(1 << 29)


@dataclass
class TokenSeq:
    """One rendered sequence as a sequence aligner sees it."""

    strings: list[str]  # canonical token strings (vocab.canonical form)
    starts: np.ndarray | None = None  # int64 [n]: where the text before each token ends (prefix_starts)

    def __len__(self) -> int:
        return len(self.strings)


Aligner = Callable[[Sequence[TokenSeq], Sequence[TokenSeq]], list[np.ndarray]]
SEQUENCE_ALIGNERS: Registry[Aligner] = Registry("sequence alignment method", addressed=True)


# -- prefixes ----------------------------------------------------------------------
def prefix_starts(text: str, offsets: np.ndarray, char_map: np.ndarray | None = None,
                  strings: Sequence[str] | None = None) -> np.ndarray:
    """Where the text before each token ends, as a key that increases along the text; -1 where
    that is no place both tokenizations can share.

    Token ``t`` (raw character offsets ``offsets[t] = (a, b)`` into ``text``, as
    fast tokenizers give them) is preceded by exactly ``text[:a]`` when it
    spells something (``b > a``) and no earlier token reaches past ``a``: its
    key is ``4·a``. Byte pieces of one character share that character's span;
    a piece that starts inside a character (an earlier token reaches past
    ``a``) gets ``4·c + k``, ``c`` the character and ``k`` (1-3) the bytes of
    it already spelled, counted from the canonical token ``strings`` (without
    them: -1). With ``char_map`` (``content_char_map``: two chat templates
    render the conversation differently) ``c`` is taken in content
    coordinates, and a token starting in template markup gets -1.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    out = np.full(len(offsets), -1, dtype=np.int64)
    if not len(offsets):
        return out
    a, b = offsets[:, 0], offsets[:, 1]
    reach = np.maximum.accumulate(np.concatenate([[0], b[:-1]]))  # furthest end of the tokens before t
    spells = (b > a) & (a >= 0) & (a < len(text))
    clean = spells & (a >= reach)
    pos = np.where(clean, a, -1)
    byte = np.zeros(len(offsets), dtype=np.int64)
    if strings is not None:
        # Few tokens (pieces of multi-byte characters): a plain loop is fine.
        group = np.maximum.accumulate(np.where(clean, np.arange(len(offsets)), 0))  # last clean token at or before
        for t in np.flatnonzero(spells & ~clean & (reach > 0)).tolist():
            g, c = int(group[t]), int(reach[t]) - 1  # the character the earlier tokens ended inside
            if not clean[g] or g == t or a[t] != c or not a[g] <= c < len(text):
                continue
            spelled = sum(len(x.encode("utf-8", "surrogateescape")) for x in strings[g:t])
            k = spelled - len(text[a[g]:c].encode("utf-8", "surrogateescape"))
            if 0 < k < min(4, len(text[c].encode("utf-8", "surrogateescape"))):
                pos[t], byte[t] = c, k
    ok = pos >= 0
    if char_map is not None:
        pos[ok] = char_map[pos[ok]]
        ok = pos >= 0
    out[ok] = 4 * pos[ok] + byte[ok]
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


# -- offsets method ------------------------------------------------------------------
def align_starts(pivot_starts: np.ndarray, source_starts: np.ndarray) -> np.ndarray:
    """For each pivot token, the source token preceded by the same text (same start), else -1.

    Valid starts (>= 0) increase strictly along each sequence, so a binary search finds the one match.
    """
    out = np.full(len(pivot_starts), -1, dtype=np.int64)
    valid = np.flatnonzero(source_starts >= 0)
    if not len(out) or not len(valid):
        return out
    keys = source_starts[valid]
    at = np.clip(np.searchsorted(keys, pivot_starts), 0, len(keys) - 1)
    hit = (pivot_starts >= 0) & (keys[at] == pivot_starts)
    out[hit] = valid[at[hit]]
    return out


@SEQUENCE_ALIGNERS.register("offsets")
def align_offsets(pivots: Sequence[TokenSeq], sources: Sequence[TokenSeq]) -> list[np.ndarray]:
    out = []
    for p, s in zip(pivots, sources, strict=True):
        if p.starts is None or s.starts is None:
            raise ValueError("offsets alignment needs character offsets for both tokenizers; use method 'dtw'")
        out.append(align_starts(p.starts, s.starts))
    return out


# -- DTW -----------------------------------------------------------------------------------
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


def dtw_backtrack(D: np.ndarray, n: np.ndarray, m: np.ndarray, pivot_strings: Sequence[Sequence[str]],
                  source_strings: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Context pairing from the optimal path of each pair of the batch.

    At (i, j) the path moves to the cheapest of diagonal, up (pivot), left
    (source), in that order on ties (FuseChat-2.0's ``argmin([diag, base,
    blending])``). Then ``context_pairs`` reads the pairs off the path.
    """
    return [_walk_back(D[k].item, int(n[k]), int(m[k]), pivot_strings[k], source_strings[k])
            for k in range(D.shape[0])]


_BIG = 1 << 40


def _walk_back(at: Callable[[int, int], int], n: int, m: int, pivot_strings: Sequence[str],
               source_strings: Sequence[str]) -> np.ndarray:
    """The backtracking walk shared by full and banded DTW, one pair at a time in plain Python
    (a step is three scalar reads: numpy calls per step would cost more than the whole walk);
    ``at(i, j)`` reads D, or a huge cost for a cell off the band."""
    if n <= 0 or m <= 0:
        return np.full(max(n, 0), -1, dtype=np.int64)
    i, j = n - 1, m - 1
    path_i, path_j = [i], [j]
    while i or j:
        diag = at(i - 1, j - 1) if i and j else _BIG
        up = at(i - 1, j) if i else _BIG
        left = at(i, j - 1) if j else _BIG
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path_i.append(i)
        path_j.append(j)
    return context_pairs(np.array(path_i[::-1]), np.array(path_j[::-1]), pivot_strings, source_strings)


def context_pairs(path_i: np.ndarray, path_j: np.ndarray, pivot_strings: Sequence[str],
                  source_strings: Sequence[str]) -> np.ndarray:
    """The pairing rule on a DTW path (forward order): pivot token i takes source token j
    when the path enters cell (i, j) diagonally (both sequences start a token there) and the
    tokens since the last pair spell the same bytes on both sides, so both are preceded by
    the same text. Where the two sides spell different text since the last pair and
    neither is a prefix of the other (template markup, SentencePiece's dummy space before
    the first piece), pairing restarts at that cell unpaired: pairs after it share the text
    from there on.
    """
    out = np.full(len(pivot_strings), -1, dtype=np.int64)
    entered = np.ones(len(path_i), dtype=bool)
    entered[1:] = (np.diff(path_i) == 1) & (np.diff(path_j) == 1)
    # Compared as bytes: a character one side spells in byte pieces is the same text.
    p_bytes = [x.encode("utf-8", "surrogateescape") for x in pivot_strings]
    s_bytes = [x.encode("utf-8", "surrogateescape") for x in source_strings]
    li = lj = 0
    for i, j in zip(path_i[entered].tolist(), path_j[entered].tolist()):
        a, b = b"".join(p_bytes[li:i]), b"".join(s_bytes[lj:j])
        if a == b:
            out[i] = j
            li, lj = i, j
        elif not (a.startswith(b) or b.startswith(a)):
            li, lj = i, j
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
            res = dtw_backtrack(D, np.array([len(x) for x in ps]), np.array([len(x) for x in ss]),
                                [pivots[k].strings for k in live], [sources[k].strings for k in live])
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


def banded_backtrack(D: np.ndarray, starts: np.ndarray, n: np.ndarray, m: np.ndarray,
                     pivot_strings: Sequence[Sequence[str]],
                     source_strings: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """``dtw_backtrack`` on band coordinates: same moves, same tie-break, same pairing rule."""
    W = D.shape[2]
    out = []
    for k in range(D.shape[0]):
        rows, first = D[k].tolist(), starts[k].tolist()

        def at(i: int, j: int, rows: list = rows, first: list = first) -> int:
            c = j - first[i]
            return rows[i][c] if 0 <= c < W else _BIG

        out.append(_walk_back(at, int(n[k]), int(m[k]), pivot_strings[k], source_strings[k]))
    return out


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
            res = banded_backtrack(D, starts, np.where(unreachable, 0, n), m, [pivots[k].strings for k in live],
                                   [sources[k].strings for k in live])
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
