"""The dataset stage (SPEC §1.1): FuseChat-Mixture from any list of sources."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fusechat_core.config import RunConfig
from fusechat_core.data.build import DataError, build_mixture, read_split, token_counter, write_mixture
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
    mix = build_mixture(cfg.data, cfg.seed, token_counter(tokenizers), progress=progress)
    with store.writer(address, meta={"stage": "dataset", "train": len(mix.train),
                                     "heldout": len(mix.heldout)}) as w:
        write_mixture(w, mix)
    skipped = mix.stats["skipped_total"]
    (progress or log.info)(f"dataset: {len(mix.train)} train blocks, {len(mix.heldout)} held out, "
                           f"{skipped} malformed rows skipped, {mix.stats['cleaned_total']} cleaned out, "
                           f"{mix.stats['duplicates_total']} duplicates")
    return mix.stats


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


__all__ = ["DataError", "build_dataset_artifact", "read_split", "stats_markdown"]
