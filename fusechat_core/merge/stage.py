"""The merge stage of a run: targets from the store in, one merged model back to it."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusechat_core.config import RunConfig
from fusechat_core.merge.methods import method_parameters
from fusechat_core.merge.run import WEIGHTS_JSON, merge_models
from fusechat_core.models import cache_dir, model_dir
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore


def merge_stage(cfg: RunConfig, store: ArtifactStore, address: str, method: str,
                targets: Mapping[str, str], *, progress: Callable[[str], None] | None = None,
                on_tensor: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Merge the trained targets (target name → ``plan.train`` address) with ``method``.

    The pivot is loaded as every stage loads it (``models.model_dir``: a local
    folder, a hub id, or a demo model made loadable by ``demo.materialise``).
    DARE's random drops use a fixed seed: the address does not depend on the run's
    seed, so neither may the merged weights. Remote artifacts are fetched into the
    local cache first; the merged folder is uploaded with its manifest last.
    Returns the summary (and the VaRM weights table for VaRM).
    """
    if store.is_complete(address):
        return _cached(store, address, method)
    # Held from the start, as training holds its target's: a second writer of this merge waits
    # instead of merging too, and this machine's staging folder for the address is this one's.
    with store.lease(address):
        if store.is_complete(address):  # the writer waited for finished it
            return _cached(store, address, method)
        staging = merge_staging_dir(store, address)
        shutil.rmtree(staging, ignore_errors=True)  # a killed merge's half-written model (GBs at 7B)
        remove_abandoned_staging(staging.parent)
        staging.mkdir(parents=True)
        try:
            return _merge(cfg, store, address, method, targets, staging, progress, on_tensor)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def merge_staging_dir(store: ArtifactStore, address: str) -> Path:
    """Where the merged model of ``address`` in ``store`` is written before its upload: one
    folder per artifact, so a merge killed mid-write leaves nothing the next attempt does not
    remove. The store is part of the key: one config run into two stores on a machine holds
    two leases, and must not share a folder."""
    key = f"{store.url}\n{address}".encode()
    return Path(cache_dir()) / "merge-staging" / hashlib.sha256(key).hexdigest()[:16]


# A staging folder untouched this long is no live merge's: a 7B merge writes a shard every
# few minutes, and a merge of this machine that is alive holds its folder under its lease.
ABANDONED_AFTER_S = 24 * 3600


def remove_abandoned_staging(root: Path, now: float | None = None) -> list[Path]:
    """Remove the staging folders of merges killed and never retried on this machine (the
    config changed after a SIGKILL: its address, so its folder, is never seen again), each a
    whole merged model (~28 GB at 7B in float32): those with nothing written for
    ``ABANDONED_AFTER_S``. Returns what was removed."""
    import time

    now = time.time() if now is None else now
    gone = []
    for folder in root.iterdir() if root.is_dir() else ():
        try:
            newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.rglob("*")])
        except OSError:  # removed meanwhile by its own merge
            continue
        if now - newest > ABANDONED_AFTER_S:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def _cached(store: ArtifactStore, address: str, method: str) -> dict[str, Any]:
    table = store.read_json(address, WEIGHTS_JSON) if _has(store, address, WEIGHTS_JSON) else None
    return {"address": address, "method": method, "table": table, "cached": True}


def _merge(cfg: RunConfig, store: ArtifactStore, address: str, method: str, targets: Mapping[str, str],
           staging: Path, progress: Callable[[str], None] | None,
           on_tensor: Callable[[int, int], None] | None) -> dict[str, Any]:
    m = cfg.merge
    local_targets = {name: str(store.fetch(addr)) for name, addr in targets.items()}
    pivot = cfg.pivot
    folder = model_dir(pivot)
    tokenizer = (pivot.tokenizer, pivot.revision) if pivot.tokenizer else (folder, pivot.revision)
    # mergekit's way of naming a hub revision
    pivot_ref = f"{folder}@{pivot.revision}" if pivot.revision else folder
    is_main = method == m.method
    out = staging / "model"
    result = merge_models(
        method, pivot_ref, local_targets, out,
        parameters=method_parameters(m, method), granularity=m.granularity if method == "varm" else "matrix",
        dtype=m.dtype, mergekit_yaml=m.mergekit_yaml if is_main else None, shard_size=m.shard_size,
        device=m.device, seed=0, tokenizer=tokenizer, chat_template=pivot.chat_template,
        sources=[s.name for s in cfg.sources], name=f"{cfg.name}-merge-{method}", progress=progress,
        training=_training(cfg, targets), on_tensor=on_tensor)
    # The folder names where inputs were cached on this machine; what it records must
    # name the inputs themselves, or the same merge would differ from store to store.
    # A demo pivot is an artifact too: named by its address, as the targets are, so
    # `fusechat-mergekit-yaml --store URL` replays the saved mergekit_config.yml.
    pivot_label = RunPlan(cfg).demo_model(pivot) if pivot.path.startswith("demo:") else pivot.path
    _relabel(out, {folder: pivot_label, **{local_targets[n]: addr for n, addr in targets.items()}})
    meta = {"method": method, "mergekit_method": result["mergekit_method"], "targets": dict(targets),
            "pivot": pivot.name, "granularity": m.granularity if method == "varm" else None}
    if result["table"] is not None:
        meta["varm_summary"] = {k: result["table"]["summary"][k]
                                for k in ("matrices", "unchanged_matrices", "dominated", "mean_weight")}
    store.put_dir(address, out, meta=meta)
    return {"address": address, "method": method, "table": result["table"], "cached": False}


def _training(cfg: RunConfig, targets: Mapping[str, str]) -> dict[str, Any]:
    """How the merged targets were made, for the model card."""
    plan = RunPlan(cfg)
    t = cfg.train
    return {"λ (weight of the CLM loss)": t.run_lam, "fusion function": f"`{t.fusion_function}`",
            "data": f"dataset artifact `{plan.dataset}`", "learning rate": t.learning_rate, "epochs": t.epochs,
            **{f"target `{n}`": f"train artifact `{a}`" for n, a in targets.items()}}


def _relabel(folder: Path, labels: dict[str, str]) -> None:
    for path in folder.iterdir():
        if path.suffix in (".md", ".json", ".yml", ".yaml") and path.name not in ("config.json",):
            text = path.read_text()
            new = text
            for local, label in sorted(labels.items(), key=lambda kv: -len(kv[0])):
                new = new.replace(local, label)
            if new != text:
                path.write_text(new)


def _has(store: ArtifactStore, address: str, rel: str) -> bool:
    man = store.manifest(address)
    return man is not None and any(f.path == rel for f in man.files)
