"""Merging the targets into one model (SPEC §1.5): VaRM and the paper's baselines.

VaRM is a mergekit merge method (``varm.py``, registered in mergekit's own
registry on import); the baselines are mergekit's linear, SLERP, task
arithmetic, TIES, DARE and SCE. ``methods.py`` says how our run config maps
onto each, ``translate.py`` builds the mergekit configuration, ``run.py`` runs
mergekit's out-of-core engine and finishes the Hugging Face folder,
``stage.py`` is the run's merge stage.

Names load lazily: the config validator reads ``methods.py`` without paying
for importing mergekit and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MERGE_METHODS": "methods", "MethodSpec": "methods",
    "MergeError": "translate", "build_configuration": "translate", "configuration_from_yaml": "translate",
    "check_merge_config": "translate",
    "merge_models": "run", "WEIGHTS_JSON": "run", "WEIGHTS_MD": "run",
    "model_card": "card", "weights_markdown": "card", "weights_summary": "card",
    "varm_merge": "varm", "varm_weights": "varm",
    "merge_stage": "stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
