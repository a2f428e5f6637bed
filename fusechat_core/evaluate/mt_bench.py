"""MT-Bench (SPEC §1.6): questions, reference answers, judge prompts, and answering.

The data files are FastChat's (lm-sys/FastChat, ``fastchat/llm_judge/data``,
Apache-2.0), read from a local folder or any http(s) location; by default from
FastChat's repository. Answers follow FastChat's ``gen_model_answer``: each
turn is asked in the model's own chat template with the model's previous
answers in the history, at the category's temperature (greedy below 1e-4).

Answers are saved one question at a time, each as an artifact of its own under
the answers address, so a run killed mid-way answers only the questions that
have no complete artifact yet. The answers file uses FastChat's answer format,
so FastChat's own tools read it as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusechat_core import stopping
from fusechat_core.determinism import pin_compute
from fusechat_core.evaluate.loading import EvaluationError
from fusechat_core.store import ArtifactStore

log = logging.getLogger("fusechat.evaluate")

FASTCHAT_DATA = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data"
FASTCHAT = "fastchat"  # the default location's name

# FastChat's temperature_config; a category it does not list is answered at 0.7.
TEMPERATURES: dict[str, float] = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7
# Categories graded against a reference answer (FastChat's NEED_REF_CATS).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")

# Where each file may sit under a location: our flat copy first, then FastChat's layout
# (``data/mt_bench/question.jsonl``, ``data/judge_prompts.jsonl``).
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "questions": ("question.jsonl", "mt_bench/question.jsonl"),
    "references": ("reference_answer_gpt-4.jsonl", "reference_answer/gpt-4.jsonl",
                   "mt_bench/reference_answer/gpt-4.jsonl"),
    "judge_prompts": ("judge_prompts.jsonl", "../judge_prompts.jsonl"),
}

ANSWERS_FILE = "answers.jsonl"


class MTBenchDataError(ValueError):
    """A bad MT-Bench data file; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    question_id: int
    category: str
    turns: tuple[str, ...]

    @property
    def temperature(self) -> float:
        return TEMPERATURES.get(self.category, DEFAULT_TEMPERATURE)


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str
    output_format: str


@dataclass
class MTBenchData:
    questions: list[Question]
    references: dict[int, list[str]]  # question_id -> reference answer per turn
    judge_prompts: dict[str, JudgePrompt]
    sources: dict[str, str] = field(default_factory=dict)  # kind -> where it was read
    digests: dict[str, str] = field(default_factory=dict)  # kind -> sha256 of the file

    def question(self, qid: int) -> Question:
        for q in self.questions:
            if q.question_id == qid:
                return q
        raise KeyError(f"no MT-Bench question {qid}")


# -- loading ------------------------------------------------------------------------

def _read(location: str, kind: str) -> tuple[str, str]:
    """(text, where) of one data file under a local folder or an http(s) base."""
    tried = []
    if location.startswith(("http://", "https://")):
        import httpx

        base = location.rstrip("/") + "/"
        for rel in _CANDIDATES[kind]:
            url = str(httpx.URL(base).join(rel))
            tried.append(url)
            try:
                resp = httpx.get(url, timeout=60.0, follow_redirects=True)
            except httpx.HTTPError as exc:
                raise MTBenchDataError(f"{url}: cannot fetch ({type(exc).__name__})") from None
            if resp.status_code == 404:
                continue
            if resp.status_code != 200:
                raise MTBenchDataError(f"{url}: HTTP {resp.status_code}")
            return resp.text, url
    else:
        folder = Path(location[len("file://"):] if location.startswith("file://") else location).expanduser()
        if not folder.is_dir():
            raise MTBenchDataError(f"evaluate.mt_bench_data: no such folder: {location}")
        for rel in _CANDIDATES[kind]:
            path = (folder / rel).resolve()
            tried.append(str(path))
            if path.is_file():
                return path.read_text(encoding="utf-8"), str(path)
    raise MTBenchDataError(f"MT-Bench {kind} file not found under {location} (tried: {', '.join(tried)})")


def _jsonl(text: str, where: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MTBenchDataError(f"{where}:{n}: not valid JSON") from None
        if not isinstance(row, dict):
            raise MTBenchDataError(f"{where}:{n}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise MTBenchDataError(f"{where}: empty")
    return rows


def _field(row: dict, key: str, typ: type | tuple, where: str, n: int) -> Any:
    if key not in row:
        raise MTBenchDataError(f"{where}:{n}: missing field {key!r}")
    if not isinstance(row[key], typ):
        raise MTBenchDataError(f"{where}:{n}: field {key!r} has the wrong type")
    return row[key]


def parse_questions(text: str, where: str) -> list[Question]:
    out, seen = [], set()
    for n, row in enumerate(_jsonl(text, where), 1):
        qid = _field(row, "question_id", int, where, n)
        cat = _field(row, "category", str, where, n)
        turns = _field(row, "turns", list, where, n)
        if len(turns) != 2 or not all(isinstance(t, str) and t.strip() for t in turns):
            raise MTBenchDataError(f"{where}:{n}: question {qid} must have two non-empty turns")
        if qid in seen:
            raise MTBenchDataError(f"{where}:{n}: duplicate question_id {qid}")
        seen.add(qid)
        out.append(Question(qid, cat, tuple(turns)))
    return out


def parse_references(text: str, where: str) -> dict[int, list[str]]:
    out = {}
    for n, row in enumerate(_jsonl(text, where), 1):
        qid = _field(row, "question_id", int, where, n)
        choices = _field(row, "choices", list, where, n)
        if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("turns"), list):
            raise MTBenchDataError(f"{where}:{n}: reference {qid} has no choices[0].turns")
        out[qid] = [str(t) for t in choices[0]["turns"]]
    return out


def parse_judge_prompts(text: str, where: str) -> dict[str, JudgePrompt]:
    out = {}
    for n, row in enumerate(_jsonl(text, where), 1):
        name = _field(row, "name", str, where, n)
        out[name] = JudgePrompt(name, _field(row, "system_prompt", str, where, n),
                                _field(row, "prompt_template", str, where, n), str(row.get("output_format", "")))
    return out


def load_mt_bench(location: str | None = None) -> MTBenchData:
    """Questions, GPT-4 reference answers and judge prompts from ``location``.

    ``None`` or ``"fastchat"``: FastChat's published files. Otherwise a local folder
    or an http(s) base holding either our flat copy (``question.jsonl``,
    ``reference_answer_gpt-4.jsonl``, ``judge_prompts.jsonl``) or FastChat's layout.
    """
    base = f"{FASTCHAT_DATA}/mt_bench" if location in (None, FASTCHAT) else location
    texts = {kind: _read(base, kind) for kind in _CANDIDATES}
    data = MTBenchData(
        questions=parse_questions(*texts["questions"]),
        references=parse_references(*texts["references"]),
        judge_prompts=parse_judge_prompts(*texts["judge_prompts"]),
        sources={k: w for k, (_, w) in texts.items()},
        digests={k: hashlib.sha256(t.encode()).hexdigest() for k, (t, _) in texts.items()},
    )
    missing = [q.question_id for q in data.questions
               if q.category in NEED_REF_CATS and q.question_id not in data.references]
    if missing:
        raise MTBenchDataError(f"{data.sources['references']}: no reference answer for questions "
                               f"{missing[:10]} (categories {', '.join(NEED_REF_CATS)} need one)")
    return data


# -- answering -------------------------------------------------------------------------

def question_address(answers_address: str, qid: int) -> str:
    return f"{answers_address}/question-{qid:04d}"


def answer_file(qid: int) -> str:
    return f"answer-{qid:04d}.json"


_END_MARKERS = ("<|end_of_turn|>", "<|im_end|>", "<|eot_id|>", "</s>")


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    """Ids that end an assistant turn: EOS plus the end-of-turn markers chat templates use."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[m] for m in _END_MARKERS if m in vocab)
    return sorted(ids)


@dataclass
class GenerationResult:
    text: str
    new_tokens: int
    finish: str  # "stop" (an end-of-turn token) or "length"


def _stop_criteria() -> Any:
    """Ends ``generate`` at the next token once the run is told to stop."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _OnStop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            return torch.full((input_ids.shape[0],), stopping.stopping(), dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([_OnStop()])


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, temperature: float,
                   max_new_tokens: int, stop_ids: Sequence[int], seed: int | None = None) -> list[GenerationResult]:
    """Continue each prompt (token ids) until an end-of-turn token or ``max_new_tokens``.

    Prompts are left-padded into one batch; below T = 1e-4 decoding is greedy, as in FastChat.
    """
    pin_compute()
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (list(stop_ids) or [0])[0]
    width = max(len(p) for p in prompts)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and width >= limit:
        raise EvaluationError(f"prompt of {width} tokens does not fit the model's context of {limit}")
    budget = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    kwargs: dict[str, Any] = dict(max_new_tokens=budget, eos_token_id=list(stop_ids) or None, pad_token_id=pad)
    if temperature < 1e-4:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        if seed is not None:
            torch.manual_seed(seed)
    stopping.check()
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             stopping_criteria=_stop_criteria(), **kwargs)
    stopping.check()  # a generation cut short by a stop is not an answer
    results = []
    stops = set(stop_ids)
    for row in out[:, width:].tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        new = row if end is None else row[:end]
        text = tokenizer.decode(new, skip_special_tokens=True)
        for marker in _END_MARKERS:  # a marker the tokenizer split into pieces
            text = text.split(marker, 1)[0]
        results.append(GenerationResult(text.strip(), len(new), "length" if end is None else "stop"))
    return results


def _stored_answer(store: ArtifactStore, answers_address: str, q: Question) -> dict | None:
    addr = question_address(answers_address, q.question_id)
    if not store.is_complete(addr):
        return None
    rec = store.read_json(addr, answer_file(q.question_id))
    if tuple(rec.get("question_turns", ())) != q.turns:
        log.warning("MT-Bench question %d changed since it was answered; answering it again", q.question_id)
        return None
    return rec


def answer_questions(store: ArtifactStore, answers_address: str, model_name: str, model: Any, tokenizer: Any,
                     formatter: Any, questions: Iterable[Question], *, max_new_tokens: int, batch_size: int = 8,
                     seed: int = 0, progress: Callable[[str], None] | None = None,
                     on_count: Callable[[int, int], None] | None = None) -> list[dict]:
    """Answer both turns of every question not yet answered; return every answer record.
    ``on_count(done, total)``: questions answered so far (found ones included), after each batch.

    Questions are batched by temperature; each question's record is committed as
    soon as its second turn is done.
    """
    questions = list(questions)
    stop_ids = stop_token_ids(tokenizer, model)
    done = {q.question_id: rec for q in questions if (rec := _stored_answer(store, answers_address, q))}
    todo = [q for q in questions if q.question_id not in done]
    if done:
        (progress or log.info)(f"{model_name}: {len(done)} MT-Bench answers found, {len(todo)} to generate")
    groups: dict[float, list[Question]] = {}
    for q in todo:
        groups.setdefault(q.temperature, []).append(q)
    for temperature, qs in groups.items():
        for start in range(0, len(qs), batch_size):
            batch = qs[start:start + batch_size]
            t0 = time.time()
            histories: list[list[dict[str, str]]] = [[] for _ in batch]
            prompt_ids: list[list[list[int]]] = [[] for _ in batch]
            results: list[list[GenerationResult]] = [[] for _ in batch]
            for turn in range(2):
                prompts = []
                for i, q in enumerate(batch):
                    histories[i].append({"role": "user", "content": q.turns[turn]})
                    prompt_ids[i].append(formatter.prompt_ids(histories[i]))
                    prompts.append(prompt_ids[i][-1])
                # One seed per (batch's first question, turn): with the same batching (batch_size 1
                # always) a resumed run samples what an uninterrupted one sampled.
                gens = generate_batch(model, tokenizer, prompts, temperature=temperature,
                                      max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                      seed=seed * 100_003 + batch[0].question_id * 10 + turn)
                for i, g in enumerate(gens):
                    histories[i].append({"role": "assistant", "content": g.text})
                    results[i].append(g)
            for i, q in enumerate(batch):
                rec = {
                    "question_id": q.question_id,
                    "answer_id": hashlib.sha256(f"{answers_address}:{q.question_id}".encode()).hexdigest()[:22],
                    "model_id": model_name,
                    "choices": [{"index": 0, "turns": [r.text for r in results[i]]}],
                    "tstamp": time.time(),
                    "category": q.category,
                    "question_turns": list(q.turns),
                    "temperature": temperature,
                    "max_new_tokens": max_new_tokens,
                    "prompt_ids": prompt_ids[i],
                    "new_tokens": [r.new_tokens for r in results[i]],
                    "finish": [r.finish for r in results[i]],
                }
                # replace: a stored answer to a question whose text has changed is answered again
                with store.writer(question_address(answers_address, q.question_id),
                                  meta={"stage": "mt_bench_answers", "question_id": q.question_id},
                                  replace=True) as w:
                    w.write_json(answer_file(q.question_id), rec)
                done[q.question_id] = rec
            if on_count is not None:
                on_count(len(done), len(questions))
            (progress or log.info)(f"{model_name}: answered MT-Bench questions "
                                   f"{[q.question_id for q in batch]} (T={temperature}) in {time.time() - t0:.1f} s")
    return [done[q.question_id] for q in questions]


def write_answers_artifact(store: ArtifactStore, answers_address: str, model_name: str, records: list[dict],
                           data: MTBenchData, ran: dict[str, str] | None = None) -> None:
    """The answers artifact proper: every answer in one FastChat-format file, manifest last.
    ``ran``: the device kind and precision the model answered in (the evaluation's results
    say it when no held-out measure does)."""
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    meta = {"stage": "mt_bench_answers", "model": model_name, "questions": len(records),
            "data_sources": data.sources, "data_digests": data.digests, **(ran or {})}
    # replace: the answers of an earlier version of the questions (their location changed) go
    with store.writer(answers_address, meta=meta, replace=True) as w:
        w.write_bytes(ANSWERS_FILE, body.encode())


def read_answers(store: ArtifactStore, answers_address: str) -> list[dict]:
    text = store.read_bytes(answers_address, ANSWERS_FILE).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
