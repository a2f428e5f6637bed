"""MT-Bench grading by a judge LLM behind any OpenAI-compatible chat-completions API.

Works with OpenAI itself and with a local vLLM (or any other) server: base URL,
model name and the *name* of the environment variable holding the API key come
from the config. The key is read from the environment when the client is made,
sent only in the Authorization header, and scrubbed from every error message;
it never reaches a log line or an artifact. The reply length is capped with
``max_tokens``; a model that refuses it (OpenAI's reasoning models answer 400
"Unsupported parameter: 'max_tokens'") is asked again at once with the same
cap as ``max_completion_tokens``, which the client then sends from there on.

Grading is FastChat's single-answer grading: ``single-v1`` for turn 1,
``single-v1-multi-turn`` for turn 2, and the ``single-math-v1`` forms with the
reference answer for math, reasoning and coding. The verdict is parsed from
``[[rating]]``, then ``[rating]``; a verdict without a rating in 1..10 is
counted as unparsable and left out of the means, never scored as 0. Each
question's judgments are saved as soon as both turns are graded, so a killed
run asks the judge only about the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fusechat_core.evaluate.mt_bench import NEED_REF_CATS, MTBenchData, Question
from fusechat_core.store import ArtifactStore

log = logging.getLogger("fusechat.evaluate.judge")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_DOUBLE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SINGLE = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """The judge could not be asked (after retries); the message never holds the key.

    ``transient``: what failed can succeed when asked again later (429, 5xx, no answer),
    unlike a refusal (401, 404, a bad request); see ``fusechat_core.errors``."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def parse_rating(text: str) -> float | None:
    """FastChat's rule: the first ``[[x]]``, else the first ``[x]``; None unless 1 <= x <= 10."""
    m = _DOUBLE.search(text) or _SINGLE.search(text)
    if m is None:
        return None
    value = float(m.group(1))
    return value if 1.0 <= value <= 10.0 else None


# Without a deadline, how many 429s a request may meet per retry it has (``complete``).
RATE_LIMIT_RETRIES_PER_RETRY = 10
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration(value: str | None) -> float | None:
    """Seconds of an OpenAI ``x-ratelimit-reset-*`` value (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``)."""
    if not value:
        return None
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    scale = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _server_wait(headers: Any, rate_limited: bool) -> float | None:
    """How long the server asks to wait: ``retry-after-ms``, else ``Retry-After``, else on a 429
    the later of OpenAI's ``x-ratelimit-reset-requests`` and ``-tokens``; None: not said."""
    try:
        ms = float(headers.get("retry-after-ms") or "")
        return max(0.0, ms / 1000)
    except ValueError:
        pass
    wait = _retry_after(headers.get("retry-after"))
    if wait is not None or not rate_limited:
        return wait
    resets = [d for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
              if (d := _duration(headers.get(h))) is not None]
    return max(resets) if resets else None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 4
    max_tokens: int = 2048
    temperature: float = 0.0
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 60.0  # a server's Retry-After is honoured up to this many seconds
    deadline_s: float | None = None  # all requests of one client together; None: no limit

    @classmethod
    def from_config(cls, cfg: Any) -> JudgeSettings:
        return cls(base_url=cfg.judge_base_url, model=cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                   concurrency=cfg.judge_concurrency, max_tokens=cfg.judge_max_tokens,
                   timeout_s=cfg.judge_timeout_s, max_retries=cfg.judge_max_retries,
                   retry_after_max_s=cfg.judge_max_retry_after_s, deadline_s=cfg.judge_deadline_s)


class _SharedJudge:
    """One judge endpoint (URL and model) as this process's clients share it: at most
    ``concurrency`` requests in flight among all of them, and a rate limit's wait for all.
    Slots are threading primitives (each evaluation's client runs its own event loop in its
    own thread), taken by polling so that a cancelled request never holds one."""

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self.resume_at = 0.0  # monotonic time before which no request is sent

    def pause_until(self, when: float) -> None:
        with self._lock:
            self.resume_at = max(self.resume_at, when)

    @contextlib.asynccontextmanager
    async def slot(self) -> Any:
        while not self._slots.acquire(blocking=False):
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            self._slots.release()


_JUDGES: dict[tuple[str, str], _SharedJudge] = {}
_JUDGES_LOCK = threading.Lock()


def _shared_judge(url: str, model: str, concurrency: int) -> _SharedJudge:
    """This process's ``_SharedJudge`` of an endpoint; its concurrency is the latest client's
    (one run gives every evaluation the same ``judge_concurrency``)."""
    with _JUDGES_LOCK:
        judge = _JUDGES.get((url, model))
        if judge is None or judge.concurrency != concurrency:
            judge = _JUDGES[(url, model)] = _SharedJudge(concurrency)
        return judge


def api_key(env: str) -> str:
    """The judge's key from environment variable ``env`` ("" when unset). A secret mounted with
    its trailing newline is the same key: sent as is, httpx refused it as an illegal header,
    it was retried as a network error, and a debug log showed it."""
    return (os.environ.get(env) or "").strip()


def missing_key(cfg: Any) -> str | None:
    """Why grading under evaluate section ``cfg`` would fail at its first request: OpenAI's
    API with no key in the environment variable the config names (a local judge may need
    none: not said). Checked when a run starts, not after hours of answers on the GPU."""
    from urllib.parse import urlsplit

    if not cfg.mt_bench or not cfg.judge_api_key_env:
        return None
    try:
        host = urlsplit(cfg.judge_base_url).hostname or ""
    except ValueError:
        return None
    openai = host == "openai.com" or host.endswith(".openai.com")
    if not openai or api_key(cfg.judge_api_key_env):
        return None
    return (f"evaluate.judge_api_key_env: {cfg.judge_api_key_env} is not set in this process's environment, and "
            f"{host} answers a request without a key with 401 (set it where the run runs: a worker's "
            f"environment, a Kubernetes secret)")


class JudgeClient:
    """An async chat-completions client with a concurrency limit and retries.

    Use ``async with JudgeClient(settings) as client: await client.complete(messages)``.

    The budget: each request gets ``timeout_s`` in all (a judge that trickles bytes is
    cut too), at most ``max_retries`` retries, a ``Retry-After`` honoured up to
    ``retry_after_max_s``, and everything after ``deadline_s`` (counted from entering
    the client) fails at once. Every wait before a retry is announced on ``progress``.
    """

    def __init__(self, settings: JudgeSettings, progress: Callable[[str], None] | None = None):
        self.settings = settings
        self._say = progress or log.info
        self._deadline: float | None = None
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        key = api_key(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not key:
            # A local server often needs no key; OpenAI will answer 401, reported as such.
            log.warning("judge: environment variable %s is not set; sending no API key", settings.api_key_env)
        self._secret = key or None
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        # shared by every client of this process asking the same judge (evaluations run side by
        # side, one event loop each): the API's limits are the key's, not one evaluation's
        self._judge = _shared_judge(self.url, settings.model, settings.concurrency)
        self._client: Any = None
        # OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...) refuse ``max_tokens`` and take the
        # same limit as ``max_completion_tokens``; the first such 400 switches this client over.
        self.max_tokens_field = "max_tokens"
        # and refuse any temperature but their own (1): the first such 400 stops sending it
        self.send_temperature = True
        self.requests = 0
        self.retries = 0
        self.refusals = 0  # answers no retry changes (401, 404, a bad request)
        self.out_of_time = False  # judge_deadline_s passed

    def __repr__(self) -> str:  # never the headers
        return f"JudgeClient({self.url!r}, model={self.settings.model!r})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    async def __aenter__(self) -> JudgeClient:
        import httpx

        limits = httpx.Limits(max_connections=self.settings.concurrency)
        self._client = httpx.AsyncClient(timeout=self.settings.timeout_s, limits=limits)
        if self.settings.deadline_s is not None:
            self._deadline = time.monotonic() + self.settings.deadline_s
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.aclose()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** attempt)
        return random.uniform(cap / 2, cap)

    def _left(self) -> float:
        """Seconds left before the deadline (inf without one)."""
        return float("inf") if self._deadline is None else self._deadline - time.monotonic()

    def _past_deadline(self, last: str) -> JudgeError:
        # Not transient: the budget is spent on purpose; asking again is a new run's decision.
        self.out_of_time = True
        return JudgeError(self._scrub(f"judge {self.url}: deadline of {self.settings.deadline_s:g} s "
                                      f"(evaluate.judge_deadline_s) passed; last: {last}"))

    async def complete(self, messages: Sequence[dict[str, str]]) -> str:
        """The judge's reply text; retries 429/5xx/timeouts with backoff, honouring the server's
        wait (``retry-after-ms``, ``Retry-After``, on a 429 OpenAI's ``x-ratelimit-reset-*``).

        A rate limit (429) is the API asking for patience, not a failure: it uses up no retry
        while ``deadline_s`` lasts (without one, at most ``RATE_LIMIT_RETRIES_PER_RETRY`` times
        ``max_retries``), and pauses every request this process sends that judge until the
        wait is over (``_SharedJudge``), so the others stop asking too. A GPT-4 tokens-per-minute
        limit lasts minutes: counted as failures, six 429s in about a minute failed the
        evaluation and the run. A 429 for
        an exhausted quota (``insufficient_quota``) is an answer no wait changes."""
        import httpx

        s = self.settings
        last = "no attempt"
        attempt = limited = 0
        attempts = s.max_retries + 1
        while True:
            wait: float | None = None
            rate_limited = False
            async with self._judge.slot():
                if (pause := self._judge.resume_at - time.monotonic()) > 0:
                    await asyncio.sleep(min(pause, max(self._left(), 0.0)))
                if self._left() <= 0:
                    raise self._past_deadline(last)
                try:
                    resp, body = await self._post(messages)
                    for _ in range(2):  # a refused parameter is renamed or dropped, asked at once: no retry
                        if "max_tokens" in body and _rejects_max_tokens(resp):
                            if self.max_tokens_field == "max_tokens":
                                log.info("judge: %s refuses max_tokens; sending max_completion_tokens", s.model)
                            self.max_tokens_field = "max_completion_tokens"
                        elif "temperature" in body and _rejects_temperature(resp):
                            if self.send_temperature:
                                log.warning("judge: %s takes no temperature but its own: verdicts are sampled, "
                                            "not greedy", s.model)
                            self.send_temperature = False
                        else:
                            break
                        resp, body = await self._post(messages)
                except TimeoutError:
                    if self._left() <= 0:
                        raise self._past_deadline(f"no reply in {s.timeout_s:g} s") from None
                    last = f"no reply in {s.timeout_s:g} s (evaluate.judge_timeout_s)"
                except httpx.LocalProtocolError as exc:  # the request itself cannot be sent
                    self.refusals += 1
                    raise JudgeError(self._scrub(f"judge {self.url}: the request cannot be sent "
                                                 f"({type(exc).__name__}): is {s.api_key_env}'s value a "
                                                 f"well-formed key?")) from None
                except httpx.TransportError as exc:  # connection refused, reset, timeout
                    last = f"{type(exc).__name__}"
                else:
                    if resp.status_code == 200:
                        try:
                            return _reply_text(resp.json())
                        except (ValueError, KeyError, IndexError, TypeError):
                            last = "HTTP 200 with a body that is not a chat completion"
                    elif resp.status_code == 429 and _error_code(resp) == "insufficient_quota":
                        self.refusals += 1
                        raise JudgeError(self._scrub(
                            f"judge {self.url}: HTTP 429: {_error_message(resp)} (the quota is spent: no wait "
                            f"changes that)"))
                    elif resp.status_code in RETRY_STATUS:
                        last = f"HTTP {resp.status_code}"
                        rate_limited = resp.status_code == 429
                        wait = _server_wait(resp.headers, rate_limited)
                        if wait is not None and wait > s.retry_after_max_s:
                            last += f" (asked to wait {wait:g} s, capped at {s.retry_after_max_s:g} s)"
                            wait = s.retry_after_max_s
                    else:
                        self.refusals += 1
                        raise JudgeError(self._scrub(
                            f"judge {self.url}: HTTP {resp.status_code}: {_error_message(resp)}"))
            if rate_limited and (self._deadline is not None or limited < RATE_LIMIT_RETRIES_PER_RETRY * attempts):
                limited += 1
                # the server's wait, but never less than half the backoff so far: a proxy saying
                # "Retry-After: 0" to every request would otherwise be asked in a tight loop
                floor = min(s.backoff_max_s, s.backoff_base_s * 2 ** min(limited - 1, 16)) / 2
                delay = max(wait, floor) if wait is not None else self._backoff(min(limited - 1, 16))
                counted = f"rate limited ({limited}), no retry used"
            else:
                if attempt == s.max_retries:
                    break
                attempt += 1
                delay = wait if wait is not None else self._backoff(attempt - 1)
                counted = f"attempt {attempt + 1}/{attempts} (retry {attempt}/{s.max_retries})"
            self.retries += 1
            if delay >= self._left():
                raise self._past_deadline(last)
            if rate_limited:  # every request to this judge waits it out, not this one alone
                self._judge.pause_until(time.monotonic() + delay)
            why = "the server's wait" if wait is not None else "backoff"
            self._say(self._scrub(f"judge: {last}; waiting {delay:.1f} s for judge ({why}), {counted}"))
            await asyncio.sleep(delay)
        raise JudgeError(self._scrub(f"judge {self.url}: {last} after {attempts} attempts"), transient=True)

    async def _post(self, messages: Sequence[dict[str, str]]) -> tuple[Any, dict[str, Any]]:
        """One request; also the body it sent."""
        s, field = self.settings, self.max_tokens_field
        body = {"model": s.model, "messages": list(messages), field: s.max_tokens}
        if self.send_temperature:
            body["temperature"] = s.temperature
        self.requests += 1
        # The whole exchange, not httpx's per-read timeout: a judge that sends a byte a
        # minute would never trip that one. The deadline cuts a request short as well.
        limit = min(s.timeout_s, max(self._left(), 0.0))
        post = self._client.post(self.url, json=body, headers=self._headers)
        return await asyncio.wait_for(post, limit), body


def _rejects_max_tokens(resp: Any) -> bool:
    """A 400 saying the model does not support ``max_tokens`` (OpenAI: "Unsupported parameter:
    'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.")."""
    if resp.status_code != 400:
        return False
    text = _error_message(resp)
    said = text.lower()
    return "max_tokens" in text and ("max_completion_tokens" in text or "unsupported" in said
                                     or "not supported" in said)


def _rejects_temperature(resp: Any) -> bool:
    """A 400 saying the model takes no other temperature (OpenAI: "Unsupported value:
    'temperature' does not support 0.0 with this model. Only the default (1) value is supported.")."""
    if resp.status_code != 400:
        return False
    said = _error_message(resp).lower()
    return "temperature" in said and ("unsupported" in said or "not support" in said or "only the default" in said)


def _reply_text(payload: dict) -> str:
    content = payload["choices"][0]["message"]["content"]
    if not isinstance(content, str):
        raise TypeError("content is not text")
    return content


def _error(resp: Any) -> Any:
    """The body's ``error`` (OpenAI's: a dict with ``message`` and ``code``; some servers: a
    string), or None."""
    try:
        return resp.json().get("error")
    except (ValueError, AttributeError):
        return None


def _error_message(resp: Any) -> str:
    err = _error(resp)
    msg = err.get("message") if isinstance(err, dict) else err
    text = str(msg or resp.text or "").strip().replace("\n", " ")
    return text[:200] or "(empty body)"


def _error_code(resp: Any) -> str | None:
    """OpenAI's ``error.code`` (``insufficient_quota``, ``rate_limit_exceeded``), if any."""
    err = _error(resp)
    return err.get("code") if isinstance(err, dict) else None


# -- grading ---------------------------------------------------------------------

def judge_prompt_name(category: str, turn: int) -> str:
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return name + ("-multi-turn" if turn == 2 else "")


def judge_messages(data: MTBenchData, q: Question, answer_turns: Sequence[str], turn: int) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) for grading turn 1 or 2 of one answer, as FastChat builds them."""
    name = judge_prompt_name(q.category, turn)
    if name not in data.judge_prompts:
        raise JudgeError(f"judge prompts file {data.sources.get('judge_prompts')}: no prompt named {name!r}")
    prompt = data.judge_prompts[name]
    kwargs: dict[str, str] = {}
    if q.category in NEED_REF_CATS:
        ref = data.references[q.question_id]
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1] if len(ref) > 1 else ""
    if turn == 1:
        user = prompt.prompt_template.format(question=q.turns[0], answer=answer_turns[0], **kwargs)
    else:
        user = prompt.prompt_template.format(question_1=q.turns[0], question_2=q.turns[1],
                                             answer_1=answer_turns[0], answer_2=answer_turns[1], **kwargs)
    return name, [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


@dataclass
class Judgment:
    question_id: int
    category: str
    turn: int
    judge_prompt: str
    judge_model: str
    status: str  # "ok", "unparsable" (counted, not scored) or "failed" (no reply)
    score: float | None = None
    verdict: str | None = None
    error: str | None = None
    answer_digest: str | None = None  # which answer was graded: a changed answer is graded again
    # given by a judge that refused temperature 0 (o-series, gpt-5): sampled, not greedy
    sampled: bool = False


def _record(j: Judgment) -> dict[str, Any]:
    """A judgment as stored: ``sampled`` only where true, so a greedy verdict is stored as
    before the field existed."""
    return {k: v for k, v in asdict(j).items() if k != "sampled" or v}


def answer_digest(answer: dict) -> str:
    return hashlib.sha256(json.dumps(answer["choices"][0]["turns"]).encode()).hexdigest()[:16]


def judgment_address(judgments_address: str, qid: int) -> str:
    return f"{judgments_address}/judgment-{qid:04d}"


def judgment_file(qid: int) -> str:
    return f"judgment-{qid:04d}.json"


async def _grade_question(client: JudgeClient, data: MTBenchData, q: Question, answer: dict,
                          kept: dict[int, Judgment] | None = None) -> list[Judgment]:
    """Both turns' judgments; a turn in ``kept`` (graded by an earlier attempt) is not asked again."""
    turns = answer["choices"][0]["turns"]

    async def one(turn: int) -> Judgment:
        if kept and turn in kept:
            return kept[turn]
        name, messages = judge_messages(data, q, turns, turn)
        j = Judgment(q.question_id, q.category, turn, name, client.settings.model, "failed",
                     answer_digest=answer_digest(answer))
        try:
            j.verdict = await client.complete(messages)
        except JudgeError as exc:
            j.error = str(exc)
            return j
        # once the judge refused a temperature, no request of this client carries one
        j.sampled = not client.send_temperature
        j.score = parse_rating(j.verdict)
        j.status = "ok" if j.score is not None else "unparsable"
        return j

    return list(await asyncio.gather(one(1), one(2)))


def grade_answers(store: ArtifactStore, judgments_address: str, data: MTBenchData, answers: Sequence[dict],
                  settings: JudgeSettings, *, max_failures: int = 0,
                  progress: Callable[[str], None] | None = None,
                  on_count: Callable[[int, int], None] | None = None,
                  earlier: Sequence[str] = ()) -> list[Judgment]:
    """Grade every answer (both turns), reusing judgments saved under ``judgments_address``
    (``plan.mt_bench_judgments_address``) by an earlier attempt or evaluation.

    A question is saved as soon as one of its judgments came back (scored or unparsable);
    a turn whose request failed is saved as failed, and the next attempt asks for it
    alone (a graded turn is never bought twice). More
    than ``max_failures`` failed requests fail the call after the rest are saved.
    ``on_count(done, total)``: questions done (graded now or by an earlier attempt, or failed
    after every retry) of all, called from a thread of its own with the caller's context and no event loop running,
    as a synchronous caller's callback expects (a Prefect progress artifact needs both).
    ``earlier``: where older versions kept a question's verdicts (``plan.earlier_judgments``):
    one found there for the same answer is copied here instead of being bought again.
    """
    return _run(_grade_all(store, judgments_address, data, answers, settings, max_failures, progress, on_count,
                           earlier))


async def _grade_all(store: ArtifactStore, address: str, data: MTBenchData, answers: Sequence[dict],
                     settings: JudgeSettings, max_failures: int,
                     progress: Callable[[str], None] | None,
                     on_count: Callable[[int, int], None] | None = None,
                     earlier: Sequence[str] = ()) -> list[Judgment]:
    say = progress or log.info
    found: dict[int, list[Judgment]] = {}
    kept: dict[int, dict[int, Judgment]] = {}  # a question's turns graded, where another one failed
    todo, moved = [], 0
    for ans in answers:
        qid = ans["question_id"]
        for at, prefix in enumerate([address, *earlier]):
            addr = judgment_address(prefix, qid)
            if not store.is_complete(addr):
                continue
            saved = [Judgment(**r) for r in store.read_json(addr, judgment_file(qid))]
            if any(j.answer_digest != answer_digest(ans) for j in saved):
                continue
            if at:  # an older version's place: kept here from now on
                await asyncio.to_thread(_save, store, address, qid, saved)
                moved += 1
            if all(j.status != "failed" for j in saved):
                found[qid] = saved
            else:
                kept[qid] = {j.turn: j for j in saved if j.status != "failed"}
            break
        if qid not in found:
            todo.append(ans)
    if moved:
        say(f"judge: {moved} questions' verdicts found where an earlier version kept them; not bought again")
    if found:
        say(f"judge: {len(found)} questions already graded, {len(todo)} to grade")
    done, total = len(found), len(answers)
    counted = asyncio.Lock()  # one count at a time, in order: a bar never steps back

    async def count(step: int) -> None:
        nonlocal done
        async with counted:
            done += step
            if on_count is not None:
                await asyncio.to_thread(on_count, done, total)

    await count(0)
    async with JudgeClient(settings, progress=say) as client:
        async def grade(ans: dict) -> None:
            q = data.question(ans["question_id"])
            before = kept.get(q.question_id, {})
            js = await _grade_question(client, data, q, ans, before)
            found[q.question_id] = js
            # saved as soon as one turn came back: a turn graded is never bought again, only
            # the one whose request failed is asked on the next attempt
            if any(j.status != "failed" and j.turn not in before for j in js):
                await asyncio.to_thread(_save, store, address, q.question_id, js)
            await count(1)

        t0 = time.time()
        await asyncio.gather(*(grade(a) for a in todo))
        if todo:
            say(f"judge: graded {len(todo)} questions in {time.time() - t0:.1f} s "
                f"({client.requests} requests, {client.retries} retries)")
    out = [j for a in answers for j in found[a["question_id"]]]
    failed = [j for j in out if j.status == "failed"]
    unparsable = sum(j.status == "unparsable" for j in out)
    if unparsable:
        log.warning("judge: %d verdicts had no parsable rating; they are counted and left out of the means",
                    unparsable)
    if len(failed) > max_failures:
        raise JudgeError(f"{len(failed)} judge requests failed (allowed: {max_failures}); first: {failed[0].error}",
                         transient=client.refusals == 0 and not client.out_of_time)
    return out


def _save(store: ArtifactStore, address: str, qid: int, js: list[Judgment]) -> None:
    # replace: a question's stored verdicts are graded again when its answer changed
    with store.writer(judgment_address(address, qid), meta={"stage": "evaluate", "question_id": qid},
                      replace=True) as w:
        w.write_json(judgment_file(qid), [_record(j) for j in js])


def _run(coro: Coroutine) -> Any:
    """Run a coroutine from sync code, also when the caller already has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    # the caller's context goes along (a Prefect task's run context, for its progress artifacts)
    t = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="fusechat-judge")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def summarise(judgments: Sequence[Judgment]) -> dict[str, Any]:
    """FastChat's show_result: means over scored judgments, per category, per turn and overall."""
    scored = [j for j in judgments if j.status == "ok"]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    cats = sorted({j.category for j in judgments})
    sampled = sum(j.sampled for j in scored)
    return {
        # verdicts of a judge that took no temperature 0: said, where there are any
        **({"sampled": sampled} if sampled else {}),
        "average": mean([j.score for j in scored]),
        "turn_1": mean([j.score for j in scored if j.turn == 1]),
        "turn_2": mean([j.score for j in scored if j.turn == 2]),
        "categories": {c: mean([j.score for j in scored if j.category == c]) for c in cats},
        "judgments": len(judgments),
        "scored": len(scored),
        "unparsable": sum(j.status == "unparsable" for j in judgments),
        "failed": sum(j.status == "failed" for j in judgments),
        # per question, both turns together: the unit the report's intervals resample
        "questions": _per_question(judgments),
    }


def _per_question(judgments: Sequence[Judgment]) -> dict[str, list]:
    """Columns over questions (in first-seen order): id, category, the sum of the scored
    turns' scores and how many turns were scored."""
    order: dict[int, list] = {}
    for j in judgments:
        row = order.setdefault(j.question_id, [j.category, 0.0, 0])
        if j.status == "ok":
            row[1] += float(j.score)  # type: ignore[arg-type]
            row[2] += 1
    return {"id": list(order), "category": [r[0] for r in order.values()],
            "score_sum": [r[1] for r in order.values()], "scored": [r[2] for r in order.values()]}


def judgments_jsonl(judgments: Sequence[Judgment]) -> bytes:
    return "".join(json.dumps(_record(j), ensure_ascii=False, sort_keys=True) + "\n" for j in judgments).encode()
