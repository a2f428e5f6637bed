"""The evaluation stage for one model, and the run's report.

Order matters for a week-long run: answers (resumable per question) and the
held-out measures need the model and a GPU, each stored at an address of its
own (:func:`measure_model`); judging needs neither, so in a run it is a step
of its own that holds no GPU slot while a paid judge answers (:func:`evaluate_model`).
The evaluate artifact (``results.json`` and the detail files) is committed
last, after every judgment has been saved.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fusechat_core.config import EvaluateConfig
from fusechat_core.evaluate.judge import JudgeSettings, grade_answers, judgments_jsonl, missing_key, summarise
from fusechat_core.evaluate.loading import EvaluationError, load_for_eval, resolve_model
from fusechat_core.evaluate.mt_bench import (
    ANSWERS_FILE,
    MTBenchData,
    answer_questions,
    load_mt_bench,
    read_answers,
    write_answers_artifact,
)
from fusechat_core.evaluate.nll import exact_match, heldout_nll
from fusechat_core.evaluate.report import RESULTS_FILE, build_report
from fusechat_core.models import claim_gpu, pick_device, release_memory
from fusechat_core.plan import mt_bench_judgments_address
from fusechat_core.store import ArtifactStore

log = logging.getLogger("fusechat.evaluate")

JUDGMENTS_FILE = "judgments.jsonl"
REPORT_FILES = ("report.md", "report.json")


def _public_url(url: str) -> str:
    """A URL without any ``user:password@`` part, fit for an artifact."""
    return re.sub(r"://[^/@]*@", "://", url)


MEASURES_FILE = "measures.json"


def measure_model(store: ArtifactStore, name: str, model_ref: dict[str, Any], cfg: EvaluateConfig, *,
                  answers_address: str | None = None, measures_address: str | None = None,
                  dataset: str | None = None, data: MTBenchData | None = None,
                  progress: Callable[[str], None] | None = None,
                  on_count: Callable[[str, int, int], None] | None = None) -> bool:
    """An evaluation's GPU part: the model's MT-Bench answers (at ``answers_address``) and its
    held-out measures (at ``measures_address``, on ``dataset``'s held-out split), each only if
    not yet stored; returns whether the model was loaded. Judging needs neither the model nor
    a GPU, so it is a step of its own (:func:`evaluate_model`), and a GPU slot is not held
    through hours of a paid judge's answers.

    ``data``: the MT-Bench questions, when the caller has read them (else read here).
    ``on_count(what, done, total)``: ``mt_bench`` questions answered, ``heldout`` sequences measured.
    """
    say = progress or log.info
    if cfg.mt_bench and not answers_address:
        raise EvaluationError(f"model {name!r}: MT-Bench is on but no answers address was given")
    if cfg.mt_bench and data is None:
        data = load_mt_bench(cfg.mt_bench_data)
    data = data if cfg.mt_bench else None
    need_answers = data is not None and not _answers_current(store, answers_address, data)
    need_measures = measures_address is not None and not store.is_complete(measures_address)
    if need_measures and dataset is None:
        raise EvaluationError(f"model {name!r}: held-out measures asked for, but no dataset was given")
    if not (need_answers or need_measures):
        return False
    # a GPU of its own among this process's evaluations (an 8-GPU node, 8 threads)
    model = resolve_model(store, name, model_ref)
    with claim_gpu(pick_device(cfg.device), spread=bool(model.device_map)) as on:
        lm, tok, fmt, device = load_for_eval(model, on, cfg.dtype)
        # the kind, not the index: which GPU it was given is no part of what it measured
        ran = {"device": device.split(":")[0],
               "dtype": model.dtype or cfg.dtype}  # what it ran in: a model naming its own keeps it
        say(f"{name}: evaluating {model.path} on {device}")
        if need_answers:
            recs = answer_questions(store, answers_address, name, lm, tok, fmt, data.questions,
                                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                    seed=cfg.seed, progress=say,
                                    on_count=None if on_count is None else lambda d, t: on_count("mt_bench", d, t))
            write_answers_artifact(store, answers_address, name, recs, data, ran=ran)
        if need_measures:
            measures = {**ran, **_heldout_measures(store, name, dataset, lm, tok, fmt, cfg, say, on_count)}
            with store.writer(measures_address, meta={"stage": "heldout_measures", "model": name,
                                                      "dataset": dataset}) as w:
                w.write_json(MEASURES_FILE, measures)
        dropped = weakref.ref(lm)
        del lm
        release_memory(dropped)
    return True


def _heldout_measures(store: ArtifactStore, name: str, dataset: str, lm: Any, tok: Any, fmt: Any,
                      cfg: EvaluateConfig, say: Callable[[str], None],
                      on_count: Callable[[str, int, int], None] | None) -> dict[str, Any]:
    from fusechat_core.data import read_split

    out: dict[str, Any] = {}
    rows = read_split(store, dataset, "heldout")
    if not rows:
        say(f"{name}: dataset {dataset} has no held-out rows; no offline measures")
    if rows and cfg.heldout_nll:
        try:
            out["heldout_nll"] = heldout_nll(lm, fmt, rows, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                             progress=say, on_count=None if on_count is None
                                             else lambda d, t: on_count("heldout", d, t))
        except EvaluationError as exc:  # a NaN is a failed evaluation, never a figure in the report
            raise EvaluationError(f"evaluate[{name}]: {exc}") from None
    if rows and cfg.exact_match_sources:
        em = exact_match(lm, tok, fmt, rows, cfg.exact_match_sources,
                         max_new_tokens=cfg.exact_match_max_new_tokens, batch_size=cfg.batch_size)
        if em["all"]["n"]:
            out["exact_match"] = em
    return out


def evaluate_model(store: ArtifactStore, address: str, name: str, model_ref: dict[str, Any],
                   cfg: EvaluateConfig, *, dataset: str | None = None, answers_address: str | None = None,
                   measures_address: str | None = None, expect_measured: bool = False,
                   progress: Callable[[str], None] | None = None,
                   on_count: Callable[[str, int, int], None] | None = None,
                   earlier: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate one model into the artifact at ``address``; returns its results.

    ``answers_address`` is where the MT-Bench answers live (``RunPlan.mt_bench_answers``),
    ``measures_address`` the held-out measures (``RunPlan.heldout_measures``: None measures
    none) on ``dataset``'s held-out split; what of them is missing is made first
    (:func:`measure_model`): in a run, the GPU step before this one made them
    (``expect_measured``: a missing part is then said in a warning). ``earlier``: where older
    versions kept this model's verdicts (``plan.earlier_judgments``), reused from there.
    ``on_count(what, done, total)``: ``mt_bench`` questions answered, ``heldout`` sequences
    measured, ``judge`` questions graded.
    """
    say = progress or log.info
    if store.is_complete(address):
        return store.read_json(address, RESULTS_FILE)
    if cfg.mt_bench and not answers_address:
        raise EvaluationError(f"model {name!r}: MT-Bench is on but no answers address was given")
    if dataset is not None and (cfg.heldout_nll or cfg.exact_match_sources) and not measures_address:
        raise EvaluationError(f"model {name!r}: held-out measures are on but no measures address was given")
    data = load_mt_bench(cfg.mt_bench_data) if cfg.mt_bench else None
    loaded = measure_model(store, name, model_ref, cfg, answers_address=answers_address,
                           measures_address=measures_address, dataset=dataset, data=data, progress=say,
                           on_count=on_count)
    if loaded and expect_measured:
        # the questions at a moving location (FastChat's main branch) changed since the GPU step
        # found its answers stored: answered again here, rather than a run that cannot finish
        log.warning("evaluate[%s]: answers or held-out measures the GPU step should have made were missing or "
                    "out of date (%s, %s): made here, outside the run's GPU limit", name, answers_address or "-",
                    measures_address or "-")
    results: dict[str, Any] = {"model": name, "model_ref": model_ref}
    if measures_address is not None:
        results.update(store.read_json(measures_address, MEASURES_FILE))
    elif data is not None:
        man = store.manifest(answers_address)
        results.update({k: man.meta[k] for k in ("device", "dtype") if k in man.meta})
    judgments = []
    if data is not None:
        answers = read_answers(store, answers_address)
        settings = JudgeSettings.from_config(cfg)
        verdicts = mt_bench_judgments_address(name, answers_address, cfg)
        judgments = grade_answers(store, verdicts, data, answers, settings, max_failures=cfg.judge_max_failures,
                                  progress=say, earlier=earlier,
                                  on_count=None if on_count is None else lambda d, t: on_count("judge", d, t))
        results["mt_bench"] = {**summarise(judgments), "judge_model": cfg.judge_model,
                               "judge_base_url": _public_url(cfg.judge_base_url),
                               "answers": answers_address, "judgments": verdicts, "data_sources": data.sources,
                               "data_digests": data.digests}
    with store.writer(address, meta={"stage": "evaluate", "model": name}) as w:
        w.write_json(RESULTS_FILE, results)
        if data is not None:
            w.write_bytes(JUDGMENTS_FILE, judgments_jsonl(judgments))
            w.write_bytes(ANSWERS_FILE, store.read_bytes(answers_address, ANSWERS_FILE))
    return results


def _answers_current(store: ArtifactStore, answers_address: str, data: Any) -> bool:
    """The answers artifact is complete and answers these very questions.

    The answers address names the data's location, not its content: a location
    like FastChat's main branch can change, and then the changed questions are
    answered again (``answer_questions`` compares each stored question's text).
    """
    man = store.manifest(answers_address)
    if man is None or not store.is_complete(answers_address):
        return False
    return man.meta.get("data_digests", {}).get("questions") == data.digests["questions"]


def loss_history(store: ArtifactStore, train_address: str) -> list[dict] | None:
    """A trained target's loss per step, from the files training writes (None if it has none).

    Read, in this order: the train stage's own log (``fusechat_training.json``,
    its ``history``), ``loss_history.json`` (a list of {step, loss}),
    ``metrics.jsonl`` (one {step, loss, ...} per line), ``trainer_state.json``
    (its ``history``, or Hugging Face's ``log_history``).
    """
    from fusechat_core.train import TRAINING_LOG

    man = store.manifest(train_address)
    if man is None:
        return None
    files = {f.path for f in man.files}
    if TRAINING_LOG in files:
        rows = store.read_json(train_address, TRAINING_LOG).get("history", [])
    elif "loss_history.json" in files:
        rows = store.read_json(train_address, "loss_history.json")
    elif "metrics.jsonl" in files:
        text = store.read_bytes(train_address, "metrics.jsonl").decode()
        rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    elif "trainer_state.json" in files:
        state = store.read_json(train_address, "trainer_state.json")
        rows = state.get("history") or state.get("log_history", [])
    else:
        return None
    out = [{"step": int(r["step"]), "loss": float(r["loss"])} for r in rows
           if isinstance(r, dict) and "step" in r and r.get("loss") is not None]
    return out or None


def teacher_summary(store: ArtifactStore, train_address: str) -> dict[str, Any] | None:
    """What a trained target's source gave it (``FusionData.teacher_summary``), from its
    training log; None for the CLM baseline or a target trained elsewhere."""
    from fusechat_core.train import TRAINING_LOG

    man = store.manifest(train_address)
    if man is None or TRAINING_LOG not in {f.path for f in man.files}:
        return None
    return store.read_json(train_address, TRAINING_LOG).get("teachers") or None


def write_report(store: ArtifactStore, address: str, title: str, evaluations: Mapping[str, str],
                 train_artifacts: Mapping[str, str] | None = None, notes: tuple[str, ...] = (),
                 roles: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's report artifact from its evaluate artifacts (and training logs, when present);
    ``roles`` (``RunPlan.report_roles``) adds the comparison with the CLM baseline."""
    results = {name: store.read_json(addr, RESULTS_FILE) for name, addr in evaluations.items()}
    histories, why = {}, {}
    sources = {label: t.get("source") for label, t in ((roles or {}).get("targets") or {}).items()}
    for name, addr in (train_artifacts or {}).items():
        hist = loss_history(store, addr)
        if hist:
            histories[name] = hist
        teachers = teacher_summary(store, addr) if name in sources else None
        if teachers:
            why[name] = {"source": sources[name], **teachers,
                         "source_chosen": {d: v["source_chosen"] for d, v in teachers["domains"].items()
                                           if v.get("source_chosen") is not None},
                         "source_chosen_all": teachers.get("source_chosen")}
    with tempfile.TemporaryDirectory() as tmp:
        rep = build_report(title, results, tmp, histories, notes, roles, why)
        meta = {"stage": "report", "models": list(results), "evaluations": dict(evaluations)}
        store.put_dir(address, tmp, meta=meta)
    return rep


def evaluate_standalone(store: ArtifactStore, model: str, cfg: EvaluateConfig, *, name: str | None = None,
                        dataset: str | None = None, tokenizer: str | None = None,
                        chat_template: str | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``fusechat eval``: evaluate a model folder, hub id or store artifact outside a run.

    Same artifacts as in a run (answers, evaluate, a report beside it), at addresses
    derived by the same rule, so evaluating the same model again skips what is done.
    """
    from pathlib import Path

    from fusechat_core.config import _HUB_ID
    from fusechat_core.plan import (
        earlier_judgments,
        heldout_measures_address,
        mt_bench_answers_address,
        standalone_evaluate_address,
    )

    local = Path(model).expanduser()
    extra = {k: v for k, v in (("tokenizer", tokenizer), ("chat_template", chat_template)) if v}
    if local.is_dir():
        ref: dict[str, Any] = {"model": {"path": str(local.resolve()), **extra}}
        default_name = local.resolve().name
    elif store.is_complete(model):
        ref = {"artifact": model.strip("/"), **extra}
        default_name = model.strip("/").split("/")[-1]
    elif _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        ref = {"model": {"path": model, **extra}}
        default_name = model.split("/")[-1]
    else:
        raise EvaluationError(f"MODEL_OR_ADDRESS {model!r}: neither a model folder, a complete artifact "
                              f"in {store.url}, nor a hub id")
    name = re.sub(r"[^a-z0-9_\-]", "-", (name or default_name).lower())[:40].strip("-") or "model"
    if dataset is not None and not store.is_complete(dataset):
        raise EvaluationError(f"--heldout {dataset!r}: no complete dataset artifact in {store.url}")
    answers = mt_bench_answers_address(name, ref, cfg) if cfg.mt_bench else None
    address = standalone_evaluate_address(name, ref, cfg, dataset)
    if not store.is_complete(address) and (problem := missing_key(cfg)):
        raise EvaluationError(problem)
    results = evaluate_model(store, address, name, ref, cfg, dataset=dataset, answers_address=answers,
                             measures_address=heldout_measures_address(name, ref, cfg, dataset),
                             earlier=earlier_judgments(name, ref, cfg, dataset),
                             progress=progress)
    report_address = f"{address}/report"
    if not store.is_complete(report_address):
        write_report(store, report_address, f"Evaluation of `{name}`", {name: address})
    markdown = store.read_bytes(report_address, "report.md").decode()
    return {"name": name, "address": address, "answers": answers, "report": report_address,
            "report_uri": store.uri(report_address), "results": results, "markdown": markdown}
