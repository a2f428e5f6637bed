"""Checks that need the registries, run before any work: a bad merge parameter
or an unknown fusion function fails in the first second, not after a week of
training. Errors are ``ConfigError`` lines naming the field, like the config's own.

The registries import torch and mergekit (seconds). A check guards the stages it is
about, so it runs only while one of them is still to be made and this invocation runs
it (``until``): the rerun of a finished run imports neither, nor does a run that stops
before training (``--until represent``) or ``status``, which makes nothing. The fields
checked are part of those stages' addresses, so a changed field always means an
unfinished stage, and the check runs.

``check_config`` holds the checks that need no registry import and no store: names that
must be known or unique, folders that must hold a model, URLs that must be URLs. They
all run, always, in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from fusechat_core.config import ConfigError, ModelSpec, RunConfig

# Files one of which a folder holds when transformers can load a tokenizer from it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")


def _model_field(i: int) -> str:
    return "pivot" if i == 0 else f"sources[{i - 1}]"


def http_url_problem(value: str) -> str | None:
    """Why ``value`` is not an http(s) URL with a host (None: it is one). The URL itself is
    not repeated: one that does not parse may hold a key where its port or host should be,
    and this message reaches logs and the Prefect database."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return "not a valid URL (its host or port cannot be read)"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        return f"not an http(s) URL (scheme {parts.scheme or 'none'!r})" if parts.scheme not in ("http", "https") \
            else "not an http(s) URL with a host"
    return None


def _local_folder(ref: str) -> Path | None:
    """The folder a resolved model/tokenizer reference names, or None for a hub id or a scheme."""
    if ref.startswith(("builtin:", "demo:")) or not ref.startswith("/"):
        return None
    return Path(ref)


def _check_model(field: str, spec: ModelSpec) -> None:
    from fusechat_core.models import BUILTIN_TOKENIZERS

    if spec.path.startswith("builtin:"):
        raise ConfigError(f"{field}.path: builtin: names a tokenizer, not a model")
    tok_field, tok_ref = (f"{field}.tokenizer", spec.tokenizer) if spec.tokenizer else (f"{field}.path", spec.path)
    if tok_ref.startswith("builtin:") and tok_ref[len("builtin:"):] not in BUILTIN_TOKENIZERS:
        raise ConfigError(f"{tok_field}: unknown built-in tokenizer {tok_ref!r} "
                          f"(known: {', '.join('builtin:' + n for n in BUILTIN_TOKENIZERS)})")
    folder = _local_folder(spec.path)
    if folder is not None:  # a model folder: a config transformers can read (weights are not opened)
        config = folder / "config.json"
        if not config.is_file():
            raise ConfigError(f"{field}.path: {folder} holds no config.json (not a model folder)")
        try:
            loaded = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{field}.path: {config} is not readable JSON ({type(exc).__name__})") from None
        if not isinstance(loaded, dict) or "model_type" not in loaded:
            raise ConfigError(f"{field}.path: {config} names no model_type")
    tok_folder = _local_folder(tok_ref)
    if tok_folder is not None and not any((tok_folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(f"{tok_field}: {tok_folder} holds no tokenizer "
                          f"(none of {', '.join(_TOKENIZER_FILES)})")
    if spec.chat_template is not None:
        from fusechat_core.chat import TEMPLATES

        if spec.chat_template not in TEMPLATES:
            raise ConfigError(f"{field}.chat_template: unknown {spec.chat_template!r} "
                              f"(known: {', '.join(TEMPLATES.names())})")


def _identity(spec: ModelSpec) -> tuple:
    return spec.path, spec.revision, spec.tokenizer or spec.path


def check_config(cfg: RunConfig) -> None:
    """Every check that needs neither a registry of torch/mergekit nor the store (see module doc)."""
    seen: dict[tuple, str] = {}
    for i, spec in enumerate(cfg.models):
        field = _model_field(i)
        _check_model(field, spec)
        other = seen.setdefault(_identity(spec), spec.name)
        if other != spec.name:
            raise ConfigError(f"{field}.path: the same model and tokenizer as {other!r}, under another name")

    from fusechat_core.data.build import LOADERS, DataError, _local_files  # with every loader registered
    from fusechat_core.data.presets import sources_of

    preset = len(sources_of(cfg.data)) - len(cfg.data.sources)
    labels: dict[str, str] = {}
    for i, src in enumerate(sources_of(cfg.data)):
        field = "data.preset" if i < preset else f"data.sources[{i - preset}]"
        if src.format != "auto" and src.format not in LOADERS:
            raise ConfigError(f"{field}.format: unknown format {src.format!r} "
                              f"(known: auto, {', '.join(LOADERS.names())})")
        if src.label in labels:
            raise ConfigError(f"{field}.name: duplicate source name {src.label!r} "
                              f"(also {labels[src.label]}); give each source its own name")
        labels[src.label] = field
        if src.local:
            try:  # the dataset stage's own rule for which files a local source reads
                _local_files(Path(src.path), src.data_files, src.split)
            except DataError as exc:
                raise ConfigError(f"{field}.{getattr(exc, 'field', 'path')}: {exc}") from None

    ev = cfg.evaluate
    if problem := http_url_problem(ev.judge_base_url):
        raise ConfigError(f"evaluate.judge_base_url: {problem}")
    if ev.mt_bench_data is not None and ev.mt_bench_data != "fastchat":
        loc = ev.mt_bench_data
        if loc.startswith(("http://", "https://")):
            if problem := http_url_problem(loc):
                raise ConfigError(f"evaluate.mt_bench_data: {problem}")
        elif "://" in loc and not loc.startswith("file://"):
            raise ConfigError(f"evaluate.mt_bench_data: {loc!r}: give a folder, an http(s) URL or 'fastchat'")
        elif not Path(loc.removeprefix("file://")).expanduser().is_dir():
            raise ConfigError(f"evaluate.mt_bench_data: no such folder: {loc}")
    if ev.models:
        from fusechat_core.plan import RunPlan

        plan = RunPlan(cfg)
        known = [m.name for m in cfg.models] + [plan.target_label(t) for t in plan.target_names()]
        known += [f"merge-{m}" for m in plan.merge_methods()]
        for i, name in enumerate(ev.models):
            if name not in known:
                raise ConfigError(f"evaluate.models[{i}]: unknown model {name!r} (known: {', '.join(known)})")


def _check_processes(cfg: RunConfig) -> None:
    """The global batch splits evenly over accelerate's processes: found now, not when
    training starts, after the dataset, representations and alignments."""
    import yaml

    t = cfg.train
    path = Path(t.accelerate_config).expanduser()  # type: ignore[arg-type]
    if not path.is_file():
        raise ConfigError(f"train.accelerate_config: no such file: {t.accelerate_config}")
    try:
        launch = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        n = int(launch.get("num_processes", 1)) if isinstance(launch, dict) else None
    except (yaml.YAMLError, UnicodeDecodeError, OSError, TypeError, ValueError):
        n = None
    if n is None or n < 1:
        raise ConfigError(f"train.accelerate_config: {path}: not an accelerate config with a whole num_processes")
    machines = launch.get("num_machines", 1) if isinstance(launch, dict) else 1
    if machines not in (None, 1):
        # the main process stages each checkpoint on its own node and uploads that folder: the
        # other nodes' ranks' files (FSDP shards, RNG states) would never reach the store, and
        # the checkpoint would read as complete without them
        raise ConfigError(f"train.accelerate_config: num_machines {machines} in {path}: one target trains on one "
                          f"node (its checkpoints are staged on the main process's node); give each target a "
                          f"node of its own")
    if t.batch_size % (t.micro_batch_size * n):
        raise ConfigError(f"train.batch_size: {t.batch_size} is not a multiple of micro_batch_size "
                          f"{t.micro_batch_size} × {n} processes (num_processes in {path})")


def _to_make(cfg: RunConfig, addresses: list[str]) -> bool:
    """Whether any of these artifacts is not complete in the run's store (unknown: yes)."""
    from fusechat_core.store import ArtifactStore

    try:
        store = ArtifactStore(cfg.store)
        return not all(store.is_complete(a) for a in addresses)
    except Exception:  # an unreachable store is reported by whoever needs it; check anyway
        return True


def preflight(cfg: RunConfig, until: str | None = "report") -> None:
    """Everything checkable before a stage runs; ``ConfigError``, one line naming the field.

    ``until``: the last stage this invocation runs (``None``: none, as for ``status``); the
    registry checks of later stages wait for the invocation that runs them.
    """
    from fusechat_core.models import collection_paused
    from fusechat_core.plan import RunPlan
    from fusechat_core.stages import PIPELINE_STAGES

    check_config(cfg)

    last = -1 if until is None else PIPELINE_STAGES.index(until)

    def runs(stage: str) -> bool:
        return PIPELINE_STAGES.index(stage) <= last

    plan = RunPlan(cfg)
    if runs("train") and _to_make(cfg, [plan.train(t) for t in plan.target_names()]):
        # only where training is still to run: `status`, or a run whose targets are done, may
        # be on a machine without the GPU node's accelerate file
        if cfg.train.accelerate_config is not None:
            _check_processes(cfg)
        with collection_paused():
            from fusechat_core.fuse import FUSION_FUNCTIONS

        if cfg.train.fusion_function not in FUSION_FUNCTIONS:
            raise ConfigError(f"train.fusion_function: unknown {cfg.train.fusion_function!r} "
                              f"(known: {', '.join(FUSION_FUNCTIONS.names())})")
    if runs("merge") and _to_make(cfg, [plan.merge(m) for m in plan.merge_methods()]):
        with collection_paused():
            from fusechat_core.merge.translate import MergeError, check_merge_config

        try:
            check_merge_config(cfg.merge, [s.name for s in cfg.sources])
        except MergeError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
