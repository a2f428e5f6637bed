"""Paired bootstrap over held-out sequences: the report's confidence intervals.

Every model of a run is measured on the same held-out sequences (``nll.heldout_nll``
keeps each sequence's summed NLL, token count and byte count). One resample draws,
within each data source, as many of its sequences as it has, with replacement, and
the SAME draw is applied to every model's columns: the comparison is paired, so
what is hard or easy about a sequence cancels between two models that both saw it.

A statistic is a function of per-data-source column sums (a token-weighted NLL is
a sum of NLLs over a sum of tokens), so each resample needs only sums, computed for
all resamples at once with numpy. The interval is the percentile interval of the
statistic over the resamples; the point estimate is the statistic on the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

N_RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def stratified_sums(strata: Sequence[str], values: np.ndarray, n_resamples: int = N_RESAMPLES,
                    seed: int = SEED) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(labels, observed [D, C], resampled [B, D, C])``: column sums per stratum.

    ``strata[i]``: the data source of row i; ``values`` [n, C]: that row's columns (every
    model's NLL sum, tokens, bytes). The draws: one generator from ``seed``; for each
    stratum in sorted order, ``integers(0, m, size=(n_resamples, m))`` over its m rows.
    """
    values = np.asarray(values, dtype=np.float64)
    strata = np.asarray(strata)
    if values.ndim != 2 or len(values) != len(strata):
        raise ValueError(f"values must be [n, C] with n = {len(strata)} rows, got {values.shape}")
    labels = sorted({str(s) for s in strata})
    rng = np.random.default_rng(seed)
    observed = np.zeros((len(labels), values.shape[1]))
    resampled = np.zeros((n_resamples, len(labels), values.shape[1]))
    for d, label in enumerate(labels):
        rows = values[strata == label]
        observed[d] = rows.sum(axis=0)
        m = len(rows)
        draw = rng.integers(0, m, size=(n_resamples, m))
        # how often each row was drawn, then one product: rows[draw] would hold R × m × C
        # floats (gigabytes for thousands of sequences and a dozen models), the counts R × m
        counts = np.bincount((draw + m * np.arange(n_resamples)[:, None]).ravel(),
                             minlength=n_resamples * m).reshape(n_resamples, m)
        resampled[:, d] = counts @ rows
    return labels, observed, resampled


def paired_bootstrap(strata: Sequence[str], values: np.ndarray,
                     statistic: Callable[[np.ndarray], np.ndarray], *, n_resamples: int = N_RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(estimate, low, high)`` of ``statistic`` with its ``level`` percentile interval.

    ``statistic(sums)``: ``sums`` [R, D, C] (R sets of per-stratum column sums, strata in
    sorted order) → [R, ...] (any number of figures at once). A resample where a figure is
    undefined (NaN: a ratio over a zero) is left out of that figure's interval.
    """
    _, observed, resampled = stratified_sums(strata, values, n_resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = np.asarray(statistic(observed[None]))[0]
        samples = np.asarray(statistic(resampled))
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():  # a figure undefined in every resample: NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return estimate, low, high


def verdict(low: float, high: float) -> str:
    """``yes`` when the interval lies above 0, ``no`` when below, else ``not distinguishable``."""
    if low > 0:
        return "yes"
    if high < 0:
        return "no"
    return "not distinguishable"
