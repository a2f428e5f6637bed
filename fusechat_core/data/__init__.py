"""The dataset stage (SPEC §1.1): FuseChat-Mixture from any list of sources."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fusechat_core.config import RunConfig
from fusechat_core.data.build import (
    DataError,
    build_mixture,
    local_source_files,
    read_split,
    token_counter,
    write_mixture,
)
from fusechat_core.data.presets import sources_of
from fusechat_core.models import load_tokenizer, tokenizer_ref
from fusechat_core.store import ArtifactStore

log = logging.getLogger("fusechat.data")


def build_dataset_artifact(cfg: RunConfig, store: ArtifactStore, address: str,
                           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the mixture and write it under ``address``; returns its stats.

    Blocks are cut to fit ``data.max_length`` under the PIVOT's tokenizer only
    (``RunPlan.dataset`` has it as its one tokenizer input): a source whose
    tokenizer needs more tokens sees a cut view of the row (``represent``), never
    another set of rows.
    """
    tokenizers = [load_tokenizer(*tokenizer_ref(cfg.pivot))] if _loadable(cfg.pivot) else []
    # what each local source's files were (their bytes are no part of the address, their path is)
    local = {s.label: files for s in sources_of(cfg.data) if (files := local_source_files(s)) is not None}
    mix = build_mixture(cfg.data, cfg.seed, token_counter(tokenizers), progress=progress)
    with store.writer(address, meta={"stage": "dataset", "train": len(mix.train), "heldout": len(mix.heldout),
                                     **({"local_files": local} if local else {})}) as w:
        write_mixture(w, mix)
    skipped = mix.stats["skipped_total"]
    (progress or log.info)(f"dataset: {len(mix.train)} train blocks, {len(mix.heldout)} held out, "
                           f"{skipped} malformed rows skipped, {mix.stats['cleaned_total']} cleaned out, "
                           f"{mix.stats['duplicates_total']} duplicates")
    return mix.stats


def changed_local_sources(cfg: RunConfig, store: ArtifactStore, address: str) -> list[str]:
    """One line per local source whose files differ from those the complete dataset at
    ``address`` was built from. A local source is known by its path in the dataset's address
    (hashing gigabytes into every plan, and moving every existing run's addresses, was the
    other way): a file edited in place would have reused the old dataset, and every stage
    after it, as Cached. A dataset built before this record was kept is not checked."""
    man = store.manifest(address)
    recorded = man.meta.get("local_files") if man is not None and store.is_complete(address) else None
    if not recorded:
        return []
    out = []
    for spec in sources_of(cfg.data):
        was = recorded.get(spec.label)
        now = local_source_files(spec) if was is not None else None
        if now is None or now == was:
            continue
        before = {f[0]: f for f in was}
        changed = sorted({f[0] for f in now if before.get(f[0]) != f} | (set(before) - {f[0] for f in now}))
        out.append(f"data source {spec.label}: {', '.join(changed[:3])} changed since dataset {address} was "
                   f"built from it; a run would reuse that dataset (a local source is known by its path): give "
                   f"the changed data a new file or folder name, or put back what the dataset was built from")
    return out


def _loadable(spec: Any) -> bool:
    ref, _ = tokenizer_ref(spec)
    return not ref.startswith("demo:")


def stats_markdown(address: str, stats: dict[str, Any]) -> str:
    lines = [f"# Dataset `{address}`", "",
             f"{stats['train']} training blocks, {stats['heldout']} held-out conversations, "
             f"{stats['skipped_total']} malformed rows skipped, {stats.get('cleaned_total', 0)} cleaned out, "
             f"{stats['duplicates_total']} duplicates.", "",
             "| source | read | kept | sampled | held out | blocks | too long | skipped (reasons) | repaired | "
             "cleaned out (reasons) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, s in stats["sources"].items():
        first = s.get("first_skipped", {})  # a dataset of an older version does not say
        reasons = ", ".join(f"{k}: {v}" + (f" (first: {first[k]})" if k in first else "")
                            for k, v in s["skipped"].items()) or "none"
        cleaned = ", ".join(f"{k}: {v}" for k, v in s.get("cleaned", {}).items()) or "none"
        repaired = ", ".join(f"{k}: {v}" for k, v in s.get("repaired", {}).items()) or "none"
        lines.append(f"| {name} | {s['rows_read']} | {s['kept']} | {s['sampled']} | {s['heldout']} "
                     f"| {s['blocks']} | {s.get('too_long', 0)} | {reasons} | {repaired} | {cleaned} |")
    return "\n".join(lines)


__all__ = ["DataError", "build_dataset_artifact", "changed_local_sources", "read_split", "stats_markdown"]
