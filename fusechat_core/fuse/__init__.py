"""Knowledge fusion (SPEC §1.4): fusion functions, the sparse fusion loss, batches.

A *fusion function* decides, per sequence, what the student distils from:
given the teachers' sparse top-k distributions at the pivot's supervised
positions and each teacher's per-sequence ``metric_ce``, it returns one fused
sparse distribution. They are registered by name (``FUSION_FUNCTIONS``) in
one small file each, and the training loop knows only the name in
``TrainConfig.fusion_function``.
"""

from __future__ import annotations

# Importing the implementations registers them.
from fusechat_core.fuse import avgce, mince  # noqa: E402,F401
from fusechat_core.fuse.loss import (
                                     FUSION_FUNCTIONS,
                                     FusionFunction,
                                     SparseDist,
                                     clm_and_fusion_sums,
                                     sparse_cross_entropy,
                                     teacher_dist,
)

__all__ = ["FUSION_FUNCTIONS", "FusionFunction", "SparseDist", "clm_and_fusion_sums",
           "sparse_cross_entropy", "teacher_dist"]
