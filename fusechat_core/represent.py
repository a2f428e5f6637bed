"""Source representations (SPEC §1.2): every model's teacher-forced top-k next-token
distributions over the fusion data, stored compactly, in shards that resume.

Layout of one shard artifact (``RunPlan.represent_shard(model, i)``), the contract the
alignment and training stages read:

- ``representation.safetensors``
    ``input_ids`` [total_tokens] (uint16 when the vocabulary has < 65,536 entries, else
    int32): every sequence's rendered ids, concatenated; ``seq_offsets`` int64 [n_seq+1].
    ``sup_positions`` [total_sup] (uint16 when max_length < 65,536, else int32): the
    position t of each supervised target token in its sequence (labels[t] != -100,
    t >= 1); its distribution is the prediction made at t-1. ``sup_offsets`` int64
    [n_seq+1]. ``topk_ids`` [total_sup, k] (ids dtype) and ``topk_logprobs`` float16
    [total_sup, k]: log-softmax at T = 1, descending. ``metric_ce`` float32 [n_seq].
- ``meta.json``: model, vocab size, k, the dataset row id of every sequence, counts, and
  the digests that make the same-tokenization check cheap (``same_tokenization``).

Shard i of N holds the training rows with index in [i·n//N, (i+1)·n//N), in dataset
order. No sequence is ever dropped: every model's shards hold the same rows in the same
order, which alignment and training rely on. A sequence left with no supervised token
(its assistant text cut by ``represent.max_length``) keeps its ids, has no supervised
rows and ``metric_ce`` NaN: the mean of nothing, and it contributes no loss anyway.

Cut views. The dataset is cut into blocks by the pivot's tokenizer only (so its
address does not depend on the sources). A model whose rendering of a row is longer
than ``represent.max_length`` stores the prefix that fits: the row stays in its place,
``meta.cut_rows`` lists its index in the shard and ``n_cut`` counts it (shard and stage
manifests, so the stage summary shows it). Alignment then pairs only the prefix: the
pivot positions beyond it fall back to the label, and the cut source is ranked no
better than the pivot on that sequence (``align.project.comparable_metric_ce``).

Inside a shard, sequences are sorted by length and batched, so padding costs almost no
compute; results are stored back in dataset order. For the common decoder families the
LM head is applied only to the positions that are kept, so collection never builds the
batch × length × vocabulary logits a plain forward pass does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusechat_core import stopping
from fusechat_core.chat import IGNORE, ChatFormatter
from fusechat_core.config import ModelSpec, RepresentConfig, RunConfig
from fusechat_core.data.build import split_size, split_table
from fusechat_core.determinism import pin_compute
from fusechat_core.models import (
    claim_gpu,
    formatter_for,
    load_causal_lm,
    pick_device,
    release_memory,
    tokenizer_of,
    tokenizer_ref,
)
from fusechat_core.store import ArtifactStore, ArtifactWriter, Manifest

log = logging.getLogger("fusechat.represent")

REPRESENTATION_FILE = "representation.safetensors"
META_FILE = "meta.json"
SHARDS_FILE = "shards.json"
ARRAYS = ("input_ids", "seq_offsets", "sup_positions", "sup_offsets", "topk_ids", "topk_logprobs",
          "metric_ce")

Progress = Callable[[dict[str, Any]], None]

# Families whose logits are exactly ``lm_head(decoder(x).last_hidden_state)``: for them the
# head runs on the kept positions only. Others (logit soft-capping, scaling, ...) take the
# plain forward pass, which is always right, only heavier.
_PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo",
    "olmo2", "stablelm", "starcoder2", "deepseek_v3", "internlm2", "yi",
})
# Rows of the LM head computed at once: bounds the float32 log-softmax buffer
# (4,096 × 131k × 4 bytes = 2 GiB at worst) whatever the batch and length.
_HEAD_CHUNK = 4096


class RepresentError(RuntimeError):
    """The stage cannot proceed; the message is one line naming the model, shard or row."""


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def position_dtype(max_length: int) -> np.dtype:
    return np.dtype(np.uint16) if max_length < 65536 else np.dtype(np.int32)


def shard_rows(n_rows: int, index: int, shards: int) -> range:
    """Training rows of shard ``index`` of ``shards``: a contiguous block in dataset order."""
    if not 0 <= index < shards:
        raise RepresentError(f"shard {index} is out of range for {shards} shards")
    return range(index * n_rows // shards, (index + 1) * n_rows // shards)


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's whole token → id table (added tokens included)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def tokenization_digest(input_ids: np.ndarray, seq_offsets: np.ndarray) -> str:
    """sha256 of the ids and sequence boundaries, independent of the stored integer width."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(seq_offsets, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(input_ids, dtype="<i8").tobytes())
    return h.hexdigest()


@dataclass
class Representation:
    """One shard: the arrays of the contract above, plus its meta."""

    input_ids: np.ndarray
    seq_offsets: np.ndarray
    sup_positions: np.ndarray
    sup_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    metric_ce: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # collection time, when just computed; never stored

    @property
    def n_seq(self) -> int:
        return len(self.seq_offsets) - 1

    def ids(self, s: int) -> np.ndarray:
        return self.input_ids[self.seq_offsets[s]:self.seq_offsets[s + 1]]

    def rows(self, s: int) -> slice:
        """Supervised rows (of sup_positions, topk_*) of sequence ``s``."""
        return slice(int(self.sup_offsets[s]), int(self.sup_offsets[s + 1]))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}

    def validate(self, where: str) -> None:
        """Shapes and offsets agree with each other and with the meta; raise naming ``where``."""
        n, k = self.n_seq, int(self.meta.get("top_k", self.topk_ids.shape[-1]))
        checks = [
            (self.seq_offsets.ndim == 1 and n >= 0, "seq_offsets must be 1-D"),
            (len(self.sup_offsets) == n + 1, f"sup_offsets must have n_seq+1 = {n + 1} entries"),
            (self.metric_ce.shape == (n,), f"metric_ce must be [{n}]"),
            (n == 0 or (self.seq_offsets[0] == 0 and self.seq_offsets[-1] == len(self.input_ids)),
             "seq_offsets must span input_ids"),
            (n == 0 or (self.sup_offsets[0] == 0 and self.sup_offsets[-1] == len(self.sup_positions)),
             "sup_offsets must span sup_positions"),
            (bool((np.diff(self.seq_offsets) >= 0).all()) and bool((np.diff(self.sup_offsets) >= 0).all()),
             "offsets must not decrease"),
            (self.topk_ids.shape == (len(self.sup_positions), k), f"topk_ids must be [{len(self.sup_positions)}, {k}]"),
            (self.topk_logprobs.shape == self.topk_ids.shape, "topk_logprobs must have topk_ids' shape"),
            (self.topk_logprobs.dtype == np.float16, "topk_logprobs must be float16"),
            (len(self.meta.get("row_ids", [])) == n, f"meta.row_ids must have {n} entries"),
        ]
        for ok, message in checks:
            if not ok:
                raise RepresentError(f"{where}: {message}")


# -- collection ------------------------------------------------------------------------------------

def encode_rows(formatter: ChatFormatter, rows: Sequence[dict[str, Any]],
                max_length: int, cut: list[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, supervised positions t >= 1) of each row rendered with the model's template,
    cut to its first ``max_length`` tokens; the index of every row so cut is appended to
    ``cut`` when given."""
    out = []
    for i, row in enumerate(rows):
        try:
            r = formatter.encode(row["conversations"])
        except Exception as exc:  # a template or tokenizer failure names the row it failed on
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RepresentError(f"row {row.get('id', '?')!r}: cannot render: {first}") from exc
        ids = np.asarray(r.input_ids[:max_length], dtype=np.int64)
        labels = np.asarray(r.labels[:max_length], dtype=np.int64)
        if cut is not None and len(r.input_ids) > max_length:
            cut.append(i)
        pos = np.nonzero(labels != IGNORE)[0]
        # Position 0 has no preceding token to predict it from.
        out.append((ids, pos[pos >= 1].astype(np.int64)))
    return out


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int | None = None) -> list[list[int]]:
    """Indices sorted by length (longest first, so an out-of-memory shows on the first
    batch, not after an hour) and cut into batches of ``batch_size``, or, when
    ``batch_tokens`` is given, into the longest runs whose padded size (sequences × the
    first, longest one's length) stays within ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_tokens is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * max(lengths[batches[-1][0]], 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            if lengths[i] > batch_tokens:
                raise RepresentError(f"represent.batch_tokens: a sequence of {lengths[i]} tokens exceeds the "
                                     f"budget of {batch_tokens}")
            batches.append([i])
    return batches


def head_only_supported(model: Any) -> bool:
    """True when logits are exactly the output embedding applied to the decoder's output."""
    import torch

    cfg = model.config
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    head = model.get_output_embeddings()
    return isinstance(head, torch.nn.Linear) and model.get_decoder() is not model


class _Scorer:
    """Top-k log-probs and the label's log-prob at given (sequence, position) pairs of a batch."""

    def __init__(self, model: Any, top_k: int, head_only: bool | None = None):
        self.model = model
        self.top_k = top_k
        self.head_only = head_only_supported(model) if head_only is None else head_only
        self.head = model.get_output_embeddings()
        self.decoder = model.get_decoder() if self.head_only else None

    def __call__(self, ids: Any, mask: Any, b_idx: Any, t_idx: Any, targets: Any) -> tuple[Any, Any, Any]:
        import torch

        with torch.inference_mode():
            if self.head_only:
                hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                # Under ``device_map: auto`` (Mixtral over 8 GPUs) the decoder's output is on its
                # last layer's GPU and the head on its own: only the whole model's forward moves
                # its output back to the input's device, so indices and targets follow the tensors.
                states = hidden[b_idx.to(hidden.device), (t_idx - 1).to(hidden.device)]
                del hidden
                project = self.head
            else:
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                states = logits[b_idx, t_idx - 1]
                del logits
                project = None
            ids_out, lp_out, tgt_out = [], [], []
            for a in range(0, states.shape[0], _HEAD_CHUNK):
                chunk = states[a:a + _HEAD_CHUNK]
                logits = (project(chunk) if project is not None else chunk).float()
                # log_softmax = logits - logsumexp: the top-k of the logits are the top-k of the
                # log-probs, so the full log-softmax tensor is never written (a vocabulary-wide pass saved).
                lse = torch.logsumexp(logits, dim=-1)
                top = logits.topk(self.top_k, dim=-1, sorted=True)
                ids_out.append(top.indices)
                lp_out.append(top.values - lse[:, None])
                tgt_out.append(logits.gather(1, targets[a:a + _HEAD_CHUNK, None].to(logits.device))[:, 0] - lse)
            if not ids_out:
                empty = torch.empty((0, self.top_k), device=states.device)
                return empty.long(), empty, torch.empty((0,), device=states.device)
            return torch.cat(ids_out), torch.cat(lp_out), torch.cat(tgt_out)


def model_vocab_size(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def collect_shard(model: Any, tokenizer: Any, formatter: ChatFormatter, rows: Sequence[dict[str, Any]],
                  cfg: RepresentConfig, device: str, *, progress: Progress | None = None,
                  head_only: bool | None = None, meta: dict[str, Any] | None = None) -> Representation:
    """Run ``model`` over ``rows`` with teacher forcing and keep what the contract stores.

    ``head_only`` forces (True) or forbids (False) applying the LM head to kept positions
    only; None decides from the architecture.
    """
    pin_compute()
    import torch

    vocab = model_vocab_size(model)
    k = cfg.top_k
    if k > vocab:
        raise RepresentError(f"represent.top_k: {k} exceeds the model's vocabulary of {vocab}")
    cut: list[int] = []
    encoded = encode_rows(formatter, rows, cfg.max_length, cut)
    for row, (ids, _) in zip(rows, encoded):
        if len(ids) and int(ids.max()) >= vocab:
            raise RepresentError(f"row {row.get('id', '?')!r}: token id {int(ids.max())} is outside the "
                                 f"model's vocabulary of {vocab} (tokenizer and model do not match)")
    scorer = _Scorer(model, k, head_only)
    n = len(rows)
    per_ids: list[np.ndarray | None] = [None] * n
    per_lp: list[np.ndarray | None] = [None] * n
    ce = np.full(n, np.nan, dtype=np.float32)
    total_tokens = int(sum(len(e[0]) for e in encoded))
    done_tokens = done_seqs = 0
    start = time.perf_counter()
    for batch in length_batches([len(e[0]) for e in encoded], cfg.batch_size, cfg.batch_tokens):
        stopping.check()
        width = max(len(encoded[i][0]) for i in batch)
        if width == 0:
            raise RepresentError(f"row {rows[batch[0]].get('id', '?')!r}: renders to no tokens")
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        b_idx, t_idx = [], []
        for b, i in enumerate(batch):
            seq, pos = encoded[i]
            ids[b, :len(seq)] = seq
            mask[b, :len(seq)] = 1
            b_idx.append(np.full(len(pos), b, dtype=np.int64))
            t_idx.append(pos)
        bi, ti = np.concatenate(b_idx), np.concatenate(t_idx)
        ids_t = torch.from_numpy(ids).to(device)
        # Right padding never changes the real tokens' outputs; no mask at all when every
        # sequence fills the batch lets attention take its fastest kernel.
        mask_t = None if mask.all() else torch.from_numpy(mask).to(device)
        bi_t, ti_t = torch.from_numpy(bi).to(device), torch.from_numpy(ti).to(device)
        top_ids, top_lp, tgt_lp = scorer(ids_t, mask_t, bi_t, ti_t, ids_t[bi_t, ti_t])
        top_ids = top_ids.cpu().numpy()
        top_lp = top_lp.cpu().numpy()
        tgt_lp = tgt_lp.double().cpu().numpy()
        cuts = np.cumsum([0] + [len(encoded[i][1]) for i in batch])
        for b, i in enumerate(batch):
            a, z = cuts[b], cuts[b + 1]
            per_ids[i] = top_ids[a:z]
            per_lp[i] = top_lp[a:z]
            if z > a:
                ce[i] = -tgt_lp[a:z].mean()
        done_seqs += len(batch)
        done_tokens += int(mask.sum())
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress({"event": "batch", "seqs_done": done_seqs, "seqs_total": n, "tokens_done": done_tokens,
                      "tokens_total": total_tokens, "elapsed_s": elapsed,
                      "tokens_per_s": done_tokens / elapsed if elapsed > 0 else 0.0})

    idt = id_dtype(max(vocab, len(tokenizer)))
    lengths = np.array([len(e[0]) for e in encoded], dtype=np.int64)
    n_sup = np.array([len(e[1]) for e in encoded], dtype=np.int64)
    empty_ids = np.zeros((0, k), dtype=np.int64)
    rep = Representation(
        input_ids=(np.concatenate([e[0] for e in encoded]) if n else np.zeros(0, np.int64)).astype(idt),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        sup_positions=(np.concatenate([e[1] for e in encoded]) if n else np.zeros(0, np.int64)).astype(
            position_dtype(cfg.max_length)),
        sup_offsets=np.concatenate([[0], np.cumsum(n_sup)]).astype(np.int64),
        topk_ids=(np.concatenate(per_ids) if n else empty_ids).astype(idt),
        topk_logprobs=(np.concatenate(per_lp) if n else empty_ids).astype(np.float16),
        metric_ce=ce,
    )
    rep.meta = {
        **(meta or {}),
        "vocab_size": vocab,
        "top_k": k,
        "max_length": cfg.max_length,
        "row_ids": [row.get("id") for row in rows],
        "n_seq": n,
        "n_tokens": int(lengths.sum()),
        "n_supervised": int(n_sup.sum()),
        "n_without_supervision": int((n_sup == 0).sum()),
        "n_cut": len(cut),
        "cut_rows": cut,  # sequences longer than max_length: only their first max_length tokens are here
        "ids_sha256": tokenization_digest(rep.input_ids, rep.seq_offsets),
        "vocab_fingerprint": vocab_fingerprint(tokenizer),
        "head_only": scorer.head_only,
    }
    # Timing stays out of the artifact: an interrupted and an uninterrupted run write the same bytes.
    rep.seconds = time.perf_counter() - start
    return rep


# -- storage ---------------------------------------------------------------------------------------

def write_shard(writer: ArtifactWriter, rep: Representation) -> None:
    """Write a shard's arrays then its meta; the store writes the manifest after both."""
    from safetensors.numpy import save_file

    rep.validate(writer.address)
    with tempfile.TemporaryDirectory(prefix="fusechat-represent-") as tmp:
        # Through a local file: the arrays are not held twice in memory, and s3 gets a stream.
        path = Path(tmp) / REPRESENTATION_FILE
        save_file({k: np.ascontiguousarray(v) for k, v in rep.arrays().items()}, str(path),
                  metadata={"format": "fusechat-representation-v1"})
        writer.put_file(REPRESENTATION_FILE, path)
    writer.write_json(META_FILE, rep.meta)


# safetensors dtype names → numpy; the format is little-endian.
_SAFETENSORS_DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "U32": "<u4",
                       "I32": "<i4", "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8"}


def map_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only ``np.memmap`` over the file.

    Nothing is read until an array is indexed: a training step that slices a batch's rows
    pages in those rows only, so no shard's top-k table ever has to fit in memory. Raises
    ValueError when the file is not a well-formed safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"header of {n} bytes in a {size}-byte file")
        header = json.loads(fh.read(n))
    arrays: dict[str, np.ndarray] = {}
    # the file mapped once, every array a view of it: a mapping holds a file descriptor, and a
    # training rank holding 64 shards × 12 arrays as mappings of their own held 768 of them
    whole = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else None
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {info.get('dtype')!r}")
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
        start, stop = (int(x) for x in info["data_offsets"])
        if stop - start != dtype.itemsize * int(np.prod(shape)) or 8 + n + stop > size:
            raise ValueError(f"tensor {name!r}: data_offsets do not fit its shape or the file")
        # mmap cannot map zero bytes; an empty array holds nothing to map anyway
        arrays[name] = (whole[8 + n + start:8 + n + stop].view(dtype).reshape(shape) if stop > start
                        else np.zeros(shape, dtype))
    return arrays


def open_arrays(folder: str | Path, filename: str, names: Sequence[str],
                where: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The named arrays of a shard folder's ``filename``, memory-mapped (``map_safetensors``),
    and its ``meta.json``; RepresentError naming ``where`` (default: the file) when either is
    unreadable or an array is missing. The reader of both shard contracts.
    """
    path = Path(folder) / filename
    where = where or str(path)
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text())
        arrays = map_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RepresentError(f"{where}: unreadable: {exc}") from exc
    missing = [a for a in names if a not in arrays]
    if missing:
        raise RepresentError(f"{where}: missing arrays {', '.join(missing)}")
    return {a: arrays[a] for a in names}, meta


def open_shard(folder: str | Path, where: str | None = None) -> Representation:
    """The one reader of a REPRESENTATION shard folder, checked against the contract (shapes,
    offsets, meta). Arrays are memory-mapped: opening a shard reads its offsets, never its
    top-k tables. ``where`` names the shard in errors. The stages open folders the store
    handed out (``read_shard``, ``ArtifactStore.fetch``), whose bytes it verified against
    the manifest's sha256 on the way.
    """
    where = where or str(Path(folder) / REPRESENTATION_FILE)
    arrays, meta = open_arrays(folder, REPRESENTATION_FILE, ARRAYS, where)
    rep = Representation(**arrays, meta=meta)
    rep.validate(where)
    return rep


def bad_logprob(logprobs: np.ndarray) -> tuple[int, str] | None:
    """(row, what is wrong with it) for the first top-k row that is no teacher, or None.

    A log-prob is finite or -inf (padding, probability 0); NaN or +inf is a damaged teacher
    (+inf would pass every other check and turn the fused distribution into NaN), and so is a
    row of nothing but -inf (no candidate has any probability: a softmax's top-k always has
    a finite first entry). Readers check the rows they read (align the source's shard it
    projects, training each batch's rows) and refuse them with one line naming the shard
    and the row.
    """
    rows = np.asarray(logprobs)
    flat = rows.reshape(len(rows), -1) if rows.size else rows.reshape(len(rows), 0)
    bad = np.isnan(flat) | np.isposinf(flat)
    empty = np.isneginf(flat).all(axis=1) & (flat.shape[1] > 0)
    hit = bad.any(axis=1) | empty
    if not hit.any():
        return None
    r = int(np.nonzero(hit)[0][0])
    if bad[r].any():
        return r, f"{float(flat[r][bad[r]][0])}, not a log-prob (finite or -inf)"
    return r, "-inf everywhere: no candidate has any probability"


def read_shard(store: ArtifactStore, address: str) -> Representation:
    """A complete shard artifact of ``store``, memory-mapped and checked (``open_shard``)."""
    return open_shard(store.fetch(address), f"{address}/{REPRESENTATION_FILE}")


def _tokenization_of(x: Any) -> tuple[Any, Any]:
    meta = x.meta if isinstance(x, (Representation, Manifest)) else x
    if "shards" in meta and isinstance(meta["shards"], list):  # a whole stage artifact
        ids = [s["ids_sha256"] for s in meta["shards"]]
    else:
        ids = meta.get("ids_sha256")
    return ids, meta.get("vocab_fingerprint")


def same_tokenization(a: Any, b: Any) -> bool:
    """Whether two models rendered the data to identical ids with identical vocabularies,
    so alignment between them is the identity.

    ``a`` and ``b`` are shards (``Representation``), their meta dicts, or the manifests
    (or manifest meta) of whole stage artifacts; only digests are compared.
    """
    ids_a, voc_a = _tokenization_of(a)
    ids_b, voc_b = _tokenization_of(b)
    if ids_a is None or ids_b is None or voc_a is None or voc_b is None:
        raise RepresentError("same_tokenization: a side carries no ids_sha256/vocab_fingerprint")
    return ids_a == ids_b and voc_a == voc_b


# -- the stage ---------------------------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()  # the slots below
_MODEL_SLOT: dict[str, tuple[str, Any]] = {}  # device -> (model spec, model)
_CPU_LOADS = threading.Lock()  # the CPU is no task's alone (claim_gpu claims GPUs): its loads take turns


def _cached_model(spec: ModelSpec, device: str) -> Any:
    """One model kept per device: consecutive shards of a model on one GPU (or the CPU) load it
    once, and a shard on another GPU does not evict it. ``cuda`` (a model spread over every GPU,
    or the one GPU of a process) overlaps every ``cuda:k``: loading onto one frees the other's
    models first (models.claim_gpu gives a device to one task at a time, so none is in use);
    the single-GPU models kept before stayed beside Mixtral's 94 GB."""
    key = spec.model_dump_json()
    # A GPU is one task's at a time (claim_gpu): its load runs beside the other GPUs' loads. Under
    # one lock for every load, an 8-GPU node loaded its eight 7B models one after another, and
    # every shard waited on Mixtral's 94 GB.
    with _CPU_LOADS if not device.startswith("cuda") else contextlib.nullcontext():
        with _MODEL_LOCK:
            held = _MODEL_SLOT.get(device)
            if held is not None and held[0] == key:
                return held[1]
            overlapping = [d for d in _MODEL_SLOT if d == device or _overlap(d, device)]
            dropped = [weakref.ref(_MODEL_SLOT.pop(d)[1]) for d in overlapping]
        if dropped:
            release_memory(*dropped)  # free the device's previous models before loading the next
        model = load_causal_lm(spec, device)
        with _MODEL_LOCK:
            _MODEL_SLOT[device] = (key, model)
        return model


def _overlap(a: str, b: str) -> bool:
    """Whether two devices share memory: plain ``cuda`` (all of them) and any ``cuda:k``."""
    return a.startswith("cuda") and b.startswith("cuda") and "cuda" in (a, b)


def release_model(spec: ModelSpec | None = None) -> None:
    """Drop the kept models (only ``spec``'s, when given), so the stages after this one find
    the GPUs free in a process that runs them all."""
    with _MODEL_LOCK:
        mine = [d for d, (key, _) in _MODEL_SLOT.items() if spec is None or key == spec.model_dump_json()]
        if not mine:
            return
        dropped = [weakref.ref(_MODEL_SLOT.pop(d)[1]) for d in mine]
    release_memory(*dropped)


def represent_model(cfg: RunConfig, store: ArtifactStore, plan: Any, spec: ModelSpec,
                    shard_index: int | None = None, *, progress: Progress | None = None,
                    rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Compute the missing shard(s) of one model: ``shard_index``, or every shard when None.

    A ``demo:NAME`` model must have been made loadable first (``fusechat_core.demo.materialise``,
    which the Prefect tasks do through ``tasks._stage.run_config``).

    A shard whose artifact is complete is skipped without loading the model. Returns one
    summary per shard (address, whether it was computed, counts, seconds).
    """
    shards = cfg.represent.shards
    if shard_index is not None and not 0 <= shard_index < shards:
        raise RepresentError(f"represent {spec.name}: shard {shard_index} is out of range for "
                             f"represent.shards = {shards}")
    indices = range(shards) if shard_index is None else [shard_index]
    todo = [i for i in indices if not store.is_complete(plan.represent_shard(spec, i))]
    out = [{"shard": i, "address": plan.represent_shard(spec, i), "computed": False}
           for i in indices if i not in todo]
    if not todo:
        return out
    n_rows = split_size(store, plan.dataset) if rows is None else len(rows)
    # a GPU of its own among this process's represent tasks (an 8-GPU node, 8 threads)
    with claim_gpu(pick_device(cfg.represent.device), spread=bool(spec.device_map)) as device:
        formatter = formatter_for(spec)
        tok = formatter.tokenizer
        model = _cached_model(spec, device)
        for i in todo:
            address = plan.represent_shard(spec, i)
            span = shard_rows(n_rows, i, shards)
            if rows is None:
                part = split_table(store, plan.dataset, rows=span).to_pylist()
            else:
                part = [rows[j] for j in span]  # type: ignore[index]

            def report(event: dict[str, Any], i: int = i) -> None:
                if progress is not None:
                    progress({**event, "model": spec.name, "shard": i, "shards": shards})

            try:
                rep = collect_shard(model, tok, formatter, part, cfg.represent, device, progress=report,
                                    meta={"model": spec.name, "tokenizer": tokenizer_ref(spec)[0], "shard": i,
                                          "shards": shards, "dataset": plan.dataset})
            except (RepresentError, ValueError) as exc:  # a row, a budget, a token id: of which model, shard
                raise RepresentError(f"represent {spec.name} shard {i + 1}/{shards}: {exc}") from exc
            summary = {k: rep.meta[k] for k in ("n_seq", "n_tokens", "n_supervised", "n_cut", "ids_sha256",
                                                "vocab_fingerprint")}
            # where it ran, in the manifest (not the shard's files): `device: auto` on a pod that
            # sees no GPU runs on the CPU, and commit refuses to join its bytes with GPU shards'
            with store.writer(address, meta={"stage": "represent", "model": spec.name, "shard": i,
                                             "shards": shards, "device": device.split(":")[0], **summary}) as w:
                write_shard(w, rep)
            secs = rep.seconds
            rate = rep.meta["n_tokens"] / secs if secs > 0 else 0.0
            log.info("represent %s shard %d/%d: %d sequences (%d cut to represent.max_length), %d tokens "
                     "in %.1f s (%.0f tokens/s)", spec.name, i + 1, shards, rep.meta["n_seq"], rep.meta["n_cut"],
                     rep.meta["n_tokens"], secs, rate)
            report({"event": "shard_done", "tokens_per_s": rate, **summary})
            out.append({"shard": i, "address": address, "computed": True, "seconds": secs, **summary})
    return sorted(out, key=lambda s: s["shard"])


def commit_representation(cfg: RunConfig, store: ArtifactStore, plan: Any, spec: ModelSpec) -> Manifest:
    """The model's stage artifact, written once every shard is complete and consistent.

    Its manifest meta lists each shard's address, digest and tokenization digest, so a
    reader (alignment's identity check included) needs no shard to decide what to do.
    """
    address = plan.represent(spec)
    shards = cfg.represent.shards
    missing = [i for i in range(shards) if not store.is_complete(plan.represent_shard(spec, i))]
    if missing:
        raise RepresentError(f"represent {spec.name}: shards {missing} of {shards} are not complete")
    row_ids = split_table(store, plan.dataset, columns=["id"]).column("id").to_pylist()
    entries, vocab_fp, vocab_size = [], set(), set()
    ran_on: dict[str, list[int]] = {}  # device kind -> shards (an older shard does not say)
    for i in range(shards):
        shard_address = plan.represent_shard(spec, i)
        man = store.require(shard_address)
        if man.meta.get("device"):
            ran_on.setdefault(man.meta["device"], []).append(i)
        meta = store.read_json(shard_address, META_FILE)
        span = shard_rows(len(row_ids), i, shards)
        if meta["row_ids"] != row_ids[span.start:span.stop]:
            raise RepresentError(f"{shard_address}: its rows are not rows {span.start}..{span.stop - 1} "
                                 f"of dataset {plan.dataset}")
        vocab_fp.add(meta["vocab_fingerprint"])
        vocab_size.add(meta["vocab_size"])
        entries.append({"address": shard_address, "digest": man.digest, "size": man.size,
                        **{k: meta[k] for k in ("n_seq", "n_tokens", "n_supervised", "ids_sha256")},
                        "n_cut": len(meta.get("cut_rows", []))})
    if len(vocab_fp) != 1 or len(vocab_size) != 1:
        raise RepresentError(f"represent {spec.name}: shards were made with different tokenizers or models")
    if len(ran_on) > 1:
        # a pod without its GPU (represent.device: auto) ran some on the CPU: other last bits, one address
        where = "; ".join(f"{d}: shards {v[:8]}" for d, v in sorted(ran_on.items()))
        raise RepresentError(f"represent {spec.name}: shards were computed on different devices ({where}); "
                             f"delete the odd ones' artifacts to compute them again where the others ran, or "
                             f"set represent.device")
    meta = {"stage": "represent", "model": spec.name, "dataset": plan.dataset, "top_k": cfg.represent.top_k,
            "vocab_size": vocab_size.pop(), "vocab_fingerprint": vocab_fp.pop(), "shards": entries,
            **{k: sum(e[k] for e in entries) for k in ("n_seq", "n_tokens", "n_supervised", "n_cut")}}
    with store.writer(address, meta=meta) as w:
        w.write_json(SHARDS_FILE, meta)
    return w.manifest  # type: ignore[return-value]


__all__ = [
    "ARRAYS", "META_FILE", "REPRESENTATION_FILE", "RepresentError", "Representation", "collect_shard",
    "commit_representation", "encode_rows", "id_dtype", "length_batches", "map_safetensors", "open_arrays",
    "open_shard", "read_shard", "release_model", "represent_model", "same_tokenization", "shard_rows",
    "tokenization_digest", "tokenizer_of", "vocab_fingerprint", "write_shard",
]
