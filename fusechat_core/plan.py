"""Every artifact address of a run, derived in one place from the config.

The flow, ``fusechat status`` and ``--plan`` all ask this module, so what the
pipeline writes and what status reports can never disagree. Each method names
exactly the config fields and upstream addresses its stage depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from fusechat_core.config import ModelSpec, RunConfig
from fusechat_core.stages import shard_address, stage_address


def _model_identity(spec: ModelSpec) -> dict:
    # The name is a label, not content: renaming a model must not recompute it.
    return spec.model_dump(exclude={"name"})


@dataclass(frozen=True)
class Node:
    stage: str
    key: str | None
    address: str

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.key}]" if self.key else self.stage


class RunPlan:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # -- dataset -------------------------------------------------------------
    @cached_property
    def dataset(self) -> str:
        section = {
            "data": self.cfg.data,
            "seed": self.cfg.seed,
            # Blocks must fit every model's tokenizer, so the tokenizers are inputs.
            "tokenizers": [(m.tokenizer or m.path, m.revision) for m in self.cfg.models],
        }
        return stage_address("dataset", section)

    # -- representations -----------------------------------------------------
    def represent(self, model: ModelSpec) -> str:
        section = {"model": _model_identity(model), "represent": self.cfg.represent}
        return stage_address("represent", section, {"dataset": self.dataset}, key=model.name)

    def represent_shard(self, model: ModelSpec, index: int) -> str:
        return shard_address(self.represent(model), index, self.cfg.represent.shards)

    def nodes(self) -> list[Node]:
        """The DAG's artifacts in execution order (stages that exist so far)."""
        out = [Node("dataset", None, self.dataset)]
        return out
