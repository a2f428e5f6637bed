"""The paired bootstrap behind every interval in the report (``evaluate/bootstrap.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusechat_core.evaluate.bootstrap import paired_bootstrap, stratified_sums, verdict


def _margin(sums: np.ndarray) -> np.ndarray:
    """Columns (nll A, nll B, tokens): mean over strata of NLL(A) - NLL(B) per token."""
    return (sums[..., 0] / sums[..., 2] - sums[..., 1] / sums[..., 2]).mean(axis=-1)


def _two_models(diff: float, n: int = 300, seed: int = 3) -> tuple[list[str], np.ndarray]:
    """Per-sequence NLL sums of two models on the same sequences: B is better than A by
    ``diff`` nats per token in expectation; sequences vary far more than the difference."""
    rng = np.random.default_rng(seed)
    strata = ["a" if i % 3 else "b" for i in range(n)]
    tokens = rng.integers(5, 40, size=n).astype(float)
    hardness = rng.normal(2.5, 0.8, size=n)  # what both models share: the sequence
    a = (hardness + rng.normal(0, 0.15, size=n)) * tokens
    b = (hardness - diff + rng.normal(0, 0.15, size=n)) * tokens
    return strata, np.stack([a, b, tokens], axis=1)


def test_a_known_difference_is_covered_and_0_is_excluded():
    strata, values = _two_models(0.05)
    est, lo, hi = paired_bootstrap(strata, values, _margin, n_resamples=2000, seed=0)
    assert lo < 0.05 < hi and lo > 0, (est, lo, hi)
    assert verdict(lo, hi) == "yes"
    # pairing is what makes it visible: the same data with model B's sequences shuffled
    # (unpaired) has an interval many times wider, that covers 0
    rng = np.random.default_rng(1)
    unpaired = values.copy()  # B's per-token NLL taken from other sequences of the same stratum
    for s in set(strata):
        idx = np.flatnonzero(np.array(strata) == s)
        perm = rng.permutation(idx)
        unpaired[idx, 1] = values[perm, 1] / values[perm, 2] * values[idx, 2]
    _, ulo, uhi = paired_bootstrap(strata, unpaired, _margin, n_resamples=2000, seed=0)
    assert uhi - ulo > 4 * (hi - lo) and ulo < 0 < uhi
    # the other direction reads "no"
    _, lo2, hi2 = paired_bootstrap(strata, values[:, [1, 0, 2]], _margin, n_resamples=2000, seed=0)
    assert hi2 < 0 and verdict(lo2, hi2) == "no"


def test_identical_models_give_an_interval_around_0():
    strata, values = _two_models(0.0)
    same = values[:, [0, 0, 2]]
    est, lo, hi = paired_bootstrap(strata, same, _margin)
    assert est == lo == hi == 0.0
    # two different models with the same quality: the interval covers 0
    est, lo, hi = paired_bootstrap(strata, values, _margin)
    assert lo < 0 < hi and verdict(lo, hi) == "not distinguishable"
    assert hi - lo < 0.08  # narrow (about 4 standard errors of the noise): the sequences' own spread cancels


def test_resampling_matches_a_plain_loop():
    """The vectorised sums and percentiles against a loop over resamples and rows, on the
    documented draw (one generator; per stratum in sorted order, integers(0, m, (B, m)))."""
    strata = ["y", "x", "y", "x", "x", "y", "y"]
    values = np.array([[3.0, 2.0, 2], [1.0, 1.5, 1], [4.0, 3.0, 3], [2.0, 1.0, 2], [0.5, 0.7, 1],
                       [6.0, 5.5, 4], [1.0, 1.2, 1]])
    B, seed = 40, 11
    labels, observed, resampled = stratified_sums(strata, values, B, seed)
    rng = np.random.default_rng(seed)
    expect = [[None, None] for _ in range(B)]
    for d, label in enumerate(sorted(set(strata))):
        rows = [values[i] for i in range(len(strata)) if strata[i] == label]
        draw = rng.integers(0, len(rows), size=(B, len(rows)))
        for b in range(B):
            acc = [0.0, 0.0, 0.0]
            for j in draw[b]:
                for c in range(3):
                    acc[c] += rows[j][c]
            expect[b][d] = acc
    assert labels == ["x", "y"]
    assert np.allclose(resampled, np.array(expect))
    assert np.allclose(observed, [[3.5, 3.2, 4], [14.0, 11.7, 10]])
    # percentile interval by hand (linear interpolation between order statistics)
    stats = sorted(sum(e[d][0] / e[d][2] - e[d][1] / e[d][2] for d in range(2)) / 2 for e in expect)

    def pct(q: float) -> float:
        pos = q / 100 * (B - 1)
        k = math.floor(pos)
        return stats[k] + (pos - k) * (stats[min(k + 1, B - 1)] - stats[k])

    est, lo, hi = paired_bootstrap(strata, values, _margin, n_resamples=B, seed=seed, level=0.9)
    assert lo == pytest.approx(pct(5)) and hi == pytest.approx(pct(95))
    assert est == pytest.approx(((3.5 - 3.2) / 4 + (14.0 - 11.7) / 10) / 2)
    # fixed seed: the same interval every time; another seed moves it
    assert paired_bootstrap(strata, values, _margin, n_resamples=B, seed=seed, level=0.9)[1] == lo
    assert paired_bootstrap(strata, values, _margin, n_resamples=B, seed=seed + 1, level=0.9)[1] != lo
