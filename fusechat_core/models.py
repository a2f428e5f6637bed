"""Loading tokenizers and causal LMs from a hub id, a local folder or a built-in name.

``builtin:NAME`` tokenizers are real vocabularies shipped inside the
``mistral-common`` package (no download): ``mistral-v1`` (the 32,000-token
SentencePiece vocabulary of Mistral-7B, OpenChat-3.5 and Mixtral) and
``mistral-v3`` (32,768). They are materialised once into a local cache folder
and loaded with transformers like any other tokenizer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusechat_core import stopping

_IMPORT_LOCK = threading.Lock()

BUILTIN_TOKENIZERS = {
    "mistral-v1": "tokenizer.model.v1",
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "tekken_240718.json",
}


def cache_dir() -> Path:
    from fusechat_core.store import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


def builtin_tokenizer_dir(name: str) -> Path:
    """A folder ``AutoTokenizer.from_pretrained`` loads, for a built-in vocabulary."""
    import mistral_common

    if name not in BUILTIN_TOKENIZERS:
        raise ValueError(f"unknown built-in tokenizer {name!r} (known: {', '.join(BUILTIN_TOKENIZERS)})")
    src = Path(mistral_common.__file__).parent / "data" / BUILTIN_TOKENIZERS[name]
    folder = cache_dir() / "tokenizers" / name
    marker = folder / "tokenizer_config.json"
    if not marker.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
        if src.suffix == ".json":
            from transformers.integrations.mistral import convert_tekken_tokenizer

            convert_tekken_tokenizer(str(src)).save_pretrained(tmp)
        else:
            shutil.copy(src, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is just as good
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_ref(ref: str) -> str:
    """A reference transformers can load: a local folder path or a hub id."""
    if ref.startswith("builtin:"):
        return str(builtin_tokenizer_dir(ref[len("builtin:"):]))
    return ref


# Files of a model folder that say nothing about its tokenizer: weights (too large to hash), cards.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".md")
_HASHED_BYTES = 256 * 2**20
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple, Any] = {}
_FOLDER_KEYS: dict[tuple, tuple] = {}
_SAVED_TOKENIZERS: dict[tuple, dict[str, bytes]] = {}


def _tokenizer_key(resolved: str, revision: str | None) -> tuple:
    """A local folder is known by its small files' bytes: a run's pivot, targets and merges
    carry byte-identical tokenizer files, so each distinct tokenizer is loaded once per
    process (0.3-2 s each, and a run loads a dozen). Anything else by its name."""
    folder = Path(resolved)
    if not folder.is_dir():
        return ("ref", resolved, revision)
    stats = sorted((p.name, p.stat()) for p in folder.iterdir()
                   if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES))
    seen = (resolved, tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats))
    with _TOKENIZERS_LOCK:
        key = _FOLDER_KEYS.get(seen)
    if key is None:  # hashed once per folder (and again if its files change)
        digest = hashlib.sha256()
        for name, size, mtime in seen[1]:
            # no tokenizer file is this large (tekken's is 15 MB): by its size and time, unread
            data = (folder / name).read_bytes() if size <= _HASHED_BYTES else f"{size}:{mtime}".encode()
            digest.update(name.encode() + b"\0" + data + b"\0")
        key = ("files", digest.hexdigest())
        with _TOKENIZERS_LOCK:
            _FOLDER_KEYS[seen] = key
    return key


def tokenizer_identity(ref: str, revision: str | None = None) -> list:
    """What a tokenizer is, for keys that outlive this process: a local folder's (a built-in
    one's, a hub cache's) by its files' bytes, so one edited in place is a new tokenizer;
    anything else by its name and revision."""
    return list(_tokenizer_key(resolve_ref(ref), revision))


def load_tokenizer(ref: str, revision: str | None = None) -> Any:
    """A (cached) tokenizer; treat it as read-only."""
    resolved = resolve_ref(ref)
    key = _tokenizer_key(resolved, revision)
    with _TOKENIZERS_LOCK:
        tok = _TOKENIZERS.get(key)
    if tok is None:
        warm_imports()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolved, revision=revision)
        with _TOKENIZERS_LOCK:
            tok = _TOKENIZERS.setdefault(key, tok)
    return tok


def tokenizer_ref(spec: Any) -> tuple[str, str | None]:
    """(reference, revision) of a ModelSpec's tokenizer."""
    return (spec.tokenizer or spec.path), spec.revision


def tokenizer_of(spec: Any) -> Any:
    """A ModelSpec's tokenizer; a built (``demo:NAME``) model without its own ``tokenizer``
    reference uses the one saved in its folder."""
    ref, revision = tokenizer_ref(spec)
    if ref.startswith("demo:"):
        ref = model_dir(spec)
    return load_tokenizer(ref, revision)


def formatter_for(spec: Any) -> Any:
    """How a ModelSpec renders conversations, the one rule every stage uses (pre-training a
    demo model, representations, alignment): a model scored in a template it was not
    trained on looks far worse than it is, and MinCE would then never pick it."""
    from fusechat_core.chat import ChatFormatter

    return ChatFormatter(tokenizer_of(spec), spec.chat_template)


def tokenizer_files(ref: str, revision: str | None = None, template: str | None = None) -> dict[str, bytes]:
    """A tokenizer's files, to save beside model weights (built, trained or merged): name → bytes.

    They carry the chat template ``ChatFormatter`` renders with for it, and not how this
    process happened to load it (``local_files_only`` under HF_HUB_OFFLINE): the saved
    files are the same bytes wherever they are made. They come from a fresh copy (the
    cached tokenizers are shared and must not be mutated), made once per tokenizer and
    template in a process: later folders get the same bytes.
    """
    resolved = resolve_ref(ref)
    key = (_tokenizer_key(resolved, revision), template)
    with _TOKENIZERS_LOCK:
        files = _SAVED_TOKENIZERS.get(key)
    if files is None:
        warm_imports()
        from transformers import AutoTokenizer

        from fusechat_core.chat import ChatFormatter

        tok = AutoTokenizer.from_pretrained(resolved, revision=revision)
        tok.chat_template = ChatFormatter(tok, template).template
        tok.init_kwargs.pop("local_files_only", None)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            tok.save_pretrained(tmp)
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        with _TOKENIZERS_LOCK:
            files = _SAVED_TOKENIZERS.setdefault(key, files)
    return files


def write_files(files: dict[str, bytes], out: str | Path) -> None:
    """Write ``tokenizer_files`` into a model folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)


class ModelLoadError(RuntimeError):
    """A causal LM that cannot be loaded; the message is one line naming the model."""


# Folders of models that a stage of this run built (the demo's ``demo:NAME``
# models), registered by ``fusechat_core.demo.materialise`` before loading.
_BUILT_MODELS: dict[str, str] = {}


def register_built_model(ref: str, folder: str) -> None:
    _BUILT_MODELS[ref] = folder


def model_dir(spec: Any) -> str:
    """What ``from_pretrained`` loads for a ModelSpec: a local folder or a hub id."""
    if spec.path.startswith("demo:"):
        if spec.path not in _BUILT_MODELS:
            raise ModelLoadError(f"model {spec.name!r}: {spec.path!r} is built by the demo_models stage, "
                                 f"which has not run (or was not materialised) in this process")
        return _BUILT_MODELS[spec.path]
    return resolve_ref(spec.path)


def pick_device(device: str = "auto") -> str:
    """``cuda`` when a GPU is visible and ``auto`` is asked for, else ``cpu``; an explicit
    ``cuda`` without a GPU is an error, not a silent week on the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but no CUDA device is visible")
    return device


# GPUs of this process handed to model-holding work (a represent shard, an evaluation) by
# ``claim_gpu``: the indices held now.
_GPU_CLAIMS: set[int] = set()
_GPU_FREED = threading.Condition()


@contextmanager
def claim_gpu(device: str, count: int | None = None, *, spread: bool = False) -> Iterator[str]:
    """The device one model-holding task runs on, for the block: ``cuda`` becomes a visible GPU
    no other task of this process holds (the lowest such index), waiting for one to be freed
    when every one is held. So the thread runner's tasks under a GPU slot limit of 8 spread
    over an 8-GPU node instead of all loading onto ``cuda:0``, and a pod with one GPU runs one
    model at a time however many threads it has (the GPU tag's limit is the cluster's, not
    the pod's: four 7B models loaded at once onto one GPU before). Any other device (``cpu``,
    an explicit ``cuda:3``) is kept as given; a process with one GPU gets ``cuda``.
    ``count``: the number of visible GPUs (default: torch's). A Dask worker holds its own
    claims: give each worker its own GPUs (dask-cuda's ``CUDA_VISIBLE_DEVICES`` per worker).
    ``spread``: a model with a ``device_map`` (over every GPU: Mixtral's 94 GB) claims them all,
    waiting until none is held, and keeps ``cuda``: its tasks take turns with one copy, and no
    other model is loaded beside it (it ran beside the single-GPU models before)."""
    if device != "cuda":
        yield device
        return
    if count is None:
        import torch

        count = torch.cuda.device_count()
    count = max(count, 1)

    def free() -> list[int]:
        return [i for i in range(count) if i not in _GPU_CLAIMS]

    with _GPU_FREED:
        if len(free()) < (count if spread else 1):
            logging.getLogger("fusechat").info("waiting for %s of this process's %d GPUs: held by its other "
                                               "models", "all" if spread else "one", count)
        while len(free()) < (count if spread else 1):
            _GPU_FREED.wait(timeout=5.0)
            stopping.check()  # a run told to stop does not wait on
        taken = free() if spread else free()[:1]
        _GPU_CLAIMS.update(taken)
    try:
        yield device if spread or count == 1 else f"cuda:{taken[0]}"
    finally:
        with _GPU_FREED:
            _GPU_CLAIMS.difference_update(taken)
            _GPU_FREED.notify_all()


def resolve_mixed_precision(value: str) -> str:
    """``train.mixed_precision`` as training runs it: ``auto`` is ``bf16`` where a CUDA GPU
    with bf16 is visible to this process, else ``no`` (CPU autocast in bf16 is slower than
    fp32 and changes results); any other value is itself. The plan puts the resolved value
    into the target's address (``RunPlan.train``), so the address says what ran."""
    return _auto_mixed_precision() if value == "auto" else value


@lru_cache(maxsize=1)
def _auto_mixed_precision() -> str:
    if not _gpu_possible():
        return "no"
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


# What exists on a Linux host where a CUDA (NVIDIA driver) or ROCm (/dev/kfd) GPU can be seen.
GPU_DEVICE_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/gpus", "/dev/kfd")


def _gpu_possible() -> bool:
    """Whether torch could see a CUDA (or ROCm) GPU here, decided without importing torch: the
    plan resolves ``auto`` on every start, and a cached rerun on a CPU machine must not pay
    seconds for torch. No device nodes, no driver, or CUDA_VISIBLE_DEVICES empty: no GPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    if sys.platform == "darwin":
        return False
    if sys.platform != "linux":
        return True  # no cheap test: ask torch
    return any(Path(p).exists() for p in GPU_DEVICE_PATHS)


def torch_dtype(dtype: str, device: str) -> Any:
    """The dtype a model computes in: ``auto`` keeps the checkpoint's own on a GPU (bf16 for
    7B chat models); on the CPU half precision is slow and imprecise, so float32."""
    import torch

    if dtype == "auto":
        return "auto" if not device.startswith("cpu") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


def load_causal_lm(spec: Any, device: str = "auto", dtype: str | None = None) -> Any:
    """A ModelSpec's causal LM (hub id or local folder, any ``AutoModelForCausalLM``
    architecture) in eval mode on ``device``; ``dtype`` overrides ``spec.dtype``."""
    warm_imports()
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    # ``device_map``: the model spread over every visible GPU (its inputs go to the first)
    spread = getattr(spec, "device_map", None) if device.startswith("cuda") else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir(spec), revision=spec.revision, dtype=torch_dtype(dtype or spec.dtype, device),
            trust_remote_code=spec.trust_remote_code, **({"device_map": spread} if spread else {}))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {spec.name!r}: cannot load {spec.path}: {first}") from exc
    return (model if spread else model.to(device)).eval()


def release_memory(*dropped: weakref.ref) -> None:
    """Hand back the memory of models just dropped, before the next one loads.

    A transformers model has no reference cycles: it is freed the moment its last name
    goes. A full ``gc.collect()`` helps only when one of ``dropped`` (weak references taken
    before the drop) is still alive, and it costs 0.3-0.7 s in a process that holds torch,
    transformers and Prefect: eight evaluations of a tiny run spent 6 of its 35 CPU seconds
    there. On CUDA it always runs (the allocator's cache only shrinks once every tensor is
    gone, and a second at 7B is nothing), then the cache is emptied.
    """
    on_cuda = False
    if "torch" in sys.modules:
        import torch

        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if on_cuda or any(ref() is not None for ref in dropped):
        gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()


def warm_imports() -> None:
    """Resolve transformers' lazy imports once, one thread at a time.

    transformers resolves ``AutoModelForCausalLM`` and friends lazily; two worker
    threads doing it at the same moment can see a half-initialised module and fail
    with an ImportError. Every loader here calls this first; it costs nothing after
    the first call, and a run whose stages are all cached never pays for it.
    """
    with _IMPORT_LOCK, collection_paused():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while importing torch, transformers or mergekit.

    Their imports allocate millions of objects that live as long as the process, and each
    few hundred thousand set off a full collection that walks all of them again: importing
    transformers on top of torch takes 8 CPU seconds with the collector on, 5.5 with it
    paused, and every run, training subprocess and evaluation process pays it. Only the
    collector's timing changes; objects are freed by their reference counts as before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
