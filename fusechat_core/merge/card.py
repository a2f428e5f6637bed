"""What ships beside the merged weights: the VaRM weights table and the model card."""

from __future__ import annotations

import re
from collections import defaultdict
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
    (``base_model``, ``tags``...), then the markdown ``body``."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], {})})
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body)))


def _hub_ref(ref: str) -> str | None:
    """``ref`` as the Hub's ``base_model`` takes it: a hub id (``org/name``), else nothing."""
    return ref if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")) else None


def model_card(*, name: str, method: str, pivot: str, targets: dict[str, str], sources: list[str] | None,
               parameters: dict[str, Any], granularity: str, dtype: str, mergekit_yaml: str,
               table: dict[str, Any] | None, method_note: str = "",
               training: dict[str, Any] | None = None) -> str:
    """The merged model's card: base model (the pivot), the merge method and its parameters, the
    VaRM weights table, the targets' training (``training``: λ, fusion function, data) and the
    mergekit configuration."""
    src = ", ".join(f"`{s}`" for s in sources) if sources else "not recorded (merged outside a run)"
    body = [
        f"# {name}", "",
        f"A knowledge fusion of chat LLMs in the manner of FuseChat (Wan et al. 2024, arXiv 2402.16107): "
        f"targets fine-tuned from one pivot, merged in parameter space with **{method}**"
        + (f" ({method_note})" if method_note else "") + ".", "",
        "## Models", "",
        f"- base model (pivot): `{pivot}` (tokenizer and chat template of this model)",
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
    return _card({"base_model": _hub_ref(pivot), "base_model_relation": "merge", "library_name": "transformers",
                  "tags": ["fusechat", "merge", "mergekit", method], "pipeline_tag": "text-generation"}, body)


def target_card(*, name: str, pivot: str, lam: float, fusion_function: str | None, steps: int, sequences: int,
                train_config: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """A trained target's card: base model (the pivot), λ, the fusion function, the data."""
    kind = "the CLM baseline (λ = 1: no fusion term)" if fusion_function is None else \
        f"a fusion target (λ = {lam}, fusion function `{fusion_function}`)"
    body = [f"# {name}", "",
            f"The pivot `{pivot}` fine-tuned with FuseChat's pairwise fusion loss "
            f"λ·L_CLM + (1−λ)·L_fuse (Wan et al. 2024, arXiv 2402.16107): {kind}.", "",
            "## Training", "",
            f"- base model (pivot): `{pivot}`",
            f"- λ: {lam}",
            f"- fusion function: {fusion_function or 'none (λ = 1)'}",
            f"- optimizer steps: {steps}; training sequences: {sequences}"]
    body += [f"- {k}: {v}" for k, v in (data or {}).items()]
    keys = ("learning_rate", "epochs", "batch_size", "max_length", "warmup_ratio", "weight_decay", "temperature",
            "seed")
    body += ["", "| setting | value |", "|---|---|"]
    body += [f"| {k} | {train_config[k]} |" for k in keys if k in train_config]
    body.append("")
    return _card({"base_model": _hub_ref(pivot), "base_model_relation": "finetune", "library_name": "transformers",
                  "tags": ["fusechat", "knowledge-fusion", fusion_function or "clm"],
                  "pipeline_tag": "text-generation"}, body)
