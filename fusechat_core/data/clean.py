"""Cleaning as Vicuna did it (``data.clean: vicuna``), the step the paper applies before splitting.

Two rules, each its own reason in the stage's stats (``cleaned`` per source):

- ``non_english``: the conversation's prose is not English. Detected with py3langid
  (the maintained, numpy-based fork of langid.py; its model ships inside the wheel, so
  it works offline). Code blocks are removed first, since a language identifier reads
  code as some other language; a conversation with under ``MIN_PROSE_LETTERS`` letters
  of prose left (pure code, pure arithmetic) has nothing to judge and is kept.
- ``special_characters``: more than ``MAX_SPECIAL_SHARE`` of its non-space characters are
  neither letters nor digits (symbol dumps, ASCII art, encoded blobs). Code stays well
  under it (about a quarter of a Python file's non-space characters are symbols).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from fusechat_core.registry import Registry

MIN_PROSE_LETTERS = 20
MAX_SPECIAL_SHARE = 0.5

_FENCED = re.compile(r"```.*?(?:```|$)", re.S)
_INLINE = re.compile(r"`[^`\n]*`")


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # Our own instance (not the module's global one): the model file inside the package.
    return LanguageIdentifier.from_model_file(MODEL_FILE)


def special_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    return sum(not c.isalnum() for c in chars) / len(chars)


def language(text: str) -> str | None:
    """The language code of ``text``'s prose, or None when there is too little prose."""
    prose = _INLINE.sub(" ", _FENCED.sub(" ", text))
    if sum(c.isalpha() for c in prose) < MIN_PROSE_LETTERS:
        return None
    return _identifier().classify(prose)[0]


# ``data.clean`` names one; a version past 1 enters the addresses of the datasets it cleans.
CLEANERS: Registry[Callable[[list[dict[str, str]]], str | None]] = Registry("cleaner", addressed=True)


@CLEANERS.register("vicuna")
def vicuna_reason(conv: list[dict[str, str]]) -> str | None:
    """Why Vicuna's cleaning drops this conversation, or None to keep it."""
    text = "\n".join(t["value"] for t in conv)
    if special_share(text) > MAX_SPECIAL_SHARE:
        return "special_characters"
    lang = language(text)
    if lang is not None and lang != "en":
        return "non_english"
    return None

