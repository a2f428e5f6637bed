"""What a run costs, stage instance by stage instance: the figures ``fusechat run CFG --plan`` prints.

For every node of ``RunPlan.nodes()`` (the one place addresses come from) and the
state the store gives it (``cached``, ``to run``, ``partial (n of m shards)``):

- **work**: sequences, tokens and supervised tokens the stage reads. Where they come
  from is said in ``basis``, best first:
  ``measured``: the representation's manifests (committed, or the shards done so far,
  scaled to every shard: ``~``); ``dataset``: the dataset artifact in the store, rendered
  with the pivot's chat template and tokenizer exactly as the representation stage does
  (``represent.encode_rows``; counted once per dataset and kept in the local cache folder);
  a source's representation then counts the pivot's tokens (``~``: its own tokenizer may
  need more or fewer); ``bound``: no dataset yet: the sources' ``count``s less the held-out
  share, each sequence ``max_length`` tokens (``≤``: an upper bound on tokens; splitting
  long conversations into blocks can make more sequences than conversations).
- **bytes** it will store, from the real on-disk formats (a cached stage shows what it
  does store): representations ``input_ids`` + ``sup_positions`` + ``topk_ids`` and
  ``topk_logprobs`` [supervised × k] + offsets + ``metric_ce`` + ``meta.json``
  (``represent.py``); aligned shards ``topk_ids`` int32 + ``topk_logprobs`` float16
  [supervised × k] + ``fallback`` + offsets (``align``); a target float32 weights (4·N),
  a merge ``merge.dtype`` weights; the dataset ≤ 4 bytes of text per token.
- **FLOPs** of the GPU stages: ``2·N·tokens`` for a forward pass (represent, held-out
  NLL, MT-Bench answers: 160 turns × ``max_new_tokens``, an upper bound that leaves out
  the prompts), ``6·N·tokens`` for training (``8·N`` with gradient checkpointing, which
  runs every forward twice), tokens = optimizer steps × batch × mean tokens per sequence.
  N counts every parameter a token passes through (a Mixture-of-Experts model's routed
  experts only: ``experts_per_tok`` of ``experts``), embeddings included (~2% over at 7B).
- **GPU-hours** = FLOPs / (``gpu_tflops`` × ``utilisation``) / 3600.

N comes from the model's ``config.json``, counted exactly by building the model on
PyTorch's meta device (no memory, no weights): a local folder's, a demo model's
(``demo.models``), or a hub model's from the local Hugging Face cache only
(``try_to_load_from_cache``). Nothing here touches the network: a hub model whose
config is not cached shows ``?`` and ``fill`` says how to get it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusechat_core.config import ModelSpec, RunConfig, demo_name
from fusechat_core.plan import CLM, Node, RunPlan

# An H100 SXM's dense bf16 tensor throughput (NVIDIA's datasheet: 989 TFLOPS; 1979 is with
# sparsity), and the share of it a well-tuned training or inference job sustains.
H100_BF16_DENSE_TFLOPS = 989.0
DEFAULT_UTILISATION = 0.4

MT_BENCH_TURNS = 160  # 80 questions × 2 turns
GPU_STAGES = ("represent", "train", "mt_bench_answers", "heldout_measures")
# Rows of a published data file whose size its source does not say (``count: null``):
# the paper's 95,000 conversations of FuseChat-Mixture (SPEC §1.1).
PUBLISHED_ROWS = {("FuseAI/FuseChat-Mixture", "fusechat_v1_clean_split_2048_filter_wrong.json"): 95_000}
TEXT_BYTES_PER_TOKEN = 4
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# -- parameters ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSize:
    total: int | None  # every parameter (what a checkpoint stores)
    active: int | None  # what one token passes through (MoE: the routed experts only)
    vocab_size: int | None
    source: str  # where the config came from
    fill: str | None = None  # when unknown: how to make it known


def count_parameters(config: Any) -> tuple[int, int]:
    """(every parameter, per-token parameters) of a transformers config, exactly: the
    model is built on the meta device, so a 47B Mixtral costs no memory."""
    import torch

    from fusechat_core.models import warm_imports

    warm_imports()
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    routed = getattr(config, "num_experts_per_tok", None)
    active = total
    if experts and routed and routed < experts:
        in_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = total - in_experts * (experts - routed) // experts
    return total, active


@lru_cache(maxsize=64)
def _size_of_folder(folder: str, trust_remote_code: bool) -> tuple[int, int, int | None]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return (*count_parameters(config), getattr(config, "vocab_size", None))


@lru_cache(maxsize=64)
def _size_of_demo(arch: str, tokenizer: str, hidden: int, layers: int, heads: int, kv_heads: int,
                  intermediate: int) -> tuple[int, int, int]:
    from fusechat_core.models import load_tokenizer
    from fusechat_core.tiny import tiny_config

    vocab = len(load_tokenizer(tokenizer))  # what build_tiny_model sizes the embedding to
    config = tiny_config(arch, vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,  # type: ignore[arg-type]
                         intermediate=intermediate)
    return (*count_parameters(config), vocab)


def hub_cached_file(repo: str, filename: str, revision: str | None) -> str | None:
    """A hub repository's file in the local Hugging Face cache, or None (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


def hub_config_path(repo: str, revision: str | None) -> str | None:
    """A hub model's config.json in the local Hugging Face cache, or None (no network)."""
    return hub_cached_file(repo, "config.json", revision)


def model_size(cfg: RunConfig, spec: ModelSpec) -> ModelSize:
    """N of a pivot or source model, from its config.json, offline."""
    name = demo_name(spec.path)
    if name is not None:
        d = cfg.demo.models[name] if cfg.demo else None
        if d is None or spec.tokenizer is None:
            return ModelSize(None, None, None, "demo", f"{spec.path}: no demo.models entry")
        total, active, vocab = _size_of_demo(d.arch, spec.tokenizer, d.hidden, d.layers, d.heads, d.kv_heads,
                                             d.intermediate)
        return ModelSize(total, active, vocab, f"demo.models.{spec.path[len('demo:'):]}")
    if Path(spec.path).is_dir():
        folder, where = spec.path, f"{spec.path}/config.json"
    else:
        found = hub_config_path(spec.path, spec.revision)
        if found is None:
            rev = f" --revision {spec.revision}" if spec.revision else ""
            return ModelSize(None, None, None, "hub (not cached)",
                             f"huggingface-cli download {spec.path} config.json{rev}")
        folder, where = str(Path(found).parent), found
    try:
        total, active, vocab = _size_of_folder(folder, spec.trust_remote_code)
    except Exception as exc:  # an architecture transformers cannot build: say so, count nothing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ModelSize(None, None, None, where, f"cannot count {spec.name}'s parameters: {first}")
    return ModelSize(total, active, vocab, where)


# -- sequences and tokens ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Work:
    sequences: int | None
    tokens: int | None
    supervised: int | None
    basis: str  # measured | dataset | bound (see the module's docstring); "~" prefix: estimated

    def scaled(self, tokens_cap: int) -> Work:
        """The same sequences cut to ``tokens_cap`` tokens each (only meaningful for a bound)."""
        if self.sequences is None or self.basis != "bound":
            return self
        t = self.sequences * tokens_cap
        return Work(self.sequences, t, t, "bound")


def _cache_file(key: dict) -> Path:
    from fusechat_core.models import cache_dir

    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "plan-counts" / f"{name}.json"


def _local_tokenizer(spec: ModelSpec) -> bool:
    """True when the pivot's tokenizer loads without the network (built in, a folder, cached)."""
    ref = spec.tokenizer or spec.path
    if ref.startswith("builtin:") or Path(ref).is_dir():
        return True
    if ref.startswith("demo:"):
        return False
    return hub_cached_file(ref, "tokenizer_config.json", spec.revision) is not None


def _count_dataset(plan: RunPlan, store: Any, split: str, caps: tuple[int, ...]) -> dict[int, Work] | None:
    """Tokens of a stored dataset split rendered by the pivot, cut at each cap in ``caps``."""
    from fusechat_core.models import tokenizer_identity

    pivot = plan.cfg.pivot
    if not _local_tokenizer(pivot):
        return None
    ref, revision = pivot.tokenizer or pivot.path, pivot.revision
    if not ref.startswith("builtin:") and not Path(ref).is_dir():  # a hub tokenizer: its cached folder
        ref = str(Path(hub_cached_file(ref, "tokenizer_config.json", revision)).parent)  # type: ignore[arg-type]
        revision = None
    # the tokenizer by its files: counts made with a folder since edited in place are not reused
    key = {"dataset": plan.dataset, "split": split, "tokenizer": tokenizer_identity(ref, revision),
           "template": pivot.chat_template, "caps": list(caps)}
    cached = _cache_file(key)
    if cached.exists():
        return {int(c): Work(*v, "dataset") for c, v in json.loads(cached.read_text()).items()}
    import numpy as np

    from fusechat_core.chat import ChatFormatter
    from fusechat_core.data import read_split
    from fusechat_core.models import load_tokenizer
    from fusechat_core.represent import encode_rows

    # the representation stage's rendering of the pivot (models.formatter_for), from local files only
    formatter = ChatFormatter(load_tokenizer(ref, revision), pivot.chat_template)
    rows = read_split(store, plan.dataset, split)
    encoded = encode_rows(formatter, rows, max(caps))
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    sup = np.concatenate([pos for _, pos in encoded]) if encoded else np.zeros(0, np.int64)
    out = {c: (len(rows), int(np.minimum(lengths, c).sum()), int((sup < c).sum())) for c in caps}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out))
    return {c: Work(*v, "dataset") for c, v in out.items()}


def _config_rows(cfg: RunConfig) -> tuple[int | None, int | None]:
    """(training, held-out) conversations the config asks for; None when a source says not."""
    from fusechat_core.data.presets import sources_of

    train = held = 0
    for s in sources_of(cfg.data):
        files = s.data_files if isinstance(s.data_files, str) else None
        n = s.count or PUBLISHED_ROWS.get((s.path, files))
        if n is None:
            return None, None
        h = int(round(n * cfg.data.heldout_fraction))
        train, held = train + n - h, held + h
    if cfg.data.heldout_max is not None:
        held = min(held, cfg.data.heldout_max)
    return train, held


class Costing:
    """Works out the figures of one plan against one store (reads only manifests and, once, the dataset)."""

    def __init__(self, plan: RunPlan, store: Any, states: dict[str, dict[str, Any]]):
        self.plan, self.cfg, self.store, self.states = plan, plan.cfg, store, states
        self.notes: list[str] = []
        self._sizes: dict[str, ModelSize] = {}

    def size(self, name: str) -> ModelSize:
        """N of a model of the run by its name: a target, the CLM row or a merge is the pivot's shape."""
        spec = next((m for m in self.cfg.models if m.name == name), self.cfg.pivot)
        if spec.name not in self._sizes:
            self._sizes[spec.name] = model_size(self.cfg, spec)
        return self._sizes[spec.name]

    def _dataset_done(self) -> bool:
        return self.states.get("dataset", {}).get("state") == "done"

    def dataset_work(self, split: str, cap: int) -> Work:
        caps = tuple(sorted({self.cfg.represent.max_length, self.cfg.train.max_length, self.cfg.evaluate.max_length,
                             self.cfg.data.max_length}))
        if self._dataset_done():
            try:
                counted = _count_dataset(self.plan, self.store, split, caps)
            except Exception as exc:  # a plan still prints: fall back to the bound, and say why
                self.notes.append(f"dataset tokens not counted ({type(exc).__name__}: {exc}); upper bounds shown")
                counted = None
            if counted is not None:
                return counted[cap]
            stats = self.store.read_json(self.plan.dataset, "stats.json")
            n = int(stats["heldout" if split == "heldout" else "train"])
            return Work(n, n * cap, n * cap, "bound")
        train, held = _config_rows(self.cfg)
        n = train if split == "train" else held
        return Work(n, None if n is None else n * cap, None if n is None else n * cap, "bound")

    def represent_work(self, name: str) -> tuple[Work, int, int]:
        """(work, shards done, shards) of a model's representation."""
        spec = self.plan.model(name)
        shards = self.cfg.represent.shards
        man = self.store.manifest(self.plan.represent(spec)) if self._readable() else None
        if man is not None and "n_tokens" in man.meta:
            m = man.meta
            return Work(m["n_seq"], m["n_tokens"], m["n_supervised"], "measured"), shards, shards
        done = []
        if self._readable():
            for i in range(shards):
                s = self.store.manifest(self.plan.represent_shard(spec, i))
                if s is not None and "n_tokens" in s.meta:
                    done.append(s.meta)
        base = self.dataset_work("train", self.cfg.represent.max_length)
        if name != self.cfg.pivot.name and base.basis == "dataset":
            base = Work(base.sequences, base.tokens, base.supervised, "~dataset")
        if done:
            seqs = sum(d["n_seq"] for d in done)
            total = base.sequences if base.sequences is not None and base.basis != "bound" else None
            if len(done) == shards or total is None or seqs == 0:
                scale = shards / len(done)
                basis = "measured" if len(done) == shards else "~measured"
            else:
                scale, basis = total / seqs, "~measured"
            return Work(round(seqs * scale), round(sum(d["n_tokens"] for d in done) * scale),
                        round(sum(d["n_supervised"] for d in done) * scale), basis), len(done), shards
        return base, 0, shards

    def _readable(self) -> bool:
        return not any(r.get("state") == "unknown" for r in self.states.values())

    # -- bytes, from the formats -----------------------------------------------------------------
    def represent_bytes(self, name: str, w: Work) -> int | None:
        if w.tokens is None or w.sequences is None:
            return None
        vocab = self.size(name).vocab_size
        idb = 2 if vocab is not None and vocab < 65536 else 4  # represent.id_dtype (int32 when unknown)
        posb = 2 if self.cfg.represent.max_length < 65536 else 4  # represent.position_dtype
        k, shards, n, sup = self.cfg.represent.top_k, self.cfg.represent.shards, w.sequences, w.supervised or 0
        arrays = w.tokens * idb + 2 * 8 * (n + shards) + sup * posb + sup * k * (idb + 2) + 4 * n
        return arrays + _fixed(_REPRESENT_FIXED, shards, n)

    def align_bytes(self, w: Work) -> int | None:
        if w.sequences is None or w.supervised is None:
            return None
        k, shards, n, sup = self.cfg.represent.top_k, self.cfg.represent.shards, w.sequences, w.supervised
        arrays = 8 * (n + shards) + sup * k * (4 + 2) + 4 * n + sup
        return arrays + _fixed(_ALIGN_FIXED, shards, n)

    # -- one row ------------------------------------------------------------------------------------
    def row(self, node: Node) -> dict[str, Any]:
        st = self.states.get(node.label, {})
        state, done_shards = _state_word(st.get("state", "missing"), node.shards)
        work, model, passes, extra = Work(None, None, None, ""), None, 0, {}
        bytes_ = None
        pivot = self.cfg.pivot.name
        if node.stage == "demo_models":
            model = node.key
            n = self.size(model).total
            bytes_ = None if n is None else 4 * n
        elif node.stage == "dataset":
            work = self.dataset_work("train", self.cfg.data.max_length)
            bytes_ = None if work.tokens is None else work.tokens * TEXT_BYTES_PER_TOKEN
        elif node.stage == "represent":
            model, passes = node.key, 2
            work, got, _ = self.represent_work(node.key)  # type: ignore[arg-type]
            done_shards = max(done_shards, got) if state != "cached" else node.shards
            bytes_ = self.represent_bytes(node.key, work)  # type: ignore[arg-type]
        elif node.stage == "align":
            work = self.represent_work(pivot)[0]  # aligned rows are the pivot's supervised rows
            bytes_ = self.align_bytes(work)
        elif node.stage == "train":
            model = pivot
            base = self.represent_work(pivot)[0]  # training reads the pivot's representation
            if base.basis == "bound" or base.tokens is None:
                base = base.scaled(min(self.cfg.train.max_length, self.cfg.represent.max_length))
            elif self.cfg.train.max_length < self.cfg.represent.max_length and self._dataset_done():
                base = self.dataset_work("train", self.cfg.train.max_length)
            passes = 8 if self.cfg.train.gradient_checkpointing else 6
            if base.sequences:
                from fusechat_core.train import total_steps

                steps = total_steps(self.cfg.train, base.sequences)
                seen = steps * self.cfg.train.batch_size / base.sequences  # epochs, as trained
                work = Work(steps * self.cfg.train.batch_size, _mul(base.tokens, seen), _mul(base.supervised, seen),
                            base.basis)
                extra = {"steps": steps, "epochs": round(seen, 3)}
            n = self.size(pivot).total
            bytes_ = None if n is None else 4 * n  # float32 master weights (train.py)
        elif node.stage == "merge":
            model = pivot
            n = self.size(pivot).total
            bytes_ = None if n is None else _DTYPE_BYTES.get(self.cfg.merge.dtype, 4) * n
        elif node.stage == "mt_bench_answers":
            model, passes = _evaluated_model(self.plan, node.key), 2  # type: ignore[arg-type]
            t = MT_BENCH_TURNS * self.cfg.evaluate.max_new_tokens
            work = Work(MT_BENCH_TURNS, t, None, "bound")
        elif node.stage == "heldout_measures":
            if self.cfg.evaluate.heldout_nll:  # exact match alone: a few short generations, not counted
                model, passes = _evaluated_model(self.plan, node.key), 2  # type: ignore[arg-type]
                work = self.dataset_work("heldout", self.cfg.evaluate.max_length)
        # stages whose bytes are estimated at all (the small ones: vocab maps, evaluations, the report, not)
        bytes_known = node.stage in ("demo_models", "dataset", "represent", "align", "train", "merge")
        if st.get("size") is not None and state == "cached":
            bytes_ = st["size"]
        size = self.size(model) if model is not None else None
        gpu = node.stage in GPU_STAGES and passes > 0
        flops = None
        if gpu:
            flops = 0 if work.tokens == 0 else _mul(size.active if size else None, (work.tokens or 0) * passes
                                                     if work.tokens is not None else None)
        remaining = 0.0 if state == "cached" else 1.0
        if state.startswith("partial") and node.shards:
            remaining = (node.shards - done_shards) / node.shards
        checkpoint = st.get("checkpoint_step")
        if checkpoint and state != "cached" and extra.get("steps"):
            # a preempted training resumes from its last checkpoint: only the steps after it are to run
            state = f"partial (checkpoint at step {checkpoint} of {extra['steps']})"
            remaining = max(0.0, 1.0 - checkpoint / extra["steps"])
        row = {"stage": node.label, "kind": node.stage, "address": node.address, "state": state,
               "shards": node.shards or None, "shards_done": done_shards if node.shards else None,
               "remaining": remaining, "sequences": work.sequences, "tokens": work.tokens,
               "supervised_tokens": work.supervised, "basis": work.basis or None, "bytes": bytes_,
               "bytes_basis": "stored" if state == "cached" and st.get("size") is not None else "estimate",
               "bytes_known": bytes_known,
               "gpu": gpu, "model": model, "parameters": size.total if size else None,
               "active_parameters": size.active if size else None, "flops": flops, **extra}
        return row


# Parts of the stored files that do not grow with the tokens, measured on a tiny run's artifacts
# (tests/test_plan_cost.py checks the whole estimates against one): per shard, the safetensors
# header naming the arrays, meta.json less its row ids (digests, counts, statistics) and the
# shard's entry in the stage artifact's list; per stage, that list's own keys; per row, its id.
_REPRESENT_FIXED = {"header": 550, "meta": 520, "entry": 350, "stage": 300}
_ALIGN_FIXED = {"header": 360, "meta": 650, "entry": 210, "stage": 200}
_ROW_ID_BYTES = 30  # one row id in a shard's meta.json ("demo:markov-000004-0", indented)


def _fixed(parts: dict[str, int], shards: int, rows: int) -> int:
    return shards * (parts["header"] + parts["meta"] + parts["entry"]) + parts["stage"] + rows * _ROW_ID_BYTES


def _mul(a: float | None, b: float | None) -> int | None:
    return None if a is None or b is None else round(a * b)


def _evaluated_model(plan: RunPlan, name: str) -> str:
    """Which model's shape an evaluated name has: targets, CLM and merges are the pivot's."""
    if name == CLM or name.startswith(("target-", "merge-")):
        return plan.cfg.pivot.name
    return name


def _state_word(status: str, shards: int) -> tuple[str, int]:
    """``status_rows``' state in the plan's words: cached / to run / partial (n of m shards)."""
    if status in ("done", "skipped"):  # skipped: what used it is done, nothing will make it
        return "cached", shards
    if "/" in status:
        n = int(status.split("/")[0])
        return f"partial ({n} of {shards} shards)", n
    if status == "unknown":
        return "unknown", 0
    return "to run", 0


def plan_costs(plan: RunPlan, store: Any, states: dict[str, dict[str, Any]], *,
               gpu_tflops: float = H100_BF16_DENSE_TFLOPS, utilisation: float = DEFAULT_UTILISATION) -> dict[str, Any]:
    """The cost view of a plan, as one JSON-ready object:

    ``{"name", "throughput": {"gpu_tflops", "utilisation", "effective_tflops"},
    "stages": [row, ...], "totals": {"to_run": T, "all": T}, "models": {name: {...}},
    "notes": [...]}``; a row: ``stage`` (label), ``kind``, ``address``, ``state`` (``cached``
    / ``to run`` / ``partial (n of m shards)`` / ``unknown``), ``shards``, ``shards_done``,
    ``remaining`` (share of the work still to do), ``sequences``, ``tokens``,
    ``supervised_tokens``, ``basis`` (``measured`` / ``dataset`` / ``bound``; ``~``: estimated),
    ``bytes``, ``bytes_basis`` (``stored`` / ``estimate``), ``gpu``, ``model``, ``parameters``,
    ``active_parameters``, ``flops``, ``gpu_hours`` (null: unknown); train rows add ``steps``,
    ``epochs``. T: ``{"flops", "gpu_hours", "bytes", "unknown": [GPU stages whose FLOPs are
    unknown], "bytes_unknown": [stages whose bytes are]}``, over the remaining share of each row
    (``to_run``) or all of it (``all``).
    ``states``: ``{label: status row}`` as ``fusechat status`` gives them.
    """
    costing = Costing(plan, store, states)
    rate = gpu_tflops * 1e12 * utilisation
    rows = []
    for node in plan.nodes():
        row = costing.row(node)
        row["gpu_hours"] = None if row["flops"] is None else row["flops"] / rate / 3600
        rows.append(row)
    totals = {}
    for which in ("to_run", "all"):
        t: dict[str, Any] = {"flops": 0.0, "gpu_hours": 0.0, "bytes": 0, "unknown": [], "bytes_unknown": []}
        for r in rows:
            share = r["remaining"] if which == "to_run" else 1.0
            if share == 0:
                continue
            if r["gpu"]:
                if r["flops"] is None:
                    t["unknown"].append(r["stage"])
                else:
                    t["flops"] += r["flops"] * share
                    t["gpu_hours"] += r["gpu_hours"] * share
            if r["bytes"] is not None:
                t["bytes"] += round(r["bytes"] * share)
            elif r["bytes_known"]:
                t["bytes_unknown"].append(r["stage"])
        totals[which] = t
    models = {}
    for spec in plan.cfg.models:
        s = costing.size(spec.name)
        models[spec.name] = {"parameters": s.total, "active_parameters": s.active, "vocab_size": s.vocab_size,
                             "config": s.source, "fill": s.fill}
    return {"name": plan.cfg.name, "throughput": {"gpu_tflops": gpu_tflops, "utilisation": utilisation,
                                                  "effective_tflops": gpu_tflops * utilisation},
            "stages": rows, "totals": totals, "models": models, "notes": costing.notes}


# -- printing -----------------------------------------------------------------------------------------

def _num(n: float | None, basis: str | None = None, unit: str = "") -> str:
    if n is None:
        return "-" if basis is None else "?"
    mark = "≤" if basis == "bound" else "~" if basis and basis.startswith("~") else ""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{mark}{n / div:.3g}{suffix}{unit}"
    return f"{mark}{n:.0f}{unit}"


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", … {len(names) - n} more" if len(names) > n else "")


def _flops(f: float | None) -> str:
    """FLOPs in scientific notation (``2.82e18``): the only unit that spans 1e9 to 1e21 readably."""
    if f is None:
        return "?"
    if f == 0:
        return "0"
    text = f"{f:.3g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _hours(h: float | None) -> str:
    if h is None:
        return "?"
    return f"{h:.3g}" if h >= 0.01 else ("0" if h == 0 else "<0.01")


def cost_table(costs: dict[str, Any]) -> list[str]:
    """The printed view: one line per stage instance, then the totals and how to fill any ``?``."""
    from fusechat_core.store import human_size

    labels = [r["stage"] for r in costs["stages"]]
    head = ("stage", "state", "seqs", "tokens", "sup.tokens", "bytes", "N", "FLOPs", "GPU-h", "address")
    lines = []
    for r in costs["stages"]:
        n = r["active_parameters"] if r["model"] is not None else None
        lines.append((r["stage"], r["state"], _num(r["sequences"], r["basis"]), _num(r["tokens"], r["basis"]),
                      _num(r["supervised_tokens"], r["basis"] if r["kind"] != "mt_bench_answers" else None),
                      ("" if r["bytes_basis"] == "stored" else "~") + human_size(r["bytes"]) if r["bytes"] is not None
                      else "?" if r["bytes_known"] else "-", _num(n, "") if r["model"] is not None else "-",
                      _flops(r["flops"]) if r["gpu"] else "-", _hours(r["gpu_hours"]) if r["gpu"] else "-",
                      r["address"]))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cells: tuple) -> str:
        left = (0, 1, len(head) - 1)  # names and addresses left, figures right
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(head).rstrip(), *(fmt(x).rstrip() for x in lines)]
    tp = costs["throughput"]
    for which, title in (("to_run", "to run"), ("all", "whole run")):
        t = costs["totals"][which]
        q = " + ?" if t["unknown"] else ""
        out.append(f"total {title}: {_flops(t['flops'])} FLOPs{q}, {_hours(t['gpu_hours'])} GPU-hours{q}, "
                   f"~{human_size(t['bytes'])}{' + ?' if t['bytes_unknown'] else ''} to store")
        if t["unknown"] or t["bytes_unknown"]:
            out.append(f"  ? : N unknown for {len(set(t['unknown']) | set(t['bytes_unknown']))} stage instances "
                       f"({_few(sorted(set(t['unknown']) | set(t['bytes_unknown']), key=labels.index))})")
    out.append(f"GPU-hours at {tp['gpu_tflops']:g} TFLOPS × {tp['utilisation']:g} utilisation "
               f"= {tp['effective_tflops']:g} TFLOPS sustained (--gpu-tflops, --gpu-utilisation); "
               "≤ upper bound, ~ estimate; N: parameters per token")
    for name, m in costs["models"].items():
        if m["fill"]:
            out.append(f"N of {name} unknown: {m['fill']}")
        else:
            moe = f", {m['active_parameters']:,} per token" if m["active_parameters"] != m["parameters"] else ""
            out.append(f"N of {name}: {m['parameters']:,} parameters{moe} (from {m['config']})")
    out += costs["notes"]
    return out


__all__ = ["DEFAULT_UTILISATION", "H100_BF16_DENSE_TFLOPS", "ModelSize", "count_parameters", "cost_table",
           "hub_config_path", "model_size", "plan_costs"]
