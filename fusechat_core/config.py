"""One config model for a whole fusion run.

Every stage reads its own section; the section (plus upstream addresses and
the stage version) is what the stage's artifact address is derived from, so a
field that changes a stage's output must live in that stage's section.

Secrets never live here: store credentials and judge API keys come from the
environment (see ``store.py`` and ``evaluate``), so a config file, a flow
parameter and the Prefect database never hold one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_STORE = "file://./fusechat-artifacts"

# A hub id: "name" or "org/name", letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Non-file references resolved by our own loaders: built-in tokenizers shipped
# with mistral-common, and models produced by the demo stage.
_SCHEMES = ("builtin:", "demo:")


def demo_name(ref: str) -> str | None:
    """The demo model or synthetic domain a ``demo:NAME`` reference names; None for any
    other reference (a folder, a hub id, ``builtin:``)."""
    return ref[len("demo:"):] if ref.startswith("demo:") else None


class ConfigError(ValueError):
    """A bad config: ``str(err)`` is one line naming the field and the problem."""


# The largest float32: a learning rate above it is inf inside the optimizer (torch's AdamW
# then fails with a raw overflow error after loading the model).
FLOAT32_MAX = 3.4028234663852886e38


def _float32_rate(value: float) -> float:
    if value > FLOAT32_MAX:
        raise ValueError(f"{value:g} cannot be represented in float32 (at most {FLOAT32_MAX:.4g}), the precision "
                         f"the optimizer works in")
    return value


def _optional_float32_rate(value: float | None) -> float | None:
    return None if value is None else _float32_rate(value)


class _Section(BaseModel):
    # No setting means anything as NaN or infinity (`learning_rate: .inf` trained to NaN).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_model_ref(value: str, *, base_dir: Path | None) -> str:
    """A model/tokenizer reference is a local folder, a hub id or a scheme."""
    if value.startswith(_SCHEMES):
        return value
    if value.startswith("file://"):
        value = value[len("file://"):]
    looks_local = value.startswith(("/", "./", "../", "~")) or value in (".", "..")
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        return str(path.resolve())
    if looks_local or path.exists():
        raise ValueError(f"no such directory: {value}")
    if not _HUB_ID.match(value):
        raise ValueError("neither a local directory nor a hub id")
    return value


class ModelSpec(_Section):
    """The pivot or one source model."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,39}$")
    path: str
    revision: str | None = None
    tokenizer: str | None = None  # defaults to ``path``
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = None  # a registered template name; None: the tokenizer's own
    trust_remote_code: bool = False
    # Spread the model over every visible GPU (transformers' ``device_map``), for a model
    # bigger than one GPU (Mixtral 8x7B in bf16: ~94 GB). Where it sits is not what it is:
    # not part of any address. Ignored on the CPU.
    device_map: Literal["auto", "balanced", "sequential"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_paths(cls, data: Any, info: Any) -> Any:
        if isinstance(data, dict):
            base = (info.context or {}).get("base_dir") if info.context else None
            data = dict(data)
            for key in ("path", "tokenizer"):
                if isinstance(data.get(key), str):
                    try:
                        data[key] = _check_model_ref(data[key], base_dir=base)
                    except ValueError as exc:
                        raise _FieldError(key, str(exc)) from None
        return data


class DataSourceSpec(_Section):
    """One dataset of the mixture."""

    name: str | None = None  # defaults to the path's last component
    path: str  # hub id, or a local .json/.jsonl/.parquet file or folder
    format: str = "auto"  # a registered loader name
    count: int | None = Field(default=None, ge=1)  # None: all rows
    # Pinning (all part of the dataset address): which files of the hub repository (or,
    # for a local folder, glob patterns inside it), which split, which config, which commit.
    data_files: str | list[str] | None = None
    split: str = "train"
    subset: str | None = None  # the hub dataset's config name
    revision: str | None = None  # a commit hash, tag or branch of the hub repository
    # The share of rows a source may lose as malformed before the dataset stage fails.
    max_skipped_fraction: float = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _resolve_path(cls, data: Any, info: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            base = (info.context or {}).get("base_dir") if info.context else None
            value = data["path"]
            if value.startswith(_SCHEMES):
                return data
            if info.context and info.context.get("hub_ids"):
                # a preset names hub repositories: a folder that happens to have the same
                # name under the current directory is not them
                if not _HUB_ID.match(value):
                    raise _FieldError("path", "not a hub id")
                return data
            path = Path(value).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).suffix in (
                ".json", ".jsonl", ".parquet")
            if path.exists():
                data = {**data, "path": str(path.resolve())}
            elif looks_local:
                raise _FieldError("path", f"no such file: {value}")
            elif not _HUB_ID.match(value):
                raise _FieldError("path", "neither a local file nor a hub id")
        return data

    @model_validator(mode="after")
    def _pins_fit_the_path(self) -> DataSourceSpec:
        # A local path is absolute once validated; a hub id never is. A pin that does not
        # apply to a local file would enter the dataset's address and change nothing read.
        if not Path(self.path).is_absolute():
            return self
        for key in ("subset", "revision"):
            if getattr(self, key) is not None:
                raise _FieldError(key, f"{self.path} is a local path: {key} pins a hub repository")
        if Path(self.path).is_file() and self.split != "train":
            raise _FieldError("split", f"{self.path} is one file, which has no splits (give its folder, "
                                       f"or data_files)")
        return self

    @property
    def local(self) -> bool:
        """Read from a local file or folder (else from the Hugging Face Hub)."""
        return demo_name(self.path) is None and Path(self.path).is_absolute()

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem.split("/")[-1]


class DataConfig(_Section):
    preset: Literal["fusechat-mixture", "fusechat-mixture-released"] | None = None
    sources: list[DataSourceSpec] = Field(default_factory=list)
    # "vicuna": drop non-English and special-character-dominated conversations (the paper's step)
    clean: Literal["vicuna"] | None = None
    max_length: int = Field(default=2048, ge=16)
    heldout_fraction: float = Field(default=0.02, ge=0.0, lt=1.0)
    heldout_max: int | None = Field(default=1000, ge=0)
    dedupe: bool = True
    template_overhead: int = Field(default=8, ge=0)  # tokens a chat template adds per turn

    @model_validator(mode="after")
    def _needs_sources(self) -> DataConfig:
        if self.preset is None and not self.sources:
            raise ValueError("give a preset or at least one entry in sources")
        return self


class RepresentConfig(_Section):
    top_k: int = Field(default=10, ge=1, le=256)
    batch_size: int = Field(default=8, ge=1)
    # A budget of padded tokens per forward pass (sequences × longest length), used instead
    # of batch_size when set: memory is bounded by tokens, so one budget fits a GPU's memory
    # for short and long sequences alike (many short ones, few long ones per batch).
    batch_tokens: int | None = Field(default=None, ge=16)
    max_length: int = Field(default=2048, ge=16)
    shards: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_sequence_fits(self) -> RepresentConfig:
        if self.batch_tokens is not None and self.batch_tokens < self.max_length:
            raise _FieldError("batch_tokens", f"{self.batch_tokens} is less than max_length {self.max_length}: "
                                              f"a sequence of max_length tokens would fit no batch")
        return self


class AlignConfig(_Section):
    method: Literal["auto", "offsets", "dtw", "dtw-banded"] = "auto"
    # mined: exact, else minimum edit distance (the paper); prefix: exact, else the pivot
    # tokenizer's first piece of the token's text, else MinED; exact: exact or nothing
    vocab_mapping: Literal["mined", "exact", "prefix"] = "mined"
    mined_threshold: float | None = None  # max normalised edit distance; None: no limit


# Every name S3 ever allowed: today's (3-63 lowercase letters, digits, dots, hyphens) and the
# legacy us-east-1 ones (up to 255, uppercase and "_" too), which still exist and still work.
_S3_BUCKET = re.compile(r"[A-Za-z0-9._\-]{3,255}")


def s3_bucket_problem(url: str) -> str | None:
    """Why the bucket of an ``s3://`` URL is not an S3 bucket name (None: it is one). Never
    echoes the URL: the usual bad bucket is credentials pasted in front of it (``key:secret@``,
    where a secret holding ``/`` hides the ``@`` from a simpler check): a ``:`` or ``@`` is in
    no bucket name, legacy ones included."""
    bucket = url[len("s3://"):].split("/", 1)[0]
    if _S3_BUCKET.fullmatch(bucket):
        return None
    return ("s3 URL: the bucket is not an S3 bucket name (3-255 letters, digits, dots, hyphens, underscores); "
            "credentials do not belong in the URL: use AWS_* variables")


class TrainConfig(_Section):
    fusion_function: str = "mince"
    temperature: float = Field(default=1.0, gt=0)
    # λ of L = λ·L_CLM + (1-λ)·L_fuse. A list is a λ ablation: its first value is the run's
    # (those targets are merged); each further value trains one more target per source on the
    # same data and steps, sharing every upstream artifact (λ = 1 is the CLM baseline itself).
    lam: float | list[float] = 0.9
    learning_rate: float = Field(default=5e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1)  # global batch, in sequences
    micro_batch_size: int = Field(default=2, ge=1)
    max_length: int = Field(default=2048, ge=16)
    grad_clip: float = Field(default=1.0, gt=0)
    # auto: bf16 where the process making the plan sees a CUDA GPU with bf16, else no. The
    # target's address holds the resolved value (RunPlan.train), so an auto run on a GPU and
    # one on the CPU never share an address; a train task on a machine that resolves it
    # otherwise than the plan did is refused: set it explicitly when planning on a machine
    # of another kind than the one that trains (a CPU head, GPU workers).
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)  # newest complete ones kept; older deleted
    # How long a rank waits at a collective (a barrier) before the group gives up. The main
    # process uploads each checkpoint while the others wait at one: at 7B, ~84 GB to S3,
    # longer than NCCL's default 10 minutes at under 140 MB/s, and every rank then died at
    # its first checkpoint, on every retry.
    collective_timeout_s: float = Field(default=4 * 3600.0, gt=0)
    gradient_checkpointing: bool = False  # recompute activations: what lets 7B × 2048 fit
    # An `accelerate config` file (multi-GPU, FSDP): training then runs under
    # `accelerate launch` in a child process; None trains in the task's process.
    accelerate_config: str | None = None
    clm_baseline: bool = False  # also train the λ = 1 "CLM" row of the paper
    seed: int = 42

    _learning_rate_fits = field_validator("learning_rate")(_float32_rate)

    @field_validator("lam")
    @classmethod
    def _lam_in_range(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ValueError("an empty list: give one λ, or several for an ablation")
        for x in values:
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"λ {x} is outside [0, 1]")
        if len(set(values)) != len(values):
            raise ValueError(f"{values}: a λ is listed twice")
        return value

    @property
    def lams(self) -> list[float]:
        """Every λ of the run: the run's own first, then the ablation's."""
        return [float(x) for x in self.lam] if isinstance(self.lam, list) else [float(self.lam)]

    @property
    def run_lam(self) -> float:
        """The λ of the run's own targets (the ones merged)."""
        return self.lams[0]

    @model_validator(mode="after")
    def _micro_divides(self) -> TrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        if len(self.lams) > 1 and not self.clm_baseline:
            raise _FieldError("lam", f"{self.lams}: a λ ablation is measured against the CLM baseline "
                                     "(gap closed, λ = 1): set train.clm_baseline: true")
        return self


class MergeConfig(_Section):
    method: str = "varm"
    methods_extra: list[str] = Field(default_factory=list)  # further merges to compare
    parameters: dict[str, Any] = Field(default_factory=dict)
    # "paper": each baseline with the released FuseChat mergekit configs' parameters
    # (merge/methods.py PAPER_PARAMETERS); None: our defaults. ``parameters`` still win
    # for the main method.
    preset: Literal["paper"] | None = None
    granularity: Literal["matrix", "layer", "model"] = "matrix"
    mergekit_yaml: str | None = None  # a user's own mergekit config, used as given
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Bytes per output safetensors shard: mergekit holds one shard in memory before
    # writing it, so this bounds the merge's resident output, not just file sizes.
    shard_size: int = Field(default=2_000_000_000, ge=1_000_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("method", "methods_extra")
    @classmethod
    def _known_methods(cls, value: Any) -> Any:
        # Checked at load time: a typo must not surface only after days of training.
        from fusechat_core.merge.methods import MERGE_METHODS

        for name in [value] if isinstance(value, str) else value:
            if name not in MERGE_METHODS:
                raise ValueError(f"unknown merge method {name!r} (known: {', '.join(MERGE_METHODS.names())})")
        return value

    @model_validator(mode="before")
    @classmethod
    def _read_mergekit_yaml(cls, data: Any, info: Any) -> Any:
        # A file name is replaced by the file's text, so editing the file changes
        # the merge's address like any other config change.
        if isinstance(data, dict) and isinstance(data.get("mergekit_yaml"), str):
            value = data["mergekit_yaml"]
            if "\n" not in value and value.endswith((".yml", ".yaml")):
                base = (info.context or {}).get("base_dir") if info.context else None
                path = Path(value).expanduser()
                if not path.is_absolute() and base is not None:
                    path = base / path
                if not path.is_file():
                    raise _FieldError("mergekit_yaml", f"no such file: {value}")
                data = {**data, "mergekit_yaml": path.read_text()}
        return data


class EvaluateConfig(_Section):
    mt_bench: bool = False
    judge_model: str = "gpt-4"
    judge_base_url: str = "https://api.openai.com/v1"
    judge_api_key_env: str = "OPENAI_API_KEY"  # the variable's *name*; never the key
    judge_concurrency: int = Field(default=4, ge=1)
    mt_bench_data: str | None = None  # folder or http(s) URL with question.jsonl etc.; None: FastChat's
    max_new_tokens: int = Field(default=1024, ge=1)
    heldout_nll: bool = True
    models: list[str] = Field(default_factory=list)  # empty: every model of the run
    # Held-out sources whose rows have one right answer: greedy answer vs the reference turn.
    exact_match_sources: list[str] = Field(default_factory=lambda: ["arithmetic", "reverse", "facts"])
    exact_match_max_new_tokens: int = Field(default=64, ge=1)
    max_length: int = Field(default=2048, ge=16)  # held-out sequences are cut to this many tokens
    batch_size: int = Field(default=8, ge=1)  # sequences per forward pass / generate call
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Every model is evaluated in this precision (evaluate.loading.load_for_eval says why
    # float32); bfloat16 halves memory and time where the targets' updates are large enough.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0  # sampling seed for the T > 0 MT-Bench categories
    judge_max_tokens: int = Field(default=2048, ge=1)
    # The judge's budget (operational: not part of the evaluation's address). Each request
    # may take judge_timeout_s in all; a server's Retry-After is honoured up to
    # judge_max_retry_after_s; every request still unanswered judge_deadline_s after
    # grading began fails (None: no deadline).
    judge_timeout_s: float = Field(default=120.0, gt=0)
    judge_max_retries: int = Field(default=6, ge=0)
    judge_max_retry_after_s: float = Field(default=60.0, ge=0)
    judge_deadline_s: float | None = Field(default=4 * 3600.0, gt=0)
    judge_max_failures: int = Field(default=0, ge=0)  # judge requests allowed to fail before the stage fails

    @field_validator("judge_base_url", "mt_bench_data")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # The config is a flow parameter (the Prefect database) and these URLs appear in logs
        # and errors: a key in one would be stored and printed. Never echoed here either.
        # user:password@ before the path, or a key, token or signature in the query (a presigned
        # URL): refused without repeating the value
        # (a password may hold "/": "https://user:pa/ss@host" parses as host "user", path "/ss@host")
        if value is not None and (re.search(r"://[^/?#]*@|://[^@/?#]*:[^@?#]*@", value) or re.search(
                r"[?&][^=&#]*(key|token|sig|signature|credential|secret|password)[^=&#]*=", value, re.I)):
            raise ValueError("credentials do not belong in the URL; the judge's key goes in the environment "
                             "variable judge_api_key_env names")
        return value


class RunnerConfig(_Section):
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(default=4, ge=1)
    dask_address: str | None = None
    gpu_concurrency: int = Field(default=1, ge=1)
    # The tag model-holding tasks carry, whose concurrency limit is gpu_concurrency. None
    # for a CPU-only run: there is no GPU to share, and a one-slot limit would only make
    # training and evaluation take turns (each waiting seconds for the freed slot).
    gpu_tag: str | None = "gpu"


class DemoModelSpec(_Section):
    """A tiny model the demo builds and pre-trains itself (``path: demo:NAME``)."""

    arch: Literal["mistral", "mixtral", "llama"]
    hidden: int = Field(default=64, ge=8)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    kv_heads: int = Field(default=2, ge=1)
    intermediate: int = Field(default=128, ge=8)
    domains: dict[str, float]  # pre-training mixture: synthetic domain -> weight
    steps: int = Field(default=200, ge=0)
    # this model's own peak learning rate (``demo.learning_rate`` when unset): a model with a
    # 131k-row head (tekken) spends its first hundred steps at 3e-3 just lifting the few
    # hundred tokens the world uses above the rest
    learning_rate: float | None = Field(default=None, gt=0)

    _learning_rate_fits = field_validator("learning_rate")(_optional_float32_rate)


class DemoConfig(_Section):
    models: dict[str, DemoModelSpec]
    batch_size: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    max_length: int = Field(default=128, ge=16)
    seed: int = 0

    _learning_rate_fits = field_validator("learning_rate")(_float32_rate)


class RunConfig(_Section):
    name: str = Field(default="fusechat", pattern=r"^[A-Za-z0-9][\w.\-]*$")
    store: str = DEFAULT_STORE
    seed: int = 42
    pivot: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataConfig
    represent: RepresentConfig = RepresentConfig()
    align: AlignConfig = AlignConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    runner: RunnerConfig = RunnerConfig()
    demo: DemoConfig | None = None

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if not value.strip() or value.strip() in ("file://", "file:"):  # never silently the working folder
            raise ValueError("empty URL: give a folder, a file:// or an s3:// URL")
        if "://" not in value:
            value = "file://" + value
        scheme = value.split("://", 1)[0]
        if scheme not in ("file", "s3", "memory"):
            raise ValueError(f"unsupported scheme {scheme!r} (use file:// or s3://)")
        if scheme == "s3" and not value[len("s3://"):].strip("/"):
            raise ValueError("s3 URL needs a bucket: s3://bucket/prefix")
        if re.search(r"://[^/]*:[^/]*@", value):
            raise ValueError("credentials do not belong in the store URL; use AWS_* variables")
        if scheme == "s3" and (problem := s3_bucket_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _demo_models_defined(self) -> RunConfig:
        for i, m in enumerate(self.models):
            name = demo_name(m.path)
            if name is not None:
                field = "pivot.path" if i == 0 else f"sources[{i - 1}].path"
                if self.demo is None or name not in self.demo.models:
                    raise _FieldError(field, f"{m.path!r} needs an entry under demo.models")
                if m.tokenizer is None:
                    raise _FieldError(field.replace("path", "tokenizer"), "a demo model needs a tokenizer")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> RunConfig:
        seen = {self.pivot.name}
        for i, m in enumerate(self.models):
            if m.name == "clm" or m.name.startswith(("target-", "merge-")):
                field = "pivot.name" if i == 0 else f"sources[{i - 1}].name"
                raise _FieldError(field, f"{m.name!r} is reserved for the run's own models")
        for i, src in enumerate(self.sources):
            if src.name in seen:
                raise _FieldError(f"sources[{i}].name", f"duplicate model name {src.name!r}")
            seen.add(src.name)
        return self

    @property
    def models(self) -> list[ModelSpec]:
        return [self.pivot, *self.sources]


class _FieldError(ValueError):
    """Raised inside validators to name a sub-field precisely."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = err["msg"]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        loc = f"{loc}.{ctx_err.field}" if loc else ctx_err.field
        msg = ctx_err.message
    else:
        msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required"
    extra = len(exc.errors()) - 1
    more = f" (and {extra} more error{'s' if extra > 1 else ''})" if extra else ""
    return f"{loc or 'config'}: {msg}{more}"


def parse_config(data: Any, *, base_dir: Path | None = None) -> RunConfig:
    """Validate a config mapping; raise ConfigError with one line on failure."""
    if not isinstance(data, dict):
        raise ConfigError("config: must be a mapping at the top level")
    try:
        return RunConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML without anchors or aliases: an alias bomb would expand to gigabytes before
    any check, so the first anchor is refused while the document is read."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise yaml.MarkedYAMLError(problem=f"YAML anchors and aliases are not allowed ({sign}{event.anchor})",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: Any, where: str) -> None:
    """Duplicate keys (else silently the last one wins), named by their path: ``pivot.name``."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, f"{where}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            path = f"{where}.{key}" if where else str(key)
            try:
                if key in seen:
                    raise ConfigError(f"{path}: duplicate key (line {key_node.start_mark.line + 1})")
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor says so
                pass
            _refuse_duplicate_keys(loader, value_node, path)


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML strictly: no anchors or aliases, no duplicate keys. ``ConfigError``, one
    line: the key's path, or ``where`` and the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, "")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or ""
        reason = problem if problem.startswith("YAML anchors") else "not valid YAML"
        raise ConfigError(f"{where}:{line} {reason}") from None
    finally:
        loader.dispose()


def load_config(path: str | Path, *, store: str | None = None) -> RunConfig:
    """Load a YAML run config from a local path or a store URL (``s3://...``).

    Relative paths in a local config are relative to its folder.
    """
    data, base = read_config_data(path)
    if store is not None and isinstance(data, dict):
        data = {**data, "store": store}
    cfg = parse_config(data, base_dir=base)
    return _resolve_local_store(cfg, base or Path.cwd())


def read_config_data(path: str | Path) -> tuple[Any, Path | None]:
    """A config file's YAML, not yet validated, and the folder its relative paths start from
    (None for a URL); ``ConfigError`` in one line naming the file."""
    text_path = str(path)
    remote = "://" in text_path and not text_path.startswith("file://")
    if remote:
        import fsspec

        from fusechat_core.store import s3_storage_options

        opts = s3_storage_options() if text_path.startswith("s3://") else {}
        try:
            with fsspec.open(text_path, "r", **opts) as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise ConfigError(f"{text_path}: no such config file") from None
        except Exception as exc:  # one line: the URL and the reason, never a stack trace
            raise ConfigError(f"{text_path}: cannot read ({type(exc).__name__})") from None
        base = None
    else:
        path = Path(text_path[len("file://"):] if text_path.startswith("file://") else text_path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
        base = path.parent.resolve()
    return load_yaml(raw, text_path), base


def _resolve_local_store(cfg: RunConfig, base: Path) -> RunConfig:
    """A relative file:// store is relative to the working directory, as a user expects."""
    if cfg.store.startswith("file://"):
        local = Path(cfg.store[len("file://"):]).expanduser()
        if not local.is_absolute():
            local = Path.cwd() / local
        return cfg.model_copy(update={"store": "file://" + str(local.resolve())})
    return cfg
