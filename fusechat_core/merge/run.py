"""Run one merge on mergekit's out-of-core engine and finish the model folder.

mergekit loads one tensor at a time from each input's safetensors and writes
shards as they fill, so merging three 7B models needs memory for a few
matrices and one output shard, not for three models. We add what mergekit
does not: the pivot's tokenizer and chat template (the targets were trained
with them), the VaRM weights table, and a model card naming sources and targets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusechat_core.determinism import pin_compute
from fusechat_core.merge import statistics
from fusechat_core.merge.card import model_card, weights_markdown, weights_summary
from fusechat_core.merge.translate import (
    MergeError,
    build_configuration,
    configuration_from_yaml,
    method_spec,
)
from fusechat_core.merge.varm import recording

WEIGHTS_JSON = "varm_weights.json"
WEIGHTS_MD = "varm_weights.md"
_TOKENIZER_EXTRA = ("generation_config.json",)
# mergekit seeds torch's process-wide generator when a merge starts (run_merge's random_seed)
# and the random methods (DARE) draw from it as they go: a second merge starting meanwhile, in
# another thread, would re-seed it mid-merge and change the first one's bytes. One at a time.
_RUN_MERGE = threading.Lock()


def _errors_reading_weights() -> tuple[type[BaseException], ...]:
    """What reading the inputs' weights raises for a bad file: a corrupt safetensors file's
    own error is none of the builtin ones."""
    from safetensors import SafetensorError

    return (ValueError, RuntimeError, KeyError, OSError, SafetensorError)


def _clear(out: Path, created: bool) -> None:
    """Nothing of a failed merge stays to pass for a model: the folder it made, or what it
    wrote into the (empty) folder it was given."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _check_ref(label: str, ref: str) -> str:
    """A local folder must exist and hold a model; anything else is taken as a hub id."""
    p = Path(ref).expanduser()
    looks_local = ref.startswith(("/", "./", "../", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise MergeError(f"{label}: no such directory: {ref}")
        if not (p / "config.json").is_file():
            raise MergeError(f"{label}: {ref} has no config.json (not a Hugging Face model folder)")
        return str(p.resolve())
    return ref


def _same_architecture(pivot: str, targets: Mapping[str, str]) -> None:
    """Targets are fine-tunes of the pivot: same architecture, same shapes (local folders
    are checked here; mergekit checks hub models tensor by tensor)."""
    def arch(ref: str) -> tuple | None:
        cfg = Path(ref) / "config.json"
        if not cfg.is_file():
            return None
        raw = json.loads(cfg.read_text())
        return (tuple(raw.get("architectures") or ()), raw.get("vocab_size"), raw.get("hidden_size"),
                raw.get("num_hidden_layers"))

    want = arch(pivot)
    for name, ref in targets.items():
        got = arch(ref)
        if want is not None and got is not None and got != want:
            raise MergeError(f"target {name}: {ref} is not the pivot's shape (architecture, vocab, hidden, "
                             f"layers {got} vs {want}); targets are fine-tunes of the pivot")


# What a merge reads of a Hub model besides its weights: config, tokenizer, generation config,
# and the weights' index, which names the shards to fetch (a mistralai repository also holds
# consolidated.safetensors, the same 14 GB again in another layout).
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def _on_disk(label: str, ref: str, hub_refs: dict[str, str]) -> str:
    """A Hub model (``id`` or ``id@revision``, as mergekit names it) as its snapshot folder in
    this machine's Hugging Face cache, fetched if need be; a local folder as it is. mergekit
    lists a Hub repository's files on every access, which fails on a node with
    ``HF_HUB_OFFLINE=1`` where the other stages load the same model from the cache. Records
    folder → ref in ``hub_refs``, so what the merge writes names the model, not the folder."""
    if Path(ref).is_absolute():
        return ref
    from huggingface_hub import snapshot_download

    repo, _, revision = ref.partition("@")
    try:
        folder = snapshot_download(repo, revision=revision or None, allow_patterns=_HUB_FILES)
        index = Path(folder) / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        folder = snapshot_download(repo, revision=revision or None, allow_patterns=[*_HUB_FILES, *shards])
        if not any(Path(folder).glob("*.safetensors")):  # an older repository: PyTorch pickles
            folder = snapshot_download(repo, revision=revision or None,
                                       allow_patterns=[*_HUB_FILES, "pytorch_model*.bin"])
    except Exception as exc:  # huggingface_hub's errors name the URL at best, never our input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergeError(f"{label}: {ref}: cannot be read from the Hugging Face Hub or its local cache "
                         f"({type(exc).__name__}: {first})") from exc
    hub_refs[folder] = ref
    return folder


def _named(text: str, hub_refs: Mapping[str, str]) -> str:
    for folder, ref in sorted(hub_refs.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(folder, ref)
    return text


def _local_dir(ref: str) -> Path:
    from mergekit.common import ModelReference

    return Path(ModelReference.parse(ref).local_path())


def merge_models(method: str, pivot: str, targets: Mapping[str, str], out_dir: str | Path, *,
                 parameters: Mapping[str, Any] | None = None, granularity: str = "matrix",
                 dtype: str = "float32", mergekit_yaml: str | None = None,
                 shard_size: int = 2_000_000_000, device: str = "auto", seed: int = 0,
                 tokenizer: tuple[str, str | None] | None = None, chat_template: str | None = None,
                 sources: list[str] | None = None, name: str | None = None,
                 training: Mapping[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None,
                 on_tensor: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Merge ``targets`` (name → folder or hub id), all fine-tunes of ``pivot``, into ``out_dir``.

    ``mergekit_yaml`` (text) replaces the translation from ``method``/``parameters``.
    ``tokenizer``: the pivot's tokenizer reference when it is not in the pivot folder.
    ``training``: how the targets were trained (λ, fusion function, data), for the model card.
    ``on_tensor(done, total)``: called as each output tensor is written.
    Returns a summary: the folder, the mergekit config and, for VaRM, the weights table.
    """
    pin_compute()
    from mergekit.merge import MergeOptions, run_merge

    from fusechat_core.models import pick_device

    say = progress or (lambda _m: None)
    spec = method_spec(method)
    pivot = _check_ref("pivot", pivot)
    targets = {n: _check_ref(f"target {n}", p) for n, p in targets.items()}
    seen = {pivot: "the pivot"}
    for n, p in targets.items():
        if p in seen:
            # mergekit would fold a repeated input into one (or into the base) without a word
            raise MergeError(f"target {n}: {p} is already {seen[p]}")
        seen[p] = f"target {n}"
    hub_refs: dict[str, str] = {}  # snapshot folder -> the Hub model it is
    pivot_ref = pivot
    pivot = _on_disk("pivot", pivot, hub_refs)
    targets = {n: _on_disk(f"target {n}", p, hub_refs) for n, p in targets.items()}
    _same_architecture(pivot, targets)
    # before any tensor is read: a merge that cannot get its tokenizer is refused up front
    pivot_tokenizer = _pivot_tokenizer_files(pivot, tokenizer, chat_template)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"out: {out} is not empty")

    if mergekit_yaml is not None:
        config = configuration_from_yaml(mergekit_yaml, pivot, targets)
        granularity = "matrix"
    else:
        weights = None
        if spec.mergekit_method == "varm" and granularity != "matrix":
            say(f"VaRM: {granularity}-level statistics over {len(targets)} targets")
            try:
                groups = statistics.group_weights(pivot, list(targets.values()), granularity, say)
            except _errors_reading_weights() as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MergeError(f"merge (varm, {granularity} statistics) failed: {first}") from exc
            weights = [statistics.weight_parameter(groups, j) for j in range(len(targets))]
        config = build_configuration(method, pivot, targets, parameters=parameters, dtype=dtype,
                                     target_weights=weights, granularity=granularity)
    config_yaml = config.to_yaml()
    is_varm = config.merge_method == "varm"
    named_yaml = _named(config_yaml, hub_refs)

    options = MergeOptions(device=pick_device(device), out_shard_size=int(shard_size), copy_tokenizer=False,
                           write_model_card=False, quiet=True, random_seed=seed, safe_serialization=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Nothing of a merge that did not finish stays to pass for a model, whatever stopped it
    # (a read error, NaNs, SIGTERM inside the kernel, Ctrl-C): the card is written last.
    try:
        say(f"merging {len(targets)} targets with {config.merge_method} on {options.device}")
        base = str(config.base_model) if config.base_model else ""
        inputs = ([str(m.model) for m in config.models] if config.models
                  else sorted(str(m) for m in config.referenced_models()))
        try:
            with _RUN_MERGE, counting_tensors(on_tensor):
                if is_varm:
                    with recording(base, [i for i in inputs if i != base]) as raw_table:
                        run_merge(config, str(out), options, config_source=config_yaml)
                else:
                    raw_table = None
                    run_merge(config, str(out), options, config_source=config_yaml)
        except _errors_reading_weights() as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MergeError(f"merge ({config.merge_method}) failed: {first}") from exc
        finally:
            _forget_loaders(config)
        named = {"the pivot": pivot, **{f"target {n}": p for n, p in targets.items()}}
        _require_finite(out, config.merge_method, named)  # a model of NaNs must not pass for a merge

        _save_pivot_tokenizer(out, pivot, pivot_tokenizer)
        (out / "mergekit_config.yml").write_text(named_yaml + "\n")

        table = None
        if is_varm:
            by_path = {p: n for n, p in targets.items()}
            names = [by_path.get(i, i) for i in inputs if i != base]
            table = {"method": "varm", "granularity": granularity, "pivot": pivot_ref, "targets": names,
                     "tensors": {k: {key: ({by_path.get(m, m): v for m, v in val.items()}
                                           if isinstance(val, dict) else val)
                                     for key, val in row.items()}
                                 for k, row in sorted(raw_table.items())}}
            if not table["tensors"]:
                raise MergeError("merge (varm): the kernel recorded no weights; nothing was merged by VaRM")
            table["summary"] = weights_summary(table)
            (out / WEIGHTS_JSON).write_text(json.dumps(table, indent=1, sort_keys=True))
            (out / WEIGHTS_MD).write_text(weights_markdown(table))

        # a user's mergekit YAML decides the precision and the parameters: the card says what it ran
        saved_as = dtype if mergekit_yaml is None else \
            str(config.out_dtype or config.dtype or "the inputs' own precision")
        card = model_card(name=name or out.name, method=method if mergekit_yaml is None else config.merge_method,
                          pivot=pivot_ref, targets={n: hub_refs.get(p, p) for n, p in targets.items()},
                          sources=sources, parameters=dict(parameters or {}) if mergekit_yaml is None else {},
                          granularity=granularity, dtype=saved_as, mergekit_yaml=named_yaml, table=table,
                          method_note=spec.note if mergekit_yaml is None else "", training=dict(training or {}))
        (out / "README.md").write_text(card)
    except BaseException:
        _clear(out, created)
        raise
    say(f"merged model in {out}")
    return {"out_dir": str(out), "method": method, "mergekit_method": config.merge_method,
            "mergekit_config": named_yaml, "table": table}


def _require_finite(out: Path, method: str, inputs: Mapping[str, str]) -> None:
    """Every merged tensor is finite; else one line naming the tensor and the inputs it came from
    that are not finite there (a NaN in a target, or one the method made).

    One tensor at a time from the written shards (memory-mapped), as mergekit wrote them.
    """
    import torch
    from safetensors import safe_open

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if not t.is_floating_point():
                    continue
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    culprits = [label for label, ref in inputs.items() if _non_finite_in(ref, key)]
                    where = (f"already not finite in {', '.join(culprits)}" if culprits
                             else "every input is finite there")
                    raise MergeError(f"merge ({method}): tensor {key}: {bad} of {t.numel()} values are NaN/inf "
                                     f"({where}); nothing stored")


def _non_finite_in(ref: str, key: str) -> bool:
    """Whether an input model holds tensor ``key`` with a NaN/inf (False if it cannot be read)."""
    import torch
    from safetensors import safe_open

    try:
        folder = _local_dir(ref)
    except Exception:  # a hub input not in the local cache: not named, never a second failure
        return False
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as st:
            if key in st.keys():
                t = st.get_tensor(key)
                return t.is_floating_point() and not bool(torch.isfinite(t).all())
    return False


# -- tensors written, for progress ----------------------------------------------------------
# mergekit's executor runs its tasks in the calling thread and reports progress only to a
# terminal (tqdm). Its planner's output and its tensor writes are wrapped once, so a merge
# asking for progress (this thread's ``counting_tensors``) hears of each tensor written.
_COUNTER = threading.local()


def _install_counter() -> None:
    from mergekit.io.tasks import FinalizeModel, SaveTensor
    from mergekit.plan import MergePlanner

    if getattr(SaveTensor.execute, "_fusechat_counts", False):
        return
    save, plan = SaveTensor.execute, MergePlanner.plan_to_disk

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = save(self, *args, **kwargs)
        hook = getattr(_COUNTER, "hook", None)
        if hook is not None:
            hook["done"] += 1
            hook["fn"](hook["done"], hook["total"])
        return out

    def plan_to_disk(self: Any, *args: Any, **kwargs: Any) -> Any:
        targets = plan(self, *args, **kwargs)
        hook = getattr(_COUNTER, "hook", None)
        if hook is not None:
            hook["total"] = sum(len(t.tensor_save_tasks) for t in targets if isinstance(t, FinalizeModel))
        return targets

    execute._fusechat_counts = True  # type: ignore[attr-defined]
    SaveTensor.execute, MergePlanner.plan_to_disk = execute, plan_to_disk


@contextlib.contextmanager
def counting_tensors(fn: Callable[[int, int], None] | None) -> Any:
    """While inside, ``fn(done, total)`` after each output tensor this thread's merge writes."""
    if fn is None:
        yield
        return
    _install_counter()
    _COUNTER.hook = {"done": 0, "total": 0, "fn": fn}
    try:
        yield
    finally:
        _COUNTER.hook = None


def _forget_loaders(config: Any) -> None:
    """mergekit caches each model's tensor index for the life of the process (a class-level
    dict); a long-lived worker must not read a later artifact at the same path through
    a stale index, nor keep every merged model's last shard mapped."""
    from mergekit.io.tasks import LoaderCache

    for ref in config.referenced_models():
        LoaderCache.loaders.pop(ref, None)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")
_TOKENIZER_HINT = ("pass the tokenizer it was trained with as --tokenizer REF (a folder, hub id or "
                   "builtin:mistral-v1), or `tokenizer:` in the pivot's config")


def check_pivot_tokenizer(pivot: str, tokenizer: object | None) -> None:
    """A local pivot folder without tokenizer files needs ``tokenizer``: say what to pass."""
    folder = Path(pivot).expanduser()
    if tokenizer is None and folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise MergeError(f"pivot {pivot}: the folder holds no tokenizer; {_TOKENIZER_HINT}")


def _pivot_tokenizer_files(pivot: str, tokenizer: tuple[str, str | None] | None,
                           chat_template: str | None) -> dict[str, bytes]:
    """The pivot's tokenizer files, with the chat template its targets were trained with."""
    from fusechat_core.models import tokenizer_files

    check_pivot_tokenizer(pivot, tokenizer)
    ref, revision = tokenizer or (pivot, None)
    try:
        return tokenizer_files(ref, revision, chat_template)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = f"; {_TOKENIZER_HINT}" if tokenizer is None else ""
        raise MergeError(f"pivot tokenizer {ref}: cannot load: {first}{hint}") from exc


def _save_pivot_tokenizer(out: Path, pivot: str, files: dict[str, bytes]) -> None:
    from fusechat_core.models import write_files

    write_files(files, out)
    try:
        local = _local_dir(pivot)
    except Exception as exc:  # a hub pivot whose extra files cannot be listed: the weights are still right
        logging.getLogger(__name__).warning("pivot %s: generation config not copied (%s)", pivot, exc)
        return
    for fname in _TOKENIZER_EXTRA:
        if (local / fname).is_file():
            shutil.copy(local / fname, out / fname)
