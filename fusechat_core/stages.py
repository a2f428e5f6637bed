"""The one rule for stage addresses.

A stage's address is a hash of (stage name, stage version, the stage's own
config section, upstream addresses). Same inputs give the same address, so a
finished stage is found and skipped; any upstream change changes every
downstream address. Bump a stage's version in ``STAGE_VERSIONS`` when its code
changes what it writes: that, not the source text, invalidates old artifacts.
Where the change is inside one registered loader, cleaner, synthetic domain,
sequence aligner or merge method, bump that entry's version instead
(``Registry``): the address carries it, and only artifacts made with that entry
are recomputed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

# The pipeline's stages in order: what `--until` / the flow's `until` may name.
PIPELINE_STAGES = ("demo_models", "dataset", "represent", "align", "train", "merge", "evaluate", "report")

# Bumped by hand when a stage's output format or semantics change.
STAGE_VERSIONS: dict[str, int] = {
    "demo_models": 5,  # 5: fused AdamW
    "dataset": 5,  # 5: held-out rows over heldout_max train, not dropped; stats name each skip's first row
    "represent": 2,
    "vocab_map": 1,
    "align": 4,  # 4: a sequence the pivot's view cut is a MinCE tie, as a source-cut one was
    "train": 3,  # 2: the training log says what the source gave (coverage, MinCE choices); 3: fused AdamW
    "merge": 1,
    "mt_bench_answers": 2,  # 2: the evaluation's dtype is an input (answers generated in it)
    "mt_bench_judgments": 1,
    "heldout_measures": 1,
    # 2: held-out NLL per sequence, for the report's bootstrap; 3: bytes of the words, once; rows cut;
    # 4: MT-Bench results keep per-question scores (the report's intervals)
    "evaluate": 4,
    "report": 4,  # 3: intervals, gap closed, the λ ablation, the why table; 4: no share without a gap
}


def canonical(obj: Any) -> Any:
    """A JSON-ready, order-independent form of configs and plain values."""
    if isinstance(obj, BaseModel):
        return canonical(obj.model_dump(mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 3 and 3.0 in YAML mean the same run
    return obj


def digest(obj: Any) -> str:
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def stage_address(
    stage: str,
    section: Any,
    upstream: Mapping[str, str] | None = None,
    *,
    key: str | None = None,
    version: int | None = None,
    implementations: Mapping[str, Mapping[str, int]] | None = None,
) -> str:
    """``<stage>/<key>-<hash>`` (or ``<stage>/<hash>``): readable and content-derived.

    ``key`` names the instance (a model, a source, a merge method) and is part
    of the hash too, so two instances never share an address. ``implementations``:
    the versions of the registered loaders, domains, aligners or merge methods the
    stage uses, by kind (``{"loader": {"sharegpt": 2}}``), as ``Registry.versions``
    gives them: only those past their first version, so an address is the same with
    none given as with every one at version 1.
    """
    if stage not in STAGE_VERSIONS and version is None:
        raise KeyError(f"unknown stage {stage!r}")
    payload = {
        "stage": stage,
        "version": STAGE_VERSIONS.get(stage) if version is None else version,
        "key": key,
        "config": section,
        "upstream": dict(upstream or {}),
    }
    used = {kind: dict(v) for kind, v in (implementations or {}).items() if v}
    if used:
        payload["implementations"] = used
    h = digest(payload)[:20]
    return f"{stage}/{key}-{h}" if key else f"{stage}/{h}"


def shard_address(address: str, index: int, count: int) -> str:
    """Shards are artifacts of their own, each with its own manifest."""
    return f"{address}/shard-{index:05d}-of-{count:05d}"


# -- a target's training checkpoints: sub-artifacts beside it -------------------------
_CHECKPOINT = re.compile(r"/checkpoint-(\d{7})$")


def checkpoints_prefix(target_address: str) -> str:
    """Where a target's checkpoints live: a sibling of the target's folder, not inside it
    (optimizer state and pickles have no place in a model folder that is uploaded)."""
    return f"{target_address.rstrip('/')}.checkpoints"


def checkpoint_address(target_address: str, step: int) -> str:
    return f"{checkpoints_prefix(target_address)}/checkpoint-{step:07d}"


def complete_checkpoints(store: Any, target_address: str) -> list[tuple[int, str]]:
    """(step, address) of every complete checkpoint of a target in ``store``, oldest first (a
    damaged one is passed over: training resumes from an older one, or from the start)."""
    found = []
    for address in store.list(checkpoints_prefix(target_address)):
        m = _CHECKPOINT.search(address)
        if m and address == checkpoint_address(target_address, int(m.group(1))) and store.is_complete(address):
            found.append((int(m.group(1)), address))
    return sorted(found)
