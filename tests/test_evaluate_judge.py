"""The judge client over real HTTP: a chat-completions server on 127.0.0.1 with scripted replies."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fusechat_core.evaluate.judge import (
    JudgeClient,
    JudgeError,
    JudgeSettings,
    grade_answers,
    judgment_address,
    parse_rating,
    summarise,
)
from fusechat_core.evaluate.mt_bench import load_mt_bench
from fusechat_core.store import ArtifactStore

SECRET = "sk-test-7f3a9c1e55d04b2e8a6b"
HELPFUL = "You are a helpful assistant."  # FastChat's system prompt of the turn-1 single prompts
# what api.openai.com answers an o-series/gpt-5 request that sends max_tokens
UNSUPPORTED_MAX_TOKENS = {"error": {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
               "Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}


UNSUPPORTED_TEMPERATURE = {"error": {
    "message": "Unsupported value: 'temperature' does not support 0.0 with this model. Only the default (1) "
               "value is supported.", "type": "invalid_request_error", "param": "temperature",
    "code": "unsupported_value"}}


class JudgeServer:
    """An OpenAI-compatible /v1/chat/completions endpoint with per-(question, turn) scripts.

    A script is a list of replies used in order (the last one repeats): a string is a
    200 completion with that content; a tuple is (status, headers, body); a float is a
    judge that hangs that many seconds (or until the server stops) and then answers.
    """

    def __init__(self, questions: dict[str, int]):
        self.questions = questions  # first-turn text -> question id
        self.scripts: dict[tuple[int, int], list[Any]] = {}
        self.default: Any = "The answer is fine. Rating: [[5]]"
        self.reasoning = False  # answer as OpenAI's o-series do to a request that sends max_tokens
        self.log: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0  # requests being answered now, and the most at once
        # set: every request waits for it (up to gate_timeout s, then a 503) before its answer
        self.gate: threading.Event | None = None
        self.gate_timeout = 120.0
        self.gate_timeouts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            wbufsize = 1 << 16  # one send per response: unbuffered writes meet delayed ACKs

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict) -> None:
                reply = server._reply(self.path, dict(self.headers), body)
                if server.gate is not None and not server.gate.wait(server.gate_timeout):
                    with server._lock:
                        server.gate_timeouts += 1
                    reply = (503, {}, {"error": {"message": "the test's gate never opened"}})
                if isinstance(reply, float):
                    if server._stopping.wait(reply):
                        return  # the server stops: the connection closes unanswered
                    reply = server._completion(body, server.default)
                status, headers, payload = reply
                data = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _reply(self, path: str, headers: dict, body: dict) -> tuple[int, dict, Any]:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        turn = 1 if system == HELPFUL else 2
        qid = next((q for text, q in self.questions.items() if text in user), -1)
        with self._lock:
            self.log.append({"t": time.monotonic(), "path": path, "auth": headers.get("Authorization"),
                             "qid": qid, "turn": turn, "body": body})
            if self.reasoning and "max_tokens" in body:
                return 400, {}, UNSUPPORTED_MAX_TOKENS
            if self.reasoning and body.get("temperature", 1) != 1:
                return 400, {}, UNSUPPORTED_TEMPERATURE
            script = self.scripts.get((qid, turn))
            item = (script.pop(0) if len(script) > 1 else script[0]) if script else self.default
        if isinstance(item, str):
            return self._completion(body, item)
        return item

    @staticmethod
    def _completion(body: dict, content: str) -> tuple[int, dict, Any]:
        return 200, {}, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]}

    def requests(self, qid: int, turn: int) -> list[dict]:
        return [r for r in self.log if r["qid"] == qid and r["turn"] == turn]

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def mt_data(mt_bench_dir: Path):
    return load_mt_bench(str(mt_bench_dir))


@pytest.fixture
def judge_server(mt_data):
    with JudgeServer({q.turns[0]: q.question_id for q in mt_data.questions}) as server:
        yield server


def _answers(qids: list[int]) -> list[dict]:
    return [{"question_id": q, "model_id": "m", "choices": [{"index": 0, "turns": [f"first answer to {q}",
                                                                                  f"second answer to {q}"]}]}
            for q in qids]


def _settings(server: JudgeServer, **kw: Any) -> JudgeSettings:
    base = dict(base_url=server.url, model="judge-7b", api_key_env="FUSECHAT_TEST_JUDGE_KEY", concurrency=3,
                max_retries=3, backoff_base_s=0.02, backoff_max_s=0.1, timeout_s=10)
    return JudgeSettings(**{**base, **kw})


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller")


class _Counts:
    """An ``on_count`` that records (done, total, the caller's context, an event loop running)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str | None, bool]] = []

    def __call__(self, done: int, total: int) -> None:
        try:
            asyncio.get_running_loop()
            loop = True
        except RuntimeError:
            loop = False
        self.seen.append((done, total, _CALLER.get(None), loop))


def test_parse_rating_follows_fastchat_rule():
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("explanation [[8.5]] then [[2]]") == 8.5  # the first double-bracket wins
    assert parse_rating("see [3] ... Rating: [[9]]") == 9.0  # [[x]] is tried before [x]
    assert parse_rating("Rating: [6]") == 6.0
    assert parse_rating("Rating: 7/10") is None
    assert parse_rating("Rating: [[11]]") is None  # outside 1..10 is not a rating
    assert parse_rating("Rating: [[0]]") is None
    assert parse_rating("") is None


def test_grading_over_http(judge_server, mt_data, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    s = judge_server
    # writing 81: 429 with Retry-After 1 s, then [[7]]; turn 2 a 500 then [[8]]
    s.scripts[(81, 1)] = [(429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}), "Rating: [[7]]"]
    s.scripts[(81, 2)] = [(500, {}, {"error": "boom"}), "Rating: [[8]]"]
    # writing 82: the [x] fallback, and a verdict with no rating at all
    s.scripts[(82, 1)] = ["I would say [9] overall."]
    s.scripts[(82, 2)] = ["A fine answer, I give it a good score."]
    # reasoning 101 (graded with the reference answer): 3.5 and 2; a malformed 200 body first
    s.scripts[(101, 1)] = [(200, {}, b"{not json"), "Rating: [[3.5]]"]
    s.scripts[(101, 2)] = ["Rating: [[2]]"]
    # math 111: an out-of-range verdict counts as unparsable
    s.scripts[(111, 1)] = ["Rating: [[15]]"]
    s.scripts[(111, 2)] = ["Rating: [[4]]"]
    store = ArtifactStore(str(tmp_path / "store"))
    qids = [81, 82, 101, 111]
    counts, token = _Counts(), _CALLER.set("the caller")
    try:
        js = grade_answers(store, "evaluate/m-1", mt_data, _answers(qids), _settings(s), on_count=counts)
    finally:
        _CALLER.reset(token)
    got = {(j.question_id, j.turn): (j.status, j.score) for j in js}
    assert got == {(81, 1): ("ok", 7.0), (81, 2): ("ok", 8.0), (82, 1): ("ok", 9.0), (82, 2): ("unparsable", None),
                   (101, 1): ("ok", 3.5), (101, 2): ("ok", 2.0), (111, 1): ("unparsable", None),
                   (111, 2): ("ok", 4.0)}
    summary = summarise(js)
    assert summary["categories"] == {"writing": (7 + 8 + 9) / 3, "reasoning": (3.5 + 2) / 2, "math": 4.0}
    assert summary["average"] == pytest.approx((7 + 8 + 9 + 3.5 + 2 + 4) / 6)
    assert summary["turn_1"] == pytest.approx((7 + 9 + 3.5) / 3)
    assert (summary["unparsable"], summary["failed"], summary["scored"]) == (2, 0, 6)

    # retries happened, and the 429's Retry-After was honoured
    r81 = s.requests(81, 1)
    assert len(r81) == 2 and r81[1]["t"] - r81[0]["t"] >= 0.95
    assert len(s.requests(81, 2)) == 2 and len(s.requests(101, 1)) == 2
    # the right prompt per category and turn, FastChat's request shape
    ref101 = mt_data.references[101]
    b1, b2 = s.requests(101, 1)[-1]["body"], s.requests(101, 2)[-1]["body"]
    assert "[The Start of Reference Answer]\n" + ref101[0] in b1["messages"][1]["content"]
    assert "### Reference answer:\n" + ref101[1] in b2["messages"][1]["content"]
    assert "second answer to 101" in b2["messages"][1]["content"]
    w1 = s.requests(81, 1)[-1]["body"]
    assert "Reference" not in w1["messages"][1]["content"] and "first answer to 81" in w1["messages"][1]["content"]
    assert (w1["model"], w1["temperature"]) == ("judge-7b", 0.0)
    # a judge that takes max_tokens is never sent anything else
    assert all(r["body"]["max_tokens"] == 2048 and "max_completion_tokens" not in r["body"] for r in s.log)
    assert all(r["path"] == "/v1/chat/completions" for r in s.log)
    # the key travels only in the Authorization header
    assert all(r["auth"] == f"Bearer {SECRET}" for r in s.log)
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text
    assert "retry" in caplog.text  # retries are logged (without the key)
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f

    # progress, questions graded of all, one question at a time and in order, to the caller's
    # context on a thread with no event loop (where a Prefect progress artifact can be posted)
    assert counts.seen == [(n, 4, "the caller", False) for n in range(5)]

    # graded questions are saved one by one: a second call asks nothing. Called from a running
    # event loop (as from an async task), its progress still reaches the caller's context.
    before = len(s.log)

    async def from_a_loop() -> list:
        _CALLER.set("an async caller")
        return grade_answers(store, "evaluate/m-1", mt_data, _answers(qids), _settings(s), on_count=counts)

    counts.seen.clear()
    again = asyncio.run(from_a_loop())
    assert counts.seen == [(4, 4, "an async caller", False)]
    assert len(s.log) == before
    assert [(j.question_id, j.turn, j.score) for j in again] == [(j.question_id, j.turn, j.score) for j in js]


def test_failures_are_counted_and_resumed(judge_server, mt_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    s = judge_server
    s.scripts[(83, 2)] = [(503, {}, {"error": "overloaded"})]  # never recovers
    store = ArtifactStore(str(tmp_path / "store"))
    settings = _settings(s, max_retries=2)
    with pytest.raises(JudgeError, match=r"1 judge requests failed .*HTTP 503 after 3 attempts"):
        grade_answers(store, "evaluate/m-2", mt_data, _answers([81, 83, 84]), settings)
    assert len(s.requests(83, 2)) == 3
    assert store.is_complete(judgment_address("evaluate/m-2", 81))
    # question 83 is kept with its graded turn and its failed one (a paid verdict is not lost)
    saved = store.read_json(judgment_address("evaluate/m-2", 83), "judgment-0083.json")
    assert [(j["turn"], j["status"]) for j in saved] == [(1, "ok"), (2, "failed")]
    # tolerated failures are reported, not hidden
    js = grade_answers(store, "evaluate/m-2", mt_data, _answers([81, 83, 84]), settings, max_failures=1)
    assert summarise(js)["failed"] == 1 and summarise(js)["scored"] == 5
    # once the judge recovers, only the turn that failed is asked again (its question's other
    # turn was paid for already); progress starts from the questions already graded
    s.scripts[(83, 2)] = ["Rating: [[6]]"]
    before = {(q, t): len(s.requests(q, t)) for q in (81, 83, 84) for t in (1, 2)}
    counts = _Counts()
    js = grade_answers(store, "evaluate/m-2", mt_data, _answers([81, 83, 84]), settings, on_count=counts)
    assert [c[:2] for c in counts.seen] == [(2, 3), (3, 3)]
    after = {(q, t): len(s.requests(q, t)) for q in (81, 83, 84) for t in (1, 2)}
    assert {k: after[k] - before[k] for k in after} == {(81, 1): 0, (81, 2): 0, (83, 1): 0, (83, 2): 1,
                                                        (84, 1): 0, (84, 2): 0}
    assert summarise(js)["failed"] == 0 and summarise(js)["scored"] == 6
    # a changed answer (its question was answered again) is graded again; the others are not
    changed = _answers([81, 83, 84])
    changed[2]["choices"][0]["turns"][1] = "a new second answer"
    before = len(s.log)
    grade_answers(store, "evaluate/m-2", mt_data, changed, settings)
    assert [(r["qid"], r["turn"]) for r in s.log[before:]] in ([(84, 1), (84, 2)], [(84, 2), (84, 1)])


def test_client_errors_fail_fast_and_never_show_the_key(judge_server, monkeypatch, caplog):
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    s = judge_server
    s.default = (401, {}, {"error": {"message": f"Incorrect API key provided: {SECRET}"}})
    import asyncio

    async def ask() -> str:
        async with JudgeClient(_settings(s)) as client:
            assert SECRET not in repr(client)
            return await client.complete([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])

    with pytest.raises(JudgeError) as err:
        asyncio.run(ask())
    assert "HTTP 401" in str(err.value) and "***" in str(err.value) and SECRET not in str(err.value)
    assert len(s.log) == 1  # a 401 is not retried
    assert SECRET not in caplog.text


def test_reasoning_model_gets_max_completion_tokens_after_its_400(judge_server, mt_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    s = judge_server
    s.reasoning = True
    import asyncio

    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]

    async def ask(n: int) -> tuple[list[str], JudgeClient]:
        async with JudgeClient(_settings(s, model="o3-mini", max_tokens=777)) as client:
            return [await client.complete(messages) for _ in range(n)], client

    replies, client = asyncio.run(ask(3))
    assert replies == ["The answer is fine. Rating: [[5]]"] * 3
    # refused for max_tokens, then for its temperature of 0, each asked again at once (no retry);
    # the client then sends the new name and no temperature only
    sent = [r["body"] for r in s.log]
    assert [("max_tokens" in b, b.get("max_completion_tokens"), b.get("temperature")) for b in sent] == [
        (True, None, 0.0), (False, 777, 0.0)] + [(False, 777, None)] * 3
    assert (client.requests, client.retries, client.max_tokens_field) == (5, 0, "max_completion_tokens")
    assert client.send_temperature is False

    # end to end with concurrent requests: every answer is graded, each at most one 400 away
    js = grade_answers(ArtifactStore(str(tmp_path / "store")), "evaluate/o3", mt_data, _answers([81, 82, 101]),
                       _settings(s, model="o3-mini"))
    assert [(j.status, j.score) for j in js] == [("ok", 5.0)] * 6
    graded = s.log[len(sent):]
    refused = sum("max_tokens" in r["body"] for r in graded)
    assert 1 <= refused <= 3  # at most one per request in flight when the first 400 came back
    # every request that carried a refused parameter was refused; the six verdicts came from
    # requests with neither, and each request in flight met each refusal at most once
    carried = sum("max_tokens" in r["body"] or "temperature" in r["body"] for r in graded)
    assert len(graded) - carried == 6 and carried <= 2 * 3
    # the verdicts say they were sampled (no temperature 0), stored and summed so; a greedy
    # judge's are stored as before the field existed
    from fusechat_core.evaluate.judge import judgment_address, judgment_file, summarise

    assert all(j.sampled for j in js) and summarise(js)["sampled"] == 6
    stored = ArtifactStore(str(tmp_path / "store")).read_json(judgment_address("evaluate/o3", 81), judgment_file(81))
    assert [r["sampled"] for r in stored] == [True, True]
    s.reasoning = False
    greedy = grade_answers(ArtifactStore(str(tmp_path / "store")), "evaluate/gpt-4", mt_data, _answers([81]),
                           _settings(s, model="gpt-4"))
    assert not any(j.sampled for j in greedy) and "sampled" not in summarise(greedy)
    kept = ArtifactStore(str(tmp_path / "store")).read_json(judgment_address("evaluate/gpt-4", 81), judgment_file(81))
    assert all("sampled" not in r for r in kept)


def test_other_400s_about_max_tokens_still_fail_fast(judge_server, monkeypatch):
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    s = judge_server
    s.default = (400, {}, {"error": {"message": "max_tokens is too large: 99999. This model supports at most "
                                                "4096 completion tokens, whereas you provided 99999."}})
    import asyncio

    async def ask() -> str:
        async with JudgeClient(_settings(s, max_tokens=99999)) as client:
            return await client.complete([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])

    with pytest.raises(JudgeError, match="HTTP 400: max_tokens is too large"):
        asyncio.run(ask())
    assert len(s.log) == 1 and "max_tokens" in s.log[0]["body"]


def test_unreachable_judge_is_retried_then_reported(monkeypatch):
    import asyncio
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = JudgeSettings(base_url=f"http://127.0.0.1:{port}/v1", model="j", api_key_env=None,
                             max_retries=2, backoff_base_s=0.01, backoff_max_s=0.02)

    async def ask() -> JudgeClient:
        async with JudgeClient(settings) as client:
            with pytest.raises(JudgeError, match="ConnectError after 3 attempts"):
                await client.complete([{"role": "user", "content": "hi"}])
            return client

    client = asyncio.run(ask())
    assert client.requests == 3 and client.retries == 2


def test_bad_mt_bench_files_name_file_and_line(mt_bench_dir, tmp_path):
    from fusechat_core.evaluate.mt_bench import MTBenchDataError

    for name in ("question.jsonl", "reference_answer_gpt-4.jsonl", "judge_prompts.jsonl"):
        (tmp_path / name).write_bytes((mt_bench_dir / name).read_bytes())
    good = (mt_bench_dir / "question.jsonl").read_text().splitlines()
    (tmp_path / "question.jsonl").write_text("\n".join(good[:3] + ['{"question_id": 99, "category"'] + good[3:]))
    with pytest.raises(MTBenchDataError, match=r"question\.jsonl:4: not valid JSON"):
        load_mt_bench(str(tmp_path))
    one_turn = json.dumps({"question_id": 999, "category": "writing", "turns": ["only one"]})
    (tmp_path / "question.jsonl").write_text("\n".join(good[:2] + [one_turn]))
    with pytest.raises(MTBenchDataError, match=r"question\.jsonl:3: question 999 must have two non-empty turns"):
        load_mt_bench(str(tmp_path))
    (tmp_path / "question.jsonl").write_text("\n".join(good))
    refs = (mt_bench_dir / "reference_answer_gpt-4.jsonl").read_text().splitlines()
    (tmp_path / "reference_answer_gpt-4.jsonl").write_text("\n".join(r for r in refs if '"question_id": 111' not in r))
    with pytest.raises(MTBenchDataError, match=r"no reference answer for questions \[111\]"):
        load_mt_bench(str(tmp_path))
    with pytest.raises(MTBenchDataError, match="no such folder"):
        load_mt_bench(str(tmp_path / "missing"))


# -- the judge's budget ------------------------------------------------------------
MESSAGES = [{"role": "system", "content": HELPFUL}, {"role": "user", "content": "first answer to nothing"}]


def _ask(settings: JudgeSettings, lines: list[str]) -> tuple[str | JudgeError, float, JudgeClient]:
    """One complete() call: (reply or the JudgeError, seconds it took, the client)."""
    import asyncio

    async def ask() -> tuple[str | JudgeError, float, JudgeClient]:
        async with JudgeClient(settings, progress=lines.append) as client:
            t0 = time.monotonic()
            try:
                reply: str | JudgeError = await client.complete(MESSAGES)
            except JudgeError as exc:
                reply = exc
            return reply, time.monotonic() - t0, client

    return asyncio.run(ask())


def test_retry_after_is_capped_and_the_wait_announced(judge_server):
    s = judge_server
    s.scripts[(-1, 1)] = [(429, {"Retry-After": "100000"}, {"error": "slow down"}), "Rating: [[7]]"]
    lines: list[str] = []
    reply, took, _ = _ask(_settings(s, api_key_env=None, retry_after_max_s=0.3), lines)
    assert reply == "Rating: [[7]]" and took < 5  # not 100000 s, nor the old 600 s cap
    first, second = s.log
    assert second["t"] - first["t"] >= 0.29  # the capped wait was still honoured
    assert lines == ["judge: HTTP 429 (asked to wait 100000 s, capped at 0.3 s); waiting 0.3 s for judge "
                     "(the server's wait), rate limited (1), no retry used"]
    # an HTTP-date Retry-After a day ahead is capped the same way
    s.log.clear()
    s.scripts[(-1, 1)] = [(503, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, {"error": "x"}), "[[8]]"]
    reply, took, _ = _ask(_settings(s, api_key_env=None, retry_after_max_s=0.2), lines)
    assert reply == "[[8]]" and took < 5 and lines[-1].endswith(
        "waiting 0.2 s for judge (the server's wait), attempt 2/4 (retry 1/3)")


def test_a_hanging_judge_is_cut_by_the_timeout(judge_server):
    s = judge_server
    s.scripts[(-1, 1)] = [60.0]  # never answers in time
    lines: list[str] = []
    reply, took, client = _ask(_settings(s, api_key_env=None, timeout_s=0.3, max_retries=2), lines)
    assert isinstance(reply, JudgeError)
    assert "no reply in 0.3 s (evaluate.judge_timeout_s) after 3 attempts" in str(reply)
    assert 0.9 <= took < 4 and len(s.log) == 3 and client.retries == 2
    assert len(lines) == 2 and all("waiting" in x and "(backoff)" in x for x in lines)
    # a judge that answers within the timeout is not cut
    s.log.clear()
    s.scripts[(-1, 1)] = [0.05]
    reply, _, _ = _ask(_settings(s, api_key_env=None, timeout_s=5), [])
    assert reply == s.default and len(s.log) == 1


def test_the_deadline_ends_all_grading(judge_server, mt_data, tmp_path):
    s = judge_server
    s.default = 60.0  # every request hangs
    settings = _settings(s, api_key_env=None, timeout_s=30, max_retries=5, deadline_s=0.6)
    reply, took, _ = _ask(settings, [])
    assert isinstance(reply, JudgeError) and "deadline of 0.6 s (evaluate.judge_deadline_s) passed" in str(reply)
    assert 0.5 <= took < 3
    # a whole grading: every request in flight or waiting is cut at the deadline, the stage fails
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=r"8 judge requests failed .*deadline of 0.6 s") as err:
        grade_answers(ArtifactStore(str(tmp_path / "store")), "evaluate/d", mt_data, _answers([81, 82, 101, 111]),
                      settings)
    assert err.value.transient is False  # a spent budget is not retried by Prefect
    assert time.monotonic() - t0 < 3
    # a Retry-After that would end past the deadline fails at once instead of sleeping into it
    s.default = (429, {"Retry-After": "5"}, {"error": "later"})
    lines: list[str] = []
    reply, took, _ = _ask(_settings(s, api_key_env=None, retry_after_max_s=30, deadline_s=2), lines)
    assert isinstance(reply, JudgeError) and "deadline of 2 s" in str(reply) and "HTTP 429" in str(reply)
    assert took < 1 and lines == []


def test_budget_settings_come_from_the_config():
    from fusechat_core.config import EvaluateConfig

    cfg = EvaluateConfig(judge_timeout_s=7, judge_max_retries=1, judge_max_retry_after_s=3, judge_deadline_s=90)
    s = JudgeSettings.from_config(cfg)
    assert (s.timeout_s, s.max_retries, s.retry_after_max_s, s.deadline_s) == (7, 1, 3, 90)
    default = JudgeSettings.from_config(EvaluateConfig())
    assert default.retry_after_max_s == 60 and default.deadline_s == 4 * 3600
    assert JudgeSettings.from_config(EvaluateConfig(judge_deadline_s=None)).deadline_s is None


RATE_LIMITED = {"error": {"message": "Rate limit reached for gpt-4 on tokens per min", "code": "rate_limit_exceeded"}}


def test_a_rate_limit_uses_no_retry_and_pauses_every_request_of_the_client(judge_server, mt_data):
    """A GPT-4 tokens-per-minute limit lasts minutes: six 429s in about a minute failed the
    evaluation. A 429 uses up no retry while the deadline lasts, its wait comes from the
    server (retry-after-ms, or OpenAI's x-ratelimit-reset-*), and the client's other
    requests wait it out too instead of asking on."""
    s = judge_server
    other = [{"role": "system", "content": HELPFUL}, {"role": "user", "content": mt_data.questions[0].turns[0]}]
    s.scripts[(-1, 1)] = [(429, {"retry-after-ms": "300"}, RATE_LIMITED)] * 5 + ["Rating: [[7]]"]
    lines: list[str] = []

    async def both() -> tuple[str, str]:
        async with JudgeClient(_settings(s, api_key_env=None, max_retries=1, deadline_s=60),
                               progress=lines.append) as client:
            first = asyncio.ensure_future(client.complete(MESSAGES))
            await asyncio.sleep(0.1)  # the first 429 is in: the client is paused
            second = asyncio.ensure_future(client.complete(other))
            return await first, await second

    reply, later = asyncio.run(both())
    assert reply == "Rating: [[7]]" and later == s.default
    mine = [r["t"] for r in s.log if r["qid"] == -1]
    assert len(mine) == 6  # five 429s and the reply: none failed on max_retries 1
    waits = [b - a for a, b in zip(mine, mine[1:])]
    assert all(w >= 0.29 for w in waits), waits  # each 300 ms wait honoured
    [theirs] = [r["t"] for r in s.log if r["qid"] != -1]
    assert theirs >= mine[0] + 0.29  # asked 0.1 s after the first 429, it waited the pause out
    assert lines[0].endswith("waiting 0.3 s for judge (the server's wait), rate limited (1), no retry used")

    # no Retry-After: OpenAI's reset headers say how long (the later of the two)
    s.log.clear()
    s.scripts[(-1, 1)] = [(429, {"x-ratelimit-reset-requests": "20ms", "x-ratelimit-reset-tokens": "400ms"},
                           RATE_LIMITED), "[[6]]"]
    reply, _, _ = _ask(_settings(s, api_key_env=None), lines)
    assert reply == "[[6]]" and s.log[1]["t"] - s.log[0]["t"] >= 0.39
    assert "waiting 0.4 s for judge (the server's wait)" in lines[-1]

    # a proxy that says "wait 0" to every 429 is not asked in a tight loop: the waits grow
    s.log.clear()
    s.scripts[(-1, 1)] = [(429, {"Retry-After": "0"}, RATE_LIMITED)] * 6 + ["[[4]]"]
    reply, _, _ = _ask(_settings(s, api_key_env=None, backoff_base_s=0.05, backoff_max_s=1.0, deadline_s=60), lines)
    gaps = [b["t"] - a["t"] for a, b in zip(s.log, s.log[1:])]
    assert reply == "[[4]]" and len(s.log) == 7
    assert all(g >= min(1.0, 0.05 * 2 ** k) / 2 - 0.01 for k, g in enumerate(gaps)), gaps  # 0.025 ... 0.5 s


def test_a_spent_quota_fails_at_once_and_a_key_with_its_newline_still_works(judge_server, monkeypatch):
    from fusechat_core.evaluate.judge import _duration

    s = judge_server
    s.default = (429, {}, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}})
    reply, _, client = _ask(_settings(s, api_key_env=None, deadline_s=60), [])
    assert isinstance(reply, JudgeError) and not reply.transient and len(s.log) == 1
    assert "the quota is spent" in str(reply) and client.refusals == 1
    # a secret mounted from a file keeps its newline: the same key, not an illegal header retried
    s.log.clear()
    s.default = "[[5]]"
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET + "\n")
    reply, _, _ = _ask(_settings(s), [])
    assert reply == "[[5]]" and s.log[0]["auth"] == f"Bearer {SECRET}"
    assert [_duration(v) for v in ("6m0s", "1h2m3.5s", "20ms", "1s", "soon", "")] == [
        360.0, 3723.5, 0.02, 1.0, None, None]


def test_evaluations_side_by_side_share_the_judges_concurrency(judge_server, mt_data, tmp_path):
    """The 7B config evaluates eight models at once, each grading in a thread of its own with its
    own event loop: judge_concurrency 2 meant 16 requests in flight at one API key. Now every
    client of the process asking one judge shares its slots (and a rate limit's wait)."""
    s = judge_server
    for q in (81, 82):
        for t in (1, 2):
            s.scripts[(q, t)] = [0.2]  # each verdict takes 0.2 s: requests overlap
    store = ArtifactStore(str(tmp_path / "store"))
    errors: list[BaseException] = []

    def evaluation(k: int) -> None:
        try:
            js = grade_answers(store, f"evaluate/side-{k}", mt_data, _answers([81, 82]),
                               _settings(s, api_key_env=None, concurrency=2))
            assert [j.status for j in js] == ["ok"] * 4
        except BaseException as exc:  # noqa: BLE001 (reported below, in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=evaluation, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(s.log) == 12 and s.max_in_flight == 2
