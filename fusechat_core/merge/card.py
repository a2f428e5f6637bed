"""What ships beside the merged weights: the VaRM weights table and the model card."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_LAYER = re.compile(r"\blayers\.(\d+)\.")


def module_kind(tensor_name: str) -> str:
    """A tensor's role without its layer index: ``self_attn.q_proj.weight`` for every layer's."""
    m = _LAYER.search(tensor_name)
    return tensor_name[m.end():] if m else tensor_name


def weights_summary(table: dict[str, Any]) -> dict[str, Any]:
    """Per target: matrices it dominates and its parameter-weighted mean weight; per module
    kind: the mean weight of each target across layers."""
    targets = table["targets"]
    rows = table["tensors"]
    dominated = {t: 0 for t in targets}
    weighted = {t: 0.0 for t in targets}
    pivot_only = 0
    total_params = 0
    kinds: dict[str, dict[str, list[float]]] = defaultdict(lambda: {t: [] for t in targets})
    for name, row in rows.items():
        w = row["weights"]
        n = row.get("numel", 1)
        total_params += n
        top = _dominant(w, targets)
        if top == "pivot":
            pivot_only += 1
        elif top != "tie":
            dominated[top] += 1
        for t in targets:
            weighted[t] += w[t] * n
            kinds[module_kind(name)][t].append(w[t])
    return {
        "matrices": len(rows),
        "unchanged_matrices": pivot_only,
        "dominated": dominated,
        "mean_weight": {t: (weighted[t] / total_params if total_params else 0.0) for t in targets},
        "by_module": {k: {t: sum(v[t]) / len(v[t]) for t in targets} for k, v in sorted(kinds.items())},
    }


def _dominant(w: dict[str, float], targets: list[str]) -> str:
    best = max(w[t] for t in targets)
    if best == 0.0:
        return "pivot"
    leaders = [t for t in targets if w[t] == best]
    return leaders[0] if len(leaders) == 1 else "tie"


def weights_markdown(table: dict[str, Any], *, max_rows: int | None = None) -> str:
    """The weights table for humans (the Prefect dashboard, the model card)."""
    targets = table["targets"]
    s = table.get("summary") or weights_summary(table)
    lines = [f"### VaRM weights ({table.get('granularity', 'matrix')} level)", "",
             f"{s['matrices']} matrices; {s['unchanged_matrices']} unchanged by every target (kept as the pivot's).",
             "", "| target | matrices dominated | mean weight (by parameters) |", "|---|---:|---:|"]
    lines += [f"| {t} | {s['dominated'][t]} | {s['mean_weight'][t]:.4f} |" for t in targets]
    lines += ["", "Mean weight per module kind across layers:", "",
              "| module | " + " | ".join(targets) + " | dominant |",
              "|---|" + "---:|" * len(targets) + "---|"]
    for kind, w in s["by_module"].items():
        top = _dominant(w, targets)
        lines.append(f"| `{kind}` | " + " | ".join(f"{w[t]:.4f}" for t in targets) + f" | {top} |")
    rows = list(table["tensors"].items())
    shown = rows if max_rows is None else rows[:max_rows]
    lines += ["", "Per matrix:", "", "| tensor | " + " | ".join(targets) + " |",
              "|---|" + "---:|" * len(targets)]
    lines += [f"| `{name}` | " + " | ".join(f"{row['weights'][t]:.4f}" for t in targets) + " |"
              for name, row in shown]
    if len(shown) < len(rows):
        lines.append(f"\n({len(rows) - len(shown)} more rows in varm_weights.json)")
    return "\n".join(lines) + "\n"


def _card(data: dict[str, Any], body: list[str]) -> str:
    """A Hugging Face model card (``huggingface_hub.ModelCard``): YAML metadata the Hub reads
    (``base_model``, ``tags``...), then the markdown ``body``. Without a ``base_model`` there
    is no ``base_model_relation`` either: the Hub reads the relation only of a named base."""
    from huggingface_hub import ModelCard, ModelCardData

    if not data.get("base_model"):
        data = {k: v for k, v in data.items() if k != "base_model_relation"}
    meta = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], {})})
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)))


def _hub_id(ref: str) -> str | None:
    """``ref`` as the Hub's ``base_model`` takes it: a model id (``org/name``, which
    ``huggingface_hub.utils.validate_repo_id`` accepts), else nothing. huggingface_hub checks
    no metadata itself; the Hub refuses a ``base_model`` that names no model it hosts, so a
    path (absolute, relative, ``demo:``) is never one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.count("/") != 1 or ref.startswith((".", "/")) or Path(ref).expanduser().exists():
        return None
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return None
    return ref


def describe_base(ref: str, folder: str | Path | None = None) -> tuple[str | None, str]:
    """The pivot as a card names it: (the ``base_model`` metadata or None, the text).

    ``ref``: the pivot as configured (a hub id, ``id@revision`` as mergekit writes it, a local
    folder, ``demo:NAME``); ``folder``: where it was loaded from, when that differs. A hub id is
    the base itself. A local folder whose ``config.json`` records the hub model it was saved
    from (``_name_or_path``: transformers 4 wrote it, 5 drops it) names that model; any other
    local pivot is named in the text only, never as metadata the Hub would refuse.
    """
    name, _, revision = ref.partition("@") if not Path(ref).exists() else (ref, "", "")
    hub = _hub_id(name)
    if hub is not None:
        return hub, f"`{hub}`" + (f" (revision `{revision}`)" if revision else "")
    config = Path(folder if folder is not None else ref) / "config.json"
    try:
        recorded = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    origin = _hub_id(recorded) if isinstance(recorded, str) else None
    if origin is not None:
        return origin, f"`{ref}` (a local copy of `{origin}`)"
    return None, f"`{ref}` (a local model, not on the Hugging Face Hub)"


def model_card(*, name: str, method: str, pivot: str, targets: dict[str, str], sources: list[str] | None,
               parameters: dict[str, Any], granularity: str, dtype: str, mergekit_yaml: str,
               table: dict[str, Any] | None, method_note: str = "",
               training: dict[str, Any] | None = None) -> str:
    """The merged model's card: base model (the pivot, ``describe_base``), the merge method and
    its parameters, the VaRM weights table, the targets' training (``training``: λ, fusion
    function, data) and the mergekit configuration."""
    base, base_text = describe_base(pivot)
    src = ", ".join(f"`{s}`" for s in sources) if sources else "not recorded (merged outside a run)"
    body = [
        f"# {name}", "",
        f"A knowledge fusion of chat LLMs in the manner of FuseChat (Wan et al. 2024, arXiv 2402.16107): "
        f"targets fine-tuned from one pivot, merged in parameter space with **{method}**"
        + (f" ({method_note})" if method_note else "") + ".", "",
        "## Models", "",
        f"- base model (pivot): {base_text}; its tokenizer and chat template",
        f"- sources: {src}",
    ]
    body += [f"- target `{t}`: `{p}`" for t, p in targets.items()]
    if training:
        body += ["", "## Training of the targets", ""] + [f"- {k}: {v}" for k, v in training.items()]
    body += ["", "## Merge", "", f"- method: `{method}`", f"- saved as: {dtype}"]
    if method == "varm":
        body.append(f"- VaRM granularity: {granularity}")
    if parameters:
        body.append("- parameters: " + ", ".join(f"`{k}={v}`" for k, v in parameters.items()))
    if table is not None:
        body += ["", weights_markdown(table, max_rows=400)]
    body += ["", "## mergekit configuration", "", "```yaml", mergekit_yaml.rstrip(), "```", ""]
    return _card({"base_model": base, "base_model_relation": "merge", "library_name": "transformers",
                  "tags": ["fusechat", "merge", "mergekit", method], "pipeline_tag": "text-generation"}, body)


def target_card(*, name: str, pivot: str, lam: float, fusion_function: str | None, steps: int, sequences: int,
                train_config: dict[str, Any], data: dict[str, Any] | None = None,
                pivot_folder: str | None = None) -> str:
    """A trained target's card: base model (the pivot, ``describe_base``; ``pivot_folder``:
    where it was loaded from), λ, the fusion function, the data."""
    base, base_text = describe_base(pivot, pivot_folder)
    kind = "the CLM baseline (λ = 1: no fusion term)" if fusion_function is None else \
        f"a fusion target (λ = {lam}, fusion function `{fusion_function}`)"
    body = [f"# {name}", "",
            f"The pivot `{pivot}` fine-tuned with FuseChat's pairwise fusion loss "
            f"λ·L_CLM + (1−λ)·L_fuse (Wan et al. 2024, arXiv 2402.16107): {kind}.", "",
            "## Training", "",
            f"- base model (pivot): {base_text}",
            f"- λ: {lam}",
            f"- fusion function: {fusion_function or 'none (λ = 1)'}",
            f"- optimizer steps: {steps}; training sequences: {sequences}"]
    body += [f"- {k}: {v}" for k, v in (data or {}).items()]
    keys = ("learning_rate", "epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "temperature",
            "seed")
    body += ["", "| setting | value |", "|---|---|"]
    body += [f"| {k} | {train_config[k]} |" for k in keys if k in train_config]
    body.append("")
    return _card({"base_model": base, "base_model_relation": "finetune", "library_name": "transformers",
                  "tags": ["fusechat", "knowledge-fusion", fusion_function or "clm"],
                  "pipeline_tag": "text-generation"}, body)
