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
from fusechat_core.models import load_tokenizer, resolve_ref
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
    dtype: str = "auto"

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
                     dtype=spec.get("dtype") or "auto")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("evaluate.device: 'cuda' asked for but no CUDA device is visible")
    return device


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # On a GPU the checkpoint's own dtype (bf16 for 7B chat models); on the CPU
        # half precision is slow and imprecise, so compute in float32.
        return "auto" if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_for_eval(model: EvalModel, device: str = "auto") -> tuple[Any, Any, ChatFormatter, str]:
    """(model in eval mode on its device, tokenizer, chat formatter, device)."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    try:
        lm = AutoModelForCausalLM.from_pretrained(model.path, revision=model.revision,
                                                  dtype=_torch_dtype(model.dtype, device))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvaluationError(f"model {model.name!r}: cannot load {model.path}: {first}") from exc
    lm.to(device).eval()
    tok = load_tokenizer(resolve_ref(model.tokenizer_ref), model.revision)
    return lm, tok, ChatFormatter(tok, model.chat_template), device
