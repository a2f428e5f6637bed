"""AvgCE: a per-sequence weighted average of the teachers' distributions.

Weights as in the released FuseLLM/FuseChat trainer, so results compare with
the paper's ablation: each teacher's reward is exp(-metric_ce) (its mean
per-token likelihood on the sequence) and the weights are softmax over the
teachers' rewards, w_j = exp(r_j) / Σ_i exp(r_i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusechat_core.fuse.loss import FUSION_FUNCTIONS, SparseDist


@FUSION_FUNCTIONS.register("avgce")
def avgce(teachers: Sequence[SparseDist], metric_ce: Tensor) -> SparseDist:
    weights = torch.softmax(torch.exp(-metric_ce.float()), dim=1)  # [P, J]
    # Concatenating keeps every teacher's entries; the loss is linear in probs,
    # so an id two teachers share counts with its summed weight.
    ids = torch.cat([t.ids for t in teachers], dim=1)
    probs = torch.cat([weights[:, j:j + 1] * t.probs for j, t in enumerate(teachers)], dim=1)
    return SparseDist(ids, probs)
