"""Fusion functions and the sparse fusion loss, against dense references written here by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fusechat_core.fuse import FUSION_FUNCTIONS, SparseDist, clm_and_fusion_sums, teacher_dist
from fusechat_core.fuse.loss import sparse_cross_entropy

V, K = 50, 6


def _dense(dist: SparseDist, vocab: int = V) -> torch.Tensor:
    """The sparse distribution as a dense [P, V] matrix, built entry by entry."""
    out = torch.zeros(dist.ids.shape[0], vocab, dtype=torch.float64)
    for p in range(dist.ids.shape[0]):
        for i in range(dist.ids.shape[1]):
            out[p, int(dist.ids[p, i])] += float(dist.probs[p, i])
    return out


def _teacher(p: int, seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k as the contract stores it: distinct ids, float16 log-probs descending, -inf padding last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(p)])
    lps = torch.log_softmax(torch.randn(p, V, generator=g) * 3, -1).gather(1, ids).sort(-1, descending=True)
    lp = lps.values.half()
    ids = ids.gather(1, lps.indices)
    if pad:
        lp[:, K - pad:] = float("-inf")
        ids[:, K - pad:] = 0
    return ids, lp


def _by_hand(ids: torch.Tensor, lp: torch.Tensor, t: float) -> torch.Tensor:
    """softmax(lp / T) over the kept entries, from math.exp; -inf entries get 0."""
    out = torch.zeros(ids.shape[0], V, dtype=torch.float64)
    for p in range(ids.shape[0]):
        vals = [float(x) / t for x in lp[p]]
        m = max(v for v in vals if v != float("-inf"))
        z = sum(math.exp(v - m) for v in vals if v != float("-inf"))
        for i, v in zip(ids[p].tolist(), vals):
            if v != float("-inf"):
                out[p, i] += math.exp(v - m) / z
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_teacher_dist_is_renormalised_softmax_and_padding_is_zero(temperature):
    ids, lp = _teacher(5, 0, pad=2)
    dist = teacher_dist(ids, lp, temperature)
    ref = _by_hand(ids, lp, temperature)
    assert torch.allclose(_dense(dist), ref, atol=1e-6)
    assert torch.all(dist.probs[:, K - 2:] == 0)  # exactly nothing from the padding


def test_teacher_row_without_any_finite_logprob_is_an_error():
    ids, lp = _teacher(3, 1)
    lp[1] = float("-inf")
    with pytest.raises(ValueError, match="supervised row 1"):
        teacher_dist(ids, lp)


def _dense_fusion_ce(logits: torch.Tensor, target_dense: torch.Tensor) -> torch.Tensor:
    """-Σ_v p(v) log q(v) per row, with the vocabulary-wide target the reference implementation built."""
    return -(target_dense * torch.log_softmax(logits.double(), -1)).sum(-1)


def test_sparse_loss_and_its_gradient_equal_the_dense_reference():
    P = 7
    logits = torch.randn(P, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(4))
    t_pivot, t_src = _teacher(P, 10, pad=1), _teacher(P, 11, pad=3)
    ce = torch.tensor([[1.0, 2.0]] * 3 + [[2.5, 0.7]] * 4)  # two sequences: pivot wins, then the source
    teachers = [teacher_dist(*t_pivot, 1.0), teacher_dist(*t_src, 1.0)]

    x = logits.clone().float().requires_grad_(True)
    clm, fuse = clm_and_fusion_sums(x, labels, teachers, ce, FUSION_FUNCTIONS.get("mince"))
    (0.9 * clm + 0.1 * fuse).backward()

    # dense reference: choose each sequence's teacher by hand, then full-vocabulary CE
    dense = torch.cat([_by_hand(*t_pivot, 1.0)[:3], _by_hand(*t_src, 1.0)[3:]])
    y = logits.clone().requires_grad_(True)
    ref_fuse = _dense_fusion_ce(y, dense).sum()
    ref_clm = torch.nn.functional.cross_entropy(y, labels, reduction="sum")
    (0.9 * ref_clm + 0.1 * ref_fuse).backward()
    assert abs(float(fuse.detach()) - float(ref_fuse.detach())) < 1e-6 * max(1.0, abs(float(ref_fuse.detach())))
    assert abs(float(clm.detach()) - float(ref_clm.detach())) < 1e-6 * max(1.0, abs(float(ref_clm.detach())))
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-6)


def test_without_teachers_there_is_no_fusion_term():
    logits = torch.randn(4, V)
    labels = torch.tensor([1, 2, 3, 4])
    clm, fuse = clm_and_fusion_sums(logits, labels, None, None, None)
    assert fuse is None
    assert torch.allclose(clm, torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))


def test_mince_picks_the_lower_ce_teacher_per_sequence_ties_to_the_pivot():
    a, b = teacher_dist(*_teacher(6, 20)), teacher_dist(*_teacher(6, 21, pad=2))
    # rows 0-1: sequence 1 (source lower), 2-3: sequence 2 (pivot lower), 4-5: a tie
    ce = torch.tensor([[3.0, 1.0], [3.0, 1.0], [0.5, 4.0], [0.5, 4.0], [2.0, 2.0], [2.0, 2.0]])
    fused = FUSION_FUNCTIONS.get("mince")([a, b], ce)
    for row, pick in zip(range(6), [b, b, a, a, a, a]):
        assert torch.equal(_dense(fused)[row], _dense(pick)[row])


def test_mince_with_teachers_of_different_width():
    a = teacher_dist(*_teacher(3, 30))
    ids, lp = _teacher(3, 31)
    b = teacher_dist(ids[:, :2], lp[:, :2])  # a teacher that kept only 2 ids
    fused = FUSION_FUNCTIONS.get("mince")([a, b], torch.tensor([[1.0, 0.1]] * 3))
    assert torch.allclose(_dense(fused), _dense(b))


def test_avgce_weights_follow_the_formula():
    a, b = teacher_dist(*_teacher(4, 40)), teacher_dist(*_teacher(4, 41, pad=1))
    ce = torch.tensor([[0.3, 1.9]] * 2 + [[2.2, 0.1]] * 2)
    fused = FUSION_FUNCTIONS.get("avgce")([a, b], ce)
    dense = _dense(fused)
    for row in range(4):
        r = [math.exp(-float(c)) for c in ce[row]]  # reward: mean per-token likelihood
        w = [math.exp(x) / sum(math.exp(y) for y in r) for x in r]
        expect = w[0] * _dense(a)[row] + w[1] * _dense(b)[row]
        assert torch.allclose(dense[row], expect, atol=1e-7)
        assert abs(float(dense[row].sum()) - 1.0) < 1e-6
    # the lower-CE teacher weighs more, but AvgCE never drops a teacher
    assert 0.5 < float(torch.softmax(torch.exp(-ce[0]), 0)[0]) < 1.0


def test_duplicate_ids_in_a_sparse_target_add_up():
    logp = torch.log_softmax(torch.randn(1, V), -1)
    dup = SparseDist(torch.tensor([[3, 3, 7]]), torch.tensor([[0.25, 0.25, 0.5]]))
    merged = SparseDist(torch.tensor([[3, 7]]), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(sparse_cross_entropy(logp, dup), sparse_cross_entropy(logp, merged))


def test_fusion_functions_are_registered_by_name():
    assert {"mince", "avgce"} <= set(FUSION_FUNCTIONS.names())
    with pytest.raises(KeyError, match="unknown fusion function 'best'"):
        FUSION_FUNCTIONS.get("best")
