"""MinCE (the paper's choice): per sequence, the teacher with the lowest metric_ce."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fusechat_core.fuse.loss import FUSION_FUNCTIONS, SparseDist, stack_teachers


def mince_choice(metric_ce: Tensor) -> Tensor:
    """Which teacher MinCE takes, per row of ``metric_ce`` [..., J]: the first minimum, so
    ties go to teacher 0, the pivot, and an equally good source never displaces the model
    being fine-tuned. Also what the training log counts (``FusionData.teacher_summary``)."""
    return metric_ce.argmin(dim=-1)


@FUSION_FUNCTIONS.register("mince")
def mince(teachers: Sequence[SparseDist], metric_ce: Tensor) -> SparseDist:
    ids, probs = stack_teachers(teachers)  # [J, P, m]
    choice = mince_choice(metric_ce)  # [P]
    index = choice.view(1, -1, 1).expand(1, ids.shape[1], ids.shape[2])
    return SparseDist(ids.gather(0, index)[0], probs.gather(0, index)[0])
