"""The model under evaluation: where it is, how to load it, which device.

A model of a run is either an external one (a ModelSpec: local folder or hub
id) or an artifact of the store (a trained target, a merge). Both end up as a
folder or hub id that transformers loads, plus the tokenizer and chat template
that go with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusechat_core.chat import ChatFormatter
from fusechat_core.models import load_causal_lm, load_tokenizer, pick_device, resolve_ref, warm_imports
from fusechat_core.store import ArtifactStore


class EvaluationError(RuntimeError):
    """Evaluation cannot proceed; the message is one line naming what and where."""


@dataclass(frozen=True)
class EvalModel:
    """A loadable model: ``path`` is a local folder or a hub id."""

    name: str
    path: str
    revision: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    trust_remote_code: bool = False
    dtype: str | None = None  # the model's own precision where its config names one
    # spread over every visible GPU (a source's ``device_map``): Mixtral-8x7B in bf16 (~94 GB)
    # fits no 80 GB GPU alone; it was evaluated on one
    device_map: str | None = None

    @property
    def tokenizer_ref(self) -> str:
        return self.tokenizer or self.path


def resolve_model(store: ArtifactStore, name: str, ref: dict[str, Any]) -> EvalModel:
    """``RunPlan.model_ref`` (or ``{"path": ...}``) to a loadable model."""
    if "artifact" in ref:
        folder = store.fetch(ref["artifact"])
        return EvalModel(name=name, path=str(folder), chat_template=ref.get("chat_template"))
    spec = ref.get("model", ref)
    path = spec.get("path")
    if not path:
        raise EvaluationError(f"model {name!r}: reference has neither an artifact nor a path")
    if str(path).startswith("demo:"):
        raise EvaluationError(f"model {name!r}: {path!r} is made by the demo stage; "
                              f"pass its artifact address instead")
    return EvalModel(name=name, path=resolve_ref(path), revision=spec.get("revision"),
                     tokenizer=spec.get("tokenizer"), chat_template=spec.get("chat_template"),
                     trust_remote_code=bool(spec.get("trust_remote_code")),
                     dtype=spec.get("dtype") if spec.get("dtype") not in (None, "auto") else None,
                     device_map=spec.get("device_map"))


def load_for_eval(model: EvalModel, device: str = "auto",
                  dtype: str = "float32") -> tuple[Any, Any, ChatFormatter, str]:
    """(model in eval mode on its device, tokenizer, chat formatter, device).

    One precision for every model of a run (``evaluate.dtype``), float32 unless told: targets
    are saved in float32 (master weights) while the pivot ships in bf16, and at the paper's
    learning rate (5e-6, Adam: about that much per update) every weight above 3e-3 in
    magnitude moves by less than half a bf16 step (2**-9 of it) per update: loaded in bf16,
    a target rounds back towards its pivot and the fusion measured shrinks."""
    warm_imports()
    device = pick_device(device)
    # A model whose config names its precision keeps it: a source such as Mixtral-8x7B (47B
    # parameters) fits one GPU in bf16, not in float32. Targets and merges (artifacts) and the
    # models that name none are evaluated in ``dtype``.
    lm = load_causal_lm(model, device, dtype=model.dtype or dtype)
    tok = load_tokenizer(model.tokenizer_ref, model.revision)
    return lm, tok, ChatFormatter(tok, model.chat_template), device


def run_model_ref(run: Any, name: str, ref: dict[str, Any], store: ArtifactStore) -> dict[str, Any]:
    """A run's model reference (``RunPlan.model_ref``) made loadable.

    A ``demo:NAME`` model is an artifact (the demo stage's folder), like targets. Targets and
    merges are the pivot fine-tuned or merged, so they speak the pivot's chat
    template: a template the config names for the pivot applies to them too
    (their saved tokenizer may not carry it).
    """
    from fusechat_core.plan import RunPlan

    if "artifact" in ref:
        if run.pivot.chat_template and not ref.get("chat_template"):
            return {**ref, "chat_template": run.pivot.chat_template}
        return ref
    # RunPlan.model_ref gives demo models as artifacts, so only external models reach here.
    spec = RunPlan(run).model(name)
    return {"model": spec.model_dump(exclude={"name"})}
