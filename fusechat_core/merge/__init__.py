"""Merging the targets into one model (FuseChat §3.3): VaRM and the paper's baselines.

VaRM is a mergekit merge method (``varm.py``, registered in mergekit's own
registry on import); the baselines are mergekit's linear, SLERP, task
arithmetic, TIES, DARE and SCE. ``methods.py`` says how our run config maps
onto each, ``translate.py`` builds the mergekit configuration, ``run.py`` runs
mergekit's out-of-core engine and finishes the Hugging Face folder.
"""

from fusechat_core.merge.card import model_card, weights_markdown, weights_summary
from fusechat_core.merge.methods import MERGE_METHODS, MethodSpec
from fusechat_core.merge.run import WEIGHTS_JSON, WEIGHTS_MD, merge_models
from fusechat_core.merge.translate import MergeError, build_configuration, configuration_from_yaml
from fusechat_core.merge.varm import varm_merge, varm_weights

__all__ = [
    "MERGE_METHODS", "MergeError", "MethodSpec", "WEIGHTS_JSON", "WEIGHTS_MD", "build_configuration",
    "configuration_from_yaml", "merge_models", "model_card", "varm_merge", "varm_weights",
    "weights_markdown", "weights_summary",
]
