"""Offline measures that need no judge (SPEC §1.6).

Held-out NLL: the mean negative log-likelihood per supervised token (the
assistant's tokens under the model's own chat template, ``ChatFormatter``
labels) of the dataset's held-out split, per data source and over all of them.
Token-weighted, so a domain's figure is its total NLL over its token count.
Per-token NLL compares models that share a tokenizer (pivot, targets, merges);
bits per byte (the same total NLL over the UTF-8 bytes those tokens cover, in
bits) also compares sources whose tokenizers cut the text differently.

Exact match: for held-out sources whose rows have one right answer (the
synthetic arithmetic / reverse / facts domains, or a user's own), the model
answers the last user turn greedily and its answer must equal the reference
assistant turn after whitespace normalisation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from fusechat_core import stopping
from fusechat_core.chat import IGNORE, to_messages
from fusechat_core.determinism import pin_compute
from fusechat_core.evaluate.loading import EvaluationError
from fusechat_core.evaluate.mt_bench import generate_batch, stop_token_ids


class _Sum:
    __slots__ = ("nll", "tokens", "bytes", "sequences")

    def __init__(self) -> None:
        self.nll, self.tokens, self.bytes, self.sequences = 0.0, 0, 0, 0

    def as_dict(self) -> dict[str, Any]:
        return {"nll": self.nll / self.tokens if self.tokens else None, "tokens": self.tokens,
                "sequences": self.sequences, "bytes": self.bytes,
                "perplexity": math.exp(self.nll / self.tokens) if self.tokens else None,
                "bits_per_byte": self.nll / (self.bytes * math.log(2)) if self.bytes else None}


def supervised_bytes(text: str, labels: Sequence[int], offsets: Sequence[tuple[int, int]],
                     content: Sequence[tuple[int, int]]) -> int:
    """UTF-8 bytes of the assistant's words (``content``: ``Rendered.content``) that the scored
    tokens (labels at t >= 1) cover, each byte once.

    Once: byte-fallback tokens of one character (``<0xE2>`` ``<0x98>`` ``<0x95>``) each carry
    that whole character's offsets. Words only: the template's markers (``</s>``,
    ``<|im_end|>``) differ per model. So a text has one byte count whatever the tokenizer
    and template, and bits per byte compare models that share neither."""
    merged: list[list[int]] = []  # the scored tokens' character spans, overlaps joined
    for a, b in sorted(o for t, (o, y) in enumerate(zip(offsets, labels)) if t >= 1 and y != IGNORE and o[1] > o[0]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return sum(len(text[max(a, c0):min(b, c1)].encode()) for a, b in merged for c0, c1 in content
               if max(a, c0) < min(b, c1))


def sequence_nll(model: Any, batch_ids: Sequence[Sequence[int]], batch_labels: Sequence[Sequence[int]],
                 pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, supervised tokens) per sequence; the prediction for token t is made at t-1.

    Right-padded batch; the vocabulary-sized log-softmax is taken one sequence at a
    time in float32, so memory stays at one sequence's logits beyond the forward pass.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(batch_ids, batch_labels)):
        ids[i, :len(x)] = torch.tensor(list(x))
        labels[i, :len(y)] = torch.tensor(list(y))
        mask[i, :len(x)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out = []
        for i in range(len(batch_ids)):
            target = labels[i, 1:].to(device)
            keep = target != IGNORE
            n = int(keep.sum())
            if n == 0:
                out.append((0.0, 0))
                continue
            lp = F.cross_entropy(logits[i, :-1][keep].float(), target[keep], reduction="sum")
            out.append((float(lp), n))
    return out


def heldout_nll(model: Any, formatter: Any, rows: Sequence[dict], *, max_length: int, batch_size: int = 8,
                progress: Callable[[str], None] | None = None,
                on_count: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``{"sources": {source: {nll, tokens, sequences, perplexity}}, "all": {...}, "sequences": {...}}``;
    ``sequences`` holds columns ``id``, ``source``, ``nll`` (summed over the sequence), ``tokens``,
    ``bytes`` and ``cut`` (cut to ``max_length``: what was measured of it depends on the
    tokenizer), one entry per measured sequence, in row-id order.
    ``on_count(done, total)``: sequences measured so far, after each batch.

    Rows longer than ``max_length`` tokens are cut; rows with no supervised token
    left after the cut count as sequences skipped. A row whose NLL is NaN/inf (a
    model with non-finite weights or outputs) fails the measure, naming it.
    """
    pin_compute()
    pad = formatter.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    encoded = []
    skipped = 0
    for r in rows:
        enc = formatter.encode(r["conversations"], max_length=max_length)
        if sum(1 for y in enc.labels[1:] if y != IGNORE) == 0:
            skipped += 1
            continue
        encoded.append((r.get("source") or "unknown", enc.input_ids, enc.labels,
                        supervised_bytes(enc.text, enc.labels, enc.offsets, enc.content), r.get("id"),
                        enc.cut))
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    encoded.sort(key=lambda e: -len(e[1]))
    per: dict[str, _Sum] = {}
    total = _Sum()
    seqs: dict[str, list] = {"id": [], "source": [], "nll": [], "tokens": [], "bytes": [], "cut": []}
    t0 = time.time()
    for start in range(0, len(encoded), batch_size):
        stopping.check()
        chunk = encoded[start:start + batch_size]
        for (src, _, _, nbytes, row_id, cut), (nll, n) in zip(chunk, sequence_nll(
                model, [c[1] for c in chunk], [c[2] for c in chunk], pad)):
            if not math.isfinite(nll):
                raise EvaluationError(f"held-out NLL is {nll} on row {row_id} of domain {src}: "
                                      f"the model's outputs are not finite")
            for key, v in zip(seqs, (row_id, src, nll, n, nbytes, cut)):
                seqs[key].append(v)
            for acc in (per.setdefault(src, _Sum()), total):
                acc.nll += nll
                acc.tokens += n
                acc.bytes += nbytes
                acc.sequences += 1
        if on_count is not None:
            on_count(min(start + batch_size, len(encoded)), len(encoded))
    if progress:
        progress(f"held-out NLL: {len(encoded)} sequences, {total.tokens} tokens in {time.time() - t0:.1f} s")
    # Per sequence too, in row-id order: the report's paired bootstrap resamples these (the same
    # sequences for every model), so its intervals need no second pass over any model.
    order = sorted(range(len(seqs["id"])), key=lambda i: str(seqs["id"][i]))
    return {"sources": {k: per[k].as_dict() for k in sorted(per)}, "all": total.as_dict(),
            "skipped_no_supervised": skipped,
            "sequences": {k: [v[i] for i in order] for k, v in seqs.items()}}


def normalise_answer(text: str) -> str:
    return " ".join(text.split())


def exact_match(model: Any, tokenizer: Any, formatter: Any, rows: Sequence[dict], sources: Sequence[str], *,
                max_new_tokens: int, batch_size: int = 8, examples: int = 5) -> dict[str, Any]:
    """Greedy answer to the last user turn vs the reference assistant turn, per source.

    ``{"sources": {source: {accuracy, correct, n, mismatches: [...]}}, "all": {...}}``;
    sources in ``sources`` with no held-out row are absent.
    """
    wanted = set(sources)
    items = []
    for r in rows:
        if r.get("source") not in wanted:
            continue
        messages = to_messages(r["conversations"])
        if messages[-1]["role"] != "assistant":
            continue
        ref = messages[-1]["content"]
        # An answer equal to the reference cannot need many more tokens than the reference
        # itself; stopping there saves generating max_new_tokens of a wrong answer.
        limit = min(max_new_tokens, 2 * len(tokenizer(ref, add_special_tokens=False)["input_ids"]) + 8)
        items.append((r, formatter.prompt_ids(messages[:-1]), ref, limit))
    items.sort(key=lambda it: (-len(it[1]), it[3]))
    stops = stop_token_ids(tokenizer, model)
    per: dict[str, dict[str, Any]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        gens = generate_batch(model, tokenizer, [c[1] for c in chunk], temperature=0.0,
                              max_new_tokens=max(c[3] for c in chunk), stop_ids=stops)
        for (row, _, ref, _), g in zip(chunk, gens):
            acc = per.setdefault(row["source"], {"correct": 0, "n": 0, "mismatches": []})
            acc["n"] += 1
            if normalise_answer(g.text) == normalise_answer(ref):
                acc["correct"] += 1
            elif len(acc["mismatches"]) < examples:
                acc["mismatches"].append({"id": row.get("id"), "expected": ref, "got": g.text})
    for acc in per.values():
        acc["accuracy"] = acc["correct"] / acc["n"]
    n = sum(a["n"] for a in per.values())
    correct = sum(a["correct"] for a in per.values())
    return {"sources": {k: per[k] for k in sorted(per)},
            "all": {"accuracy": correct / n if n else None, "correct": correct, "n": n}}
