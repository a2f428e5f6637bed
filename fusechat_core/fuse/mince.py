"""MinCE (the paper's choice): per sequence, the teacher with the lowest metric_ce."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fusechat_core.fuse.loss import FUSION_FUNCTIONS, SparseDist, stack_teachers


@FUSION_FUNCTIONS.register("mince")
def mince(teachers: Sequence[SparseDist], metric_ce: Tensor) -> SparseDist:
    ids, probs = stack_teachers(teachers)  # [J, P, m]
    # argmin returns the first minimum: ties go to teacher 0, the pivot, so an
    # equally good source never displaces the model being fine-tuned.
    choice = metric_ce.argmin(dim=1)  # [P]
    index = choice.view(1, -1, 1).expand(1, ids.shape[1], ids.shape[2])
    return SparseDist(ids.gather(0, index)[0], probs.gather(0, index)[0])
