"""Rendering a conversation for one model: its chat template, token ids, labels.

The same ShareGPT conversation is rendered for every model with that model's
own template; only assistant tokens are supervised (SPEC §1.1). Which tokens
are the assistant's is found from character spans, not by tokenising pieces
separately (that would change how text at the seams is tokenised):

    span of assistant turn i = [len(render(turns[:i], generation prompt)),
                                len(render(turns[:i+1])))

so the assistant's content and its end-of-turn marker are supervised, and the
"assistant:" prefix that the generation prompt already holds is not. A token
is supervised when its character span starts inside such a span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fusechat_core.registry import Registry

IGNORE = -100

# name -> jinja source. Used when the tokenizer has no template of its own or
# the config names one (``ModelSpec.chat_template``).
TEMPLATES: Registry[str] = Registry("chat template")

TEMPLATES.register("mistral")(
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES.register("openchat")(
    "{{ bos_token }}{% for m in messages %}"
    "{{ 'GPT4 Correct ' + ('User' if m['role'] == 'user' else 'Assistant') + ': ' + m['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}{% if add_generation_prompt %}GPT4 Correct Assistant:{% endif %}"
)
TEMPLATES.register("chatml")(
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES.register("vicuna")(
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_ROLE = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


def to_messages(conversation: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """ShareGPT turns (``from``/``value``) to chat messages (``role``/``content``)."""
    out = []
    for t in conversation:
        if "role" in t:
            out.append({"role": t["role"], "content": t["content"]})
        else:
            out.append({"role": _ROLE[t["from"]], "content": t["value"]})
    return out


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    labels: list[int]  # IGNORE where not supervised; the token id where it is
    offsets: list[tuple[int, int]]
    # Where each assistant message's own words are in ``text``: the assistant's span less
    # the template's markers around them (``</s>``, ``<|im_end|>``), which differ per model.
    content: list[tuple[int, int]] = field(default_factory=list)
    cut: bool = False  # cut to ``max_length`` tokens: the tail of ``text`` is not in ``input_ids``

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _content_spans(text: str, spans: Sequence[tuple[int, int]], answers: Sequence[str]) -> list[tuple[int, int]]:
    """Each answer's place inside its assistant span: as given, else as the template may
    trim it; a template that rewrites the words leaves the whole span."""
    out = []
    for (a, b), answer in zip(spans, answers):
        for words in (answer, answer.strip()):
            pos = text.find(words, a, b) if words else -1
            if pos >= 0:
                out.append((pos, pos + len(words)))
                break
        else:
            out.append((a, b))
    return out


class ChatFormatter:
    """One model's way of turning conversations into token ids and labels."""

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tokenizer = tokenizer
        if template is not None:
            self.template = TEMPLATES.get(template)
        elif getattr(tokenizer, "chat_template", None):
            self.template = tokenizer.chat_template
        else:
            self.template = TEMPLATES.get("mistral")
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ChatFormatter needs a fast tokenizer (character offsets)")

    def text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        full = self.text(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.text(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.text(messages[: i + 1])
            if not full.startswith(upto) or not upto.startswith(before):
                raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
            spans.append((len(before), len(upto)))
        return full, spans

    def encode(self, conversation: Sequence[dict[str, str]], max_length: int | None = None) -> Rendered:
        messages = to_messages(conversation)
        text, spans = self.assistant_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        labels = [IGNORE] * len(ids)
        s = 0
        for t, (a, b) in enumerate(offsets):
            while s < len(spans) and a >= spans[s][1]:
                s += 1
            if s < len(spans) and spans[s][0] <= a < spans[s][1] and b > a:
                labels[t] = ids[t]
        cut = max_length is not None and len(ids) > max_length
        if cut:
            ids, labels, offsets = ids[:max_length], labels[:max_length], offsets[:max_length]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        return Rendered(text, ids, labels, offsets, _content_spans(text, spans, answers), cut)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ending with the generation prompt (for answering)."""
        text = self.text(messages, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
