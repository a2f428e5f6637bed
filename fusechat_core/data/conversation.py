"""One conversation shape for every source: ShareGPT's ``from``/``value`` turns.

Loaders turn a raw row into ``[(role, text), ...]``; ``normalise`` maps role
names, cleans, and checks that the conversation starts with the user and
alternates. A row that cannot be used raises ``MalformedRow`` with a short
reason, which the dataset stage counts and reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from fusechat_core.registry import Registry

HUMAN, GPT = "human", "gpt"

_ROLES = {
    "human": HUMAN, "user": HUMAN, "prompter": HUMAN, "question": HUMAN,
    "gpt": GPT, "assistant": GPT, "chatgpt": GPT, "bing": GPT, "bard": GPT, "model": GPT,
    "system": "system",
}

Loader = Callable[[dict[str, Any]], list[tuple[str, str]]]
LOADERS: Registry[Loader] = Registry("data loader", addressed=True)


class MalformedRow(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def field(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise MalformedRow(f"missing_{names[0]}")


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedRow("non_text_value")
    return value


def normalise(turns: list[tuple[str, str]], repairs: Counter | None = None) -> list[dict[str, str]]:
    """Clean turns into alternating human/gpt, starting with human, ending with gpt.

    Two shapes common in scraped chats (ShareGPT) are repaired, not dropped, and counted in
    ``repairs``: an assistant turn before the first question (a greeting) goes, as FastChat's
    training code skips it; empty turns at the end (a reply that never came) go, leaving the
    conversation up to its last answer. An empty turn anywhere else makes the row malformed:
    what it answers is unknown."""
    out: list[dict[str, str]] = []
    for role, value in turns:
        mapped = _ROLES.get(str(role).strip().lower())
        if mapped is None:
            raise MalformedRow("unknown_role")
        if mapped == "system":
            # System prompts are not part of the fusion data: each model's own
            # chat template supplies its system prompt when the data is rendered.
            continue
        out.append({"from": mapped, "value": text(value).strip()})
    notes = repairs if repairs is not None else Counter()
    if out and not out[-1]["value"]:
        notes["trailing_empty_turn"] += 1
        while out and not out[-1]["value"]:
            out.pop()
    if not out:
        raise MalformedRow("empty_conversation")
    if out[0]["from"] != HUMAN:
        notes["leading_assistant_turn"] += 1
        while out and out[0]["from"] != HUMAN:
            out.pop(0)
    if any(not t["value"] for t in out):
        raise MalformedRow("empty_turn")
    for prev, cur in zip(out, out[1:]):
        if prev["from"] == cur["from"]:
            raise MalformedRow("non_alternating")
    if out and out[-1]["from"] == HUMAN:
        out.pop()  # an unanswered last question supervises nothing
    if not out:
        raise MalformedRow("no_assistant_turn")
    return out


_PROMPT_RESPONSE_KEYS = (("prompt", "response"), ("prompt", "completion"), ("query", "response"),
                         ("problem", "solution"), ("question", "answer"))
# ``format: auto``: the first shape a row fits names its loader, in this order.
_SHAPES: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...] = (
    ("orca_best", lambda row: isinstance(row.get("cluster"), dict)),  # shahules786/orca-best
    ("sharegpt", lambda row: "conversations" in row),
    ("openai", lambda row: "messages" in row),
    ("capybara", lambda row: "conversation" in row),
    ("alpaca", lambda row: "instruction" in row and "output" in row),
    ("chatml", lambda row: isinstance(row.get("text"), str) and "<|im_start|>" in row["text"]),
    ("prompt_response", lambda row: any(a in row and b in row for a, b in _PROMPT_RESPONSE_KEYS)),
)
# Every loader ``detect_format`` may choose: a ``format: auto`` source may be read by any.
AUTO_FORMATS = tuple(name for name, _ in _SHAPES)


def detect_format(row: dict[str, Any]) -> str:
    """The registered loader for a row's shape (used by ``format: auto``; one of ``AUTO_FORMATS``)."""
    for name, fits in _SHAPES:
        if fits(row):
            return name
    raise MalformedRow("unknown_shape")
