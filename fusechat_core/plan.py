"""Every artifact address of a run, derived in one place from the config.

The flow, ``fusechat status`` and ``--plan`` all ask this module, so what the
pipeline writes and what status reports can never disagree. Each method names
exactly the config fields and upstream addresses its stage depends on.

Addresses depend only on what a stage reads (incremental fusion):

- ``dataset``: the data section, the sources as read, the seed and the pivot's tokenizer
  (blocks are cut to fit the pivot, never the sources). A local source is known by its path:
  the dataset records its files' bytes, and a run whose file changed since refuses to start
  (``data.changed_local_sources``) rather than reuse the old dataset;
- ``represent[m]``: model ``m`` itself, the represent section, the dataset;
- ``vocab_map[s]``: the pivot's and ``s``'s tokenizers, the mapping settings;
- ``align[s]``: the pivot's and ``s``'s representations, ``s``'s vocab map, the align section;
- ``train[s]``: the dataset, the pivot's representation, ``align[s]`` (none for CLM), and the
  one λ it is trained at: a λ ablation (``train.lam`` a list) adds targets and recomputes nothing
  upstream, its first λ's targets being those of a run with that λ alone;
- ``merge[method]``: every source's target, the method and its parameters;
- ``mt_bench_answers[n]``, ``heldout_measures[n]``: model ``n`` and the evaluate fields each
  reads (the GPU part of an evaluation); ``evaluate[n]``: model ``n`` and the evaluate section
  (its judge grades the answers); ``report``: every evaluation.

So adding or removing a source leaves the dataset, the pivot's and the other
sources' representations, vocab maps, alignments and targets at their addresses
(Cached); only the new source's chain, the merges, their evaluations and the
report are new. Adding a merge method adds that merge, its evaluation and the
report; evaluation settings change only evaluations and the report. The pivot,
the data, or a stage's own section still change everything downstream.

A registered loader, cleaner, synthetic domain, sequence aligner or merge method
past its first version (``Registry``) enters the address of the stages that use
it: the dataset (its sources' loaders or domains, its cleaner), a demo model (its
domains), an alignment, a merge. Changing one of them moves only what was made with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from fusechat_core.align.sequence import SEQUENCE_ALIGNERS
from fusechat_core.config import EvaluateConfig, ModelSpec, RunConfig, demo_name
from fusechat_core.data import synthetic
from fusechat_core.data.build import reader_versions
from fusechat_core.data.presets import sources_of
from fusechat_core.merge.methods import MERGE_METHODS, method_parameters
from fusechat_core.models import resolve_mixed_precision
from fusechat_core.stages import canonical, shard_address, stage_address

CLM = "clm"  # the λ = 1 baseline target: plain fine-tuning of the pivot


def _model_identity(spec: ModelSpec) -> dict:
    # The name is a label, not content: renaming a model must not recompute it; nor does
    # spreading it over several GPUs.
    return spec.model_dump(exclude={"name", "device_map"})


def mt_bench_answers_inputs(model_ref: dict, evaluate: EvaluateConfig) -> tuple[dict, dict]:
    """(section, upstream) of a model's MT-Bench answers: only what changes the answers is an
    input, so judging them again with another judge (a new evaluate address) reuses them."""
    section = {"questions": evaluate.mt_bench_data, "max_new_tokens": evaluate.max_new_tokens,
               "seed": evaluate.seed, "dtype": evaluate.dtype}
    return section, {k: str(v) for k, v in model_ref.items()}


def mt_bench_answers_address(name: str, model_ref: dict, evaluate: EvaluateConfig) -> str:
    return stage_address("mt_bench_answers", *mt_bench_answers_inputs(model_ref, evaluate), key=name)


def mt_bench_judgments_address(name: str, answers_address: str, evaluate: EvaluateConfig) -> str:
    """Where a model's MT-Bench verdicts are kept (one artifact per question under it). Only
    what changes a verdict is an input: the answers graded, the questions and references, the
    judge and how long it may answer. Changing anything else an evaluation measures (held-out
    NLL, batch size, the allowed failures, another model in ``evaluate.models``) reuses every
    verdict paid for, where keeping them under the evaluation's address bought them again."""
    section = {"questions": evaluate.mt_bench_data, "judge_model": evaluate.judge_model,
               "judge_base_url": evaluate.judge_base_url, "judge_max_tokens": evaluate.judge_max_tokens}
    return stage_address("mt_bench_judgments", section, {"answers": answers_address}, key=name)


def earlier_judgments(name: str, model_ref: dict, evaluate: EvaluateConfig, dataset: str | None) -> list[str]:
    """Where versions before ``mt_bench_judgments`` kept a model's verdicts: under its
    evaluation's address at evaluate stage version 3 (160 paid GPT-4 verdicts a model, found
    there and copied rather than bought again after an upgrade)."""
    return [stage_address("evaluate", *evaluate_inputs(model_ref, evaluate, dataset), key=name, version=3)]


# How long and how often the judge is asked never changes a verdict it gives, so
# changing the budget must not start a paid grading over (as train.checkpoint_every).
JUDGE_BUDGET = ("judge_concurrency", "judge_timeout_s", "judge_max_retries", "judge_max_retry_after_s",
                "judge_deadline_s")


def evaluate_inputs(model_ref: dict, evaluate: EvaluateConfig, dataset: str | None) -> tuple[dict, dict]:
    """(section, upstream) of an evaluation: what it measures, of which model, on which dataset."""
    upstream = {"dataset": dataset or "", **{k: str(v) for k, v in model_ref.items()}}
    return evaluate.model_dump(mode="json", exclude=set(JUDGE_BUDGET)), upstream


# What the held-out measures read of the evaluate section: the judge and MT-Bench are no part
# of them, so a new judge (or answers) keeps them and never needs the model again.
HELDOUT_FIELDS = ("heldout_nll", "exact_match_sources", "exact_match_max_new_tokens", "max_length", "batch_size",
                  "device", "dtype")


def heldout_measures_inputs(model_ref: dict, evaluate: EvaluateConfig, dataset: str | None
                            ) -> tuple[dict, dict] | None:
    """(section, upstream) of a model's held-out measures (NLL, exact match); None when the
    evaluation measures nothing offline (no dataset, or both measures off)."""
    if dataset is None or not (evaluate.heldout_nll or evaluate.exact_match_sources):
        return None
    section = {k: getattr(evaluate, k) for k in HELDOUT_FIELDS}
    return section, {"dataset": dataset, **{k: str(v) for k, v in model_ref.items()}}


def heldout_measures_address(name: str, model_ref: dict, evaluate: EvaluateConfig,
                             dataset: str | None) -> str | None:
    inputs = heldout_measures_inputs(model_ref, evaluate, dataset)
    return None if inputs is None else stage_address("heldout_measures", *inputs, key=name)


def evaluate_address(name: str, model_ref: dict, evaluate: EvaluateConfig, dataset: str | None) -> str:
    """An evaluation's address (run or ``fusechat eval``)."""
    return stage_address("evaluate", *evaluate_inputs(model_ref, evaluate, dataset), key=name)


def standalone_evaluate_address(name: str, model_ref: dict, evaluate: EvaluateConfig,
                                dataset: str | None) -> str:
    """``fusechat eval`` outside a run: the same rule as ``RunPlan.evaluate``."""
    return evaluate_address(name, model_ref, evaluate, dataset)


@dataclass(frozen=True)
class Node:
    stage: str
    key: str | None
    address: str
    shards: int = 0  # > 0: the artifact is made of that many shard artifacts

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.key}]" if self.key else self.stage


@dataclass(frozen=True)
class Derivation:
    """What one address was derived from: the very arguments ``stage_address`` hashed
    (``--plan --against`` compares two of these to say why an address changed)."""

    stage: str
    key: str | None
    section: Any  # canonical form, as hashed
    upstream: dict  # name -> upstream address
    root: str = ""  # the config section's name when the section is a whole one ("align")
    # kind -> {name: version past 1} (a kind may be empty); the same for both plans of a
    # diff (one process's code), so a difference here always comes with the section field
    # that chose another entry
    implementations: dict = field(default_factory=dict)


def _leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """``{"represent.max_length": 2048, "data.sources[1].path": "...", ...}`` of a canonical value."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(obj, list) and obj:
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{path}[{i}]"))
        return out
    return {path: obj}


class RunPlan:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        # address -> its inputs, filled as addresses are derived (``_address``: the one place)
        self.derivations: dict[str, Derivation] = {}

    def _address(self, stage: str, section: Any, upstream: dict | None = None, *, key: str | None = None,
                 root: str = "", implementations: dict[str, dict[str, int]] | None = None) -> str:
        """``stage_address``, remembering what it hashed. ``root``: the config section's name
        when ``section`` is a whole config section, to name its fields in a diff.
        ``implementations``: the versions of the registered entries the stage uses, by kind
        (``Registry.versions``)."""
        used = dict(implementations or {})
        address = stage_address(stage, section, upstream, key=key, implementations=used)
        self.derivations[address] = Derivation(stage, key, canonical(section), dict(upstream or {}), root, used)
        return address

    def identity(self, spec: ModelSpec) -> dict:
        """What a pivot/source model *is*, for addresses; a demo model is its built artifact."""
        ident = _model_identity(spec)
        if spec.path.startswith("demo:"):
            ident["demo_artifact"] = self.demo_model(spec)
        return ident

    def demo_model(self, spec: ModelSpec) -> str:
        """The demo stage's artifact for a ``demo:NAME`` model: built and pre-trained on CPU."""
        assert self.cfg.demo is not None
        name = demo_name(spec.path)
        model = self.cfg.demo.models[name]
        section = {"model": model,
                   "training": self.cfg.demo.model_dump(exclude={"models"}),
                   "tokenizer": spec.tokenizer, "chat_template": spec.chat_template}
        # pre-trained on its domains' rows: a domain that draws other rows makes another model
        return self._address("demo_models", section, key=name,
                             implementations={"domain": synthetic.DOMAINS.versions(model.domains)})

    def demo_specs(self) -> list[ModelSpec]:
        return [m for m in self.cfg.models if m.path.startswith("demo:")]

    def model(self, name: str) -> ModelSpec:
        for m in self.cfg.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r} in this run")

    # -- dataset -------------------------------------------------------------
    @cached_property
    def dataset(self) -> str:
        section = {
            "data": self.cfg.data,
            # The preset's sources as read (paths, files, splits, revisions): a preset
            # whose pins change makes another dataset, though its name stays the same.
            "sources": sources_of(self.cfg.data),
            "seed": self.cfg.seed,
            # Blocks are cut to fit the PIVOT's tokenizer only (``pivot_tokenizer``): the
            # dataset is what the pivot reads, so adding or removing a source keeps it, and
            # with it every address that does not read the new source.
            "pivot_tokenizer": self.pivot_tokenizer(),
        }
        # the loaders, synthetic domains and cleaner that read these sources, where one has changed
        used = reader_versions(section["sources"], self.cfg.data.clean)
        return self._address("dataset", section, implementations=used)

    def pivot_tokenizer(self) -> tuple[str, str | None]:
        """The tokenizer the dataset stage cuts blocks by: the pivot's (reference, revision)."""
        p = self.cfg.pivot
        return (p.tokenizer or p.path, p.revision)

    # -- representations (one per model, pivot included; sharded) --------------
    def represent(self, model: ModelSpec) -> str:
        # Batching by a token budget or by a count: only the one in use can change the
        # bytes, and the unused one is left out, so the addresses of runs that never set
        # batch_tokens are those they always had.
        rep = self.cfg.represent
        section = {"model": self.identity(model),
                   "represent": rep.model_dump(exclude={"batch_tokens"} if rep.batch_tokens is None
                                               else {"batch_size"})}
        return self._address("represent", section, {"dataset": self.dataset}, key=model.name)

    def represent_shard(self, model: ModelSpec, index: int) -> str:
        return shard_address(self.represent(model), index, self.cfg.represent.shards)

    # -- alignment (one per source; sharded like the representations) ----------
    def vocab_map(self, source: ModelSpec) -> str:
        p = self.cfg.pivot
        section = {
            "pivot_tokenizer": (p.tokenizer or p.path, p.revision),
            "source_tokenizer": (source.tokenizer or source.path, source.revision),
            "mapping": self.cfg.align.vocab_mapping,
            "threshold": self.cfg.align.mined_threshold,
        }
        return self._address("vocab_map", section, key=source.name)

    def align(self, source: ModelSpec) -> str:
        upstream = {"pivot": self.represent(self.cfg.pivot), "source": self.represent(source),
                    "vocab_map": self.vocab_map(source)}
        # ``auto`` is the offsets method, or DTW where a tokenizer has no offsets (align stage)
        methods = ("offsets", "dtw") if self.cfg.align.method == "auto" else (self.cfg.align.method,)
        return self._address("align", self.cfg.align, upstream, key=source.name, root="align",
                             implementations={"aligner": SEQUENCE_ALIGNERS.versions(methods)})

    def align_shard(self, source: ModelSpec, index: int) -> str:
        return shard_address(self.align(source), index, self.cfg.represent.shards)

    # -- training (one target per source, plus the CLM baseline) ---------------
    def target_names(self) -> list[str]:
        """The run's targets (one per source, at the run's λ), the λ ablation's, the baseline."""
        names = [s.name for s in self.cfg.sources] + list(self.ablation_targets)
        return names + [CLM] if self.cfg.train.clm_baseline else names

    @cached_property
    def ablation_targets(self) -> dict[str, tuple[str, float]]:
        """``<source>-lam<λ>`` → (source, λ): one more target per source for each further λ of a
        ``train.lam`` list. λ = 1 has none: it is the CLM baseline (same data, steps, loss)."""
        out = {}
        for lam in self.cfg.train.lams[1:]:
            if lam < 1.0:
                for s in self.cfg.sources:
                    out[f"{s.name}-lam{lam:g}"] = (s.name, lam)
        return out

    def target_source(self, target: str) -> str | None:
        """The source a target distils from (None for the CLM baseline)."""
        if target == CLM:
            return None
        return self.ablation_targets[target][0] if target in self.ablation_targets else self.model(target).name

    def target_lam(self, target: str) -> float:
        if target == CLM:
            return 1.0
        return self.ablation_targets[target][1] if target in self.ablation_targets else self.cfg.train.run_lam

    @staticmethod
    def target_label(target: str) -> str:
        """A target's model name in reports: ``target-<source>``, or ``clm`` for the baseline."""
        return target if target == CLM else f"target-{target}"

    def train(self, target: str) -> str:
        # How often checkpoints are written and kept, and how long ranks wait for each other,
        # never change the weights (resumption is bit-exact): changing them must not restart
        # a week of training.
        train = self.cfg.train.model_dump(exclude={"clm_baseline", "checkpoint_every", "keep_checkpoints",
                                                   "collective_timeout_s"})
        # What runs, not what was asked: ``auto`` is bf16 on a GPU and no precision change on
        # the CPU, different weights under one address unless resolved here (the train task
        # re-derives the address where it runs and refuses a disagreement).
        train["mixed_precision"] = resolve_mixed_precision(self.cfg.train.mixed_precision)
        upstream = {"dataset": self.dataset, "pivot": self.represent(self.cfg.pivot)}
        # One λ per target: a λ ablation's run-λ targets keep the addresses of a run with that λ
        # alone, and the ablation's targets differ from them only by λ.
        train["lam"] = self.target_lam(target)  # CLM: 1, the paper's "CLM" row: no fusion term
        source = self.target_source(target)
        if source is not None:
            upstream["aligned"] = self.align(self.model(source))
        section = {"train": train, "pivot": self.identity(self.cfg.pivot)}
        return self._address("train", section, upstream, key=target)

    # -- merging -----------------------------------------------------------------
    def merge_methods(self) -> list[str]:
        m = self.cfg.merge
        return [m.method] + [x for x in m.methods_extra if x != m.method]

    def merge(self, method: str) -> str:
        m = self.cfg.merge
        section = {
            "method": method,
            "parameters": method_parameters(m, method),
            # VaRM's alone (the stage passes it to no other method). The default stands in for
            # the others, so changing it moves only VaRM's merge, and the others' addresses stay
            # what they were when every method carried it
            "granularity": m.granularity if method == "varm" else "matrix",
            "dtype": m.dtype,
            "mergekit_yaml": m.mergekit_yaml if method == m.method else None,
            "pivot": self.identity(self.cfg.pivot),
        }
        # The CLM baseline is a comparison row, never an input to the merge.
        upstream = {f"target:{s.name}": self.train(s.name) for s in self.cfg.sources}
        return self._address("merge", section, upstream, key=method,
                             implementations={"merge method": MERGE_METHODS.versions([method])})

    # -- evaluation ------------------------------------------------------------------
    def evaluated_models(self) -> list[str]:
        """Names of every model the run evaluates: pivot, sources, targets, merges."""
        names = [m.name for m in self.cfg.models] + [self.target_label(t) for t in self.target_names()]
        names += [f"merge-{m}" for m in self.merge_methods()]
        wanted = self.cfg.evaluate.models
        return [n for n in names if not wanted or n in wanted]

    def model_ref(self, name: str) -> dict:
        """What a model *is* for evaluation: an external spec or an artifact address."""
        if name.startswith("merge-"):
            return {"artifact": self.merge(name[len("merge-"):])}
        if name == CLM:
            return {"artifact": self.train(CLM)}
        if name.startswith("target-"):
            return {"artifact": self.train(name[len("target-"):])}
        spec = self.model(name)
        if spec.path.startswith("demo:"):
            return {"artifact": self.demo_model(spec)}  # a built model is an artifact like a target
        return {"model": self.identity(spec)}

    def mt_bench_answers(self, name: str) -> str:
        section, upstream = mt_bench_answers_inputs(self.model_ref(name), self.cfg.evaluate)
        return self._address("mt_bench_answers", section, upstream, key=name, root="evaluate")

    def heldout_measures(self, name: str) -> str | None:
        """Where model ``name``'s held-out measures are kept (None: the run measures none)."""
        inputs = heldout_measures_inputs(self.model_ref(name), self.cfg.evaluate, self.dataset)
        return None if inputs is None else self._address("heldout_measures", *inputs, key=name, root="evaluate")

    def evaluate(self, name: str) -> str:
        section, upstream = evaluate_inputs(self.model_ref(name), self.cfg.evaluate, self.dataset)
        return self._address("evaluate", section, upstream, key=name, root="evaluate")

    def report_roles(self) -> dict:
        """Who is who in the report: the CLM baseline, each target's source and that source's
        expert data sources, the merges. A demo source's experts are the data sources drawn
        from its most-weighted pre-training domains; other sources' are not known (None)."""
        demo = self.cfg.demo
        targets = {}
        for s in self.cfg.sources:
            experts = None
            d = demo.models.get(demo_name(s.path)) if demo else None
            if d is not None and d.domains:
                top = max(d.domains.values())
                experts = [src.label for src in self.cfg.data.sources
                           if d.domains.get(demo_name(src.path)) == top]
            targets[self.target_label(s.name)] = {"source": s.name, "expert_domains": experts}
        roles = {"clm": CLM if self.cfg.train.clm_baseline else None, "targets": targets,
                 "merges": [f"merge-{m}" for m in self.merge_methods()]}
        if len(self.cfg.train.lams) > 1:
            # source → λ → the model trained at it (λ = 1: the CLM baseline)
            ablation: dict[str, dict[str, str]] = {s.name: {} for s in self.cfg.sources}
            for s in self.cfg.sources:
                ablation[s.name][f"{self.cfg.train.run_lam:g}"] = self.target_label(s.name)
            for t, (source, lam) in self.ablation_targets.items():
                ablation[source][f"{lam:g}"] = self.target_label(t)
            if 1.0 in self.cfg.train.lams:
                for s in self.cfg.sources:
                    ablation[s.name]["1"] = CLM
            roles["ablation"] = ablation
        return roles

    def report(self) -> str:
        upstream = {n: self.evaluate(n) for n in self.evaluated_models()}
        return self._address("report", {"name": self.cfg.name}, upstream)

    def inputs(self, node: Node) -> list[str]:
        """What ``--plan`` shows under a stage's row: the dataset's sources as they will be
        read (files, split, config, revision), the parameters each merge runs with, and any
        registered implementation past its first version that the address carries."""
        used = self.derivations[node.address].implementations if node.address in self.derivations else {}
        named = [f"{kind} {name} version {v}" for kind, vs in sorted(used.items()) for name, v in sorted(vs.items())]
        return self._inputs(node) + ([f"implementations: {', '.join(named)}"] if named else [])

    def _inputs(self, node: Node) -> list[str]:
        if node.stage == "dataset":
            out = []
            for s in sources_of(self.cfg.data):
                pins = [f"{k}={json.dumps(getattr(s, k))}" for k in ("data_files", "split", "subset", "revision")
                        if getattr(s, k) is not None]
                if s.revision is None and not s.path.startswith("demo:") and not s.local:
                    pins.append("(revision not pinned)")
                out.append(f"source {s.label}: {s.path} format={s.format} count={s.count or 'all'} {' '.join(pins)}")
            if self.cfg.data.clean:
                out.append(f"clean: {self.cfg.data.clean}")
            return out
        if node.stage == "merge" and node.key is not None:
            m = self.cfg.merge
            if node.key == m.method and m.mergekit_yaml is not None:
                return ["parameters: from merge.mergekit_yaml"]
            params = method_parameters(m, node.key)
            origin = f"preset {m.preset}" if m.preset else "our defaults"
            return [f"parameters ({origin}): {json.dumps(params, separators=(',', ':')) if params else 'defaults'}"]
        return []

    # -- the whole DAG -------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        """Every artifact of the run, in execution order."""
        shards = self.cfg.represent.shards
        out = [Node("demo_models", m.name, self.demo_model(m)) for m in self.demo_specs()]
        out += [Node("dataset", None, self.dataset)]
        out += [Node("represent", m.name, self.represent(m), shards) for m in self.cfg.models]
        out += [Node("vocab_map", s.name, self.vocab_map(s)) for s in self.cfg.sources]
        out += [Node("align", s.name, self.align(s), shards) for s in self.cfg.sources]
        out += [Node("train", t, self.train(t)) for t in self.target_names()]
        out += [Node("merge", m, self.merge(m)) for m in self.merge_methods()]
        if self.cfg.evaluate.mt_bench:
            out += [Node("mt_bench_answers", n, self.mt_bench_answers(n)) for n in self.evaluated_models()]
        out += [Node("heldout_measures", n, a) for n in self.evaluated_models() if (a := self.heldout_measures(n))]
        out += [Node("evaluate", n, self.evaluate(n)) for n in self.evaluated_models()]
        out.append(Node("report", None, self.report()))
        return out

    # -- what a config change invalidates (``--plan --against OLD``) -----------------------
    def diff(self, old: RunPlan) -> list[dict[str, Any]]:
        """Every stage instance of this plan against ``old``'s, in execution order, then the
        ones only ``old`` has: ``{"stage": label, "change": "unchanged" | "changed" | "new" |
        "removed", "address", "old_address", "why": [...]}``.

        ``why`` says which input of a changed address changed, from the very arguments the
        address was hashed from (``Derivation``): a field of the stage's own section
        (``represent.max_length: 2048 → 4096``, ``data.sources[1].path: ...``), or an
        upstream artifact (``dataset changed``), or the model a stage reads.
        """
        new_nodes, old_nodes = self.nodes(), old.nodes()
        old_by_label = {n.label: n for n in old_nodes}
        labels = {n.address: n.label for n in new_nodes} | {n.address: n.label for n in old_nodes}
        out: list[dict[str, Any]] = []
        for n in new_nodes:
            was = old_by_label.get(n.label)
            if was is None:
                out.append({"stage": n.label, "change": "new", "address": n.address, "old_address": None,
                            "why": ["not in the old config"]})
            elif was.address == n.address:
                out.append({"stage": n.label, "change": "unchanged", "address": n.address,
                            "old_address": was.address, "why": []})
            else:
                why = _why(old.derivations[was.address], self.derivations[n.address], labels)
                out.append({"stage": n.label, "change": "changed", "address": n.address,
                            "old_address": was.address, "why": why})
        new_labels = {n.label for n in new_nodes}
        out += [{"stage": n.label, "change": "removed", "address": None, "old_address": n.address,
                 "why": ["not in the new config"]} for n in old_nodes if n.label not in new_labels]
        return out


def _short(value: Any, width: int = 48) -> str:
    text = "(none)" if value is _MISSING else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


_MISSING = object()


def _why(old: Derivation, new: Derivation, labels: dict[str, str]) -> list[str]:
    """Which inputs of an address differ between two derivations of it, in words."""
    why = []
    a, b = _leaves(old.section), _leaves(new.section)
    said = set()  # (field under a source, old, new) said under data.sources
    for path in sorted(set(a) | set(b)):
        va, vb = a.get(path, _MISSING), b.get(path, _MISSING)
        if va != vb:
            name = f"{new.root}.{path}" if new.root and path else (new.root or path)
            # a dataset's "sources" are the preset's then data.sources, as read: a change to one
            # of the config's own sources is said once, under data.sources
            field = re.sub(r"^(data\.)?sources\[\d+\]", "", path), repr(va), repr(vb)
            if path.startswith("data.sources["):
                said.add(field)
            elif path.startswith("sources[") and new.stage == "dataset" and field in said:
                continue
            why.append(f"{name}: {_short(va)} → {_short(vb)}")
    for name in sorted(set(old.upstream) | set(new.upstream)):
        ua, ub = old.upstream.get(name, _MISSING), new.upstream.get(name, _MISSING)
        if ua == ub:
            continue
        if ub in labels or ua in labels:
            what = labels.get(ub) or labels.get(ua)
            why.append(f"{what} changed" if ua is not _MISSING and ub is not _MISSING
                       else f"{what} {'added' if ua is _MISSING else 'removed'}")
        else:
            why.append(f"{name}: {_short(ua)} → {_short(ub)}")
    if old.stage != new.stage or old.key != new.key:
        why.append(f"instance {old.stage}[{old.key}] → {new.stage}[{new.key}]")
    return why or ["the stage's version (code) changed"]
