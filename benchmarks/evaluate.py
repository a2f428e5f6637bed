"""Evaluation benchmark (issue 7).

1. Judging: one model's grading at MT-Bench's size (80 questions × 2 turns = 160
   requests: the repository's questions of ``tests/corpus.py`` repeated under new
   ids, with FastChat's judge prompts) against a local OpenAI-compatible
   server on 127.0.0.1 that answers after a fixed latency and throws a 429
   (Retry-After: 0) at every 10th request, at several concurrency limits. The
   ideal wall time is requests × latency / concurrency.
2. Answering: MT-Bench answers (both turns) of a small random Mistral with the
   real Mistral v1 tokenizer, batch 1 vs batch 8; new tokens per second.
3. Held-out NLL: supervised tokens per second, batch 1 vs batch 8.
4. Resume: the time to find 80 already answered questions in the store.

Ends with lines ``name: value`` for the figures. CPU here; a GPU is used when present.
Run: ``.venv/bin/python benchmarks/evaluate.py [--latency 0.1] [--questions 8] [--new-tokens 16] [--only judge|model]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MT_BENCH_QUESTIONS = 80  # FastChat's question.jsonl



def _mt_bench(n_questions: int | None = None):
    """MT-Bench-format files written into a temporary folder (tests/corpus.py): nothing is
    read from outside the repository. ``n_questions``: that many, the corpus's repeated under
    new ids (references with them), so the judge sees as many requests as the real set makes."""
    import dataclasses

    from fusechat_core.evaluate.mt_bench import load_mt_bench
    from tests.corpus import write_mt_bench

    data = load_mt_bench(str(write_mt_bench(Path(tempfile.mkdtemp(prefix="mt-bench-")))))
    if n_questions is None:
        return data
    base = data.questions
    questions = [dataclasses.replace(base[i % len(base)], question_id=10_000 + i) for i in range(n_questions)]
    references = {q.question_id: data.references[b.question_id]
                  for q, b in zip(questions, (base[i % len(base)] for i in range(n_questions)))
                  if b.question_id in data.references}
    return dataclasses.replace(data, questions=questions, references=references)


def bench_judge(latency: float, concurrencies: list[int]) -> dict[str, float]:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fusechat_core.evaluate.judge import JudgeSettings, grade_answers
    from fusechat_core.store import ArtifactStore

    data = _mt_bench(MT_BENCH_QUESTIONS)
    answers = [{"question_id": q.question_id, "choices": [{"index": 0, "turns": ["An answer.", "Another."]}]}
               for q in data.questions]
    counter = {"n": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = 1 << 16  # one send per response: unbuffered writes meet delayed ACKs (~40 ms each)

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                counter["n"] += 1
                n = counter["n"]
            time.sleep(latency)
            if n % 10 == 0:
                body, status, extra = b'{"error": "rate limited"}', 429, {"Retry-After": "0"}
            else:
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Fine. [[7]]"}}]}).encode()
                status, extra = 200, {}
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    out = {}
    try:
        for c in concurrencies:
            with tempfile.TemporaryDirectory() as tmp:
                counter["n"] = 0
                settings = JudgeSettings(base_url=url, model="bench", api_key_env=None, concurrency=c,
                                         backoff_base_s=0.01)
                t0 = time.perf_counter()
                js = grade_answers(ArtifactStore(tmp), "evaluate/bench", data, answers, settings)
                wall = time.perf_counter() - t0
                assert all(j.score == 7.0 for j in js) and len(js) == 2 * MT_BENCH_QUESTIONS
                ideal = counter["n"] * latency / c
                print(f"judge: concurrency {c:>2}: {len(js)} judgments, {counter['n']} requests "
                      f"in {wall:.2f} s (ideal {ideal:.2f} s, {len(js) / wall:.1f} judgments/s)")
                out[f"judge_seconds_c{c}"] = wall
                out[f"judge_efficiency_c{c}"] = ideal / wall
    finally:
        httpd.shutdown()
        httpd.server_close()
    return out


def bench_model(n_questions: int, new_tokens: int, tmp: Path) -> dict[str, float]:
    import torch

    from fusechat_core.data import synthetic
    from fusechat_core.evaluate.loading import EvalModel, load_for_eval
    from fusechat_core.evaluate.mt_bench import answer_questions, question_address
    from fusechat_core.evaluate.nll import heldout_nll
    from fusechat_core.store import ArtifactStore
    from fusechat_core.tiny import build_tiny_model

    folder = tmp / "model"
    build_tiny_model("mistral", "builtin:mistral-v1", folder, hidden=256, layers=4, heads=8, kv_heads=4,
                     intermediate=512, max_positions=4096)
    lm, tok, fmt, device = load_for_eval(EvalModel("bench", str(folder)))
    print(f"model: Mistral hidden 256, 4 layers, vocab {len(tok)}, on {device}, "
          f"torch threads {torch.get_num_threads()}")
    data = _mt_bench()
    # the same category throughout: batches are per temperature, so this is one stream of batches
    qs = [q for q in data.questions if q.category in ("reasoning", "math", "coding", "extraction")][:n_questions]
    out = {}
    for bs in (1, 8):
        store = ArtifactStore(str(tmp / f"store-{bs}"))
        t0 = time.perf_counter()
        recs = answer_questions(store, "mt_bench_answers/bench", "bench", lm, tok, fmt, qs,
                                max_new_tokens=new_tokens, batch_size=bs, progress=lambda m: None)
        wall = time.perf_counter() - t0
        n_new = sum(sum(r["new_tokens"]) for r in recs)
        print(f"answering: batch {bs}: {len(qs)} questions × 2 turns, {n_new} new tokens in {wall:.2f} s "
              f"({n_new / wall:.0f} tokens/s)")
        out[f"answer_tokens_per_s_b{bs}"] = n_new / wall
    out["answer_batch_speedup"] = out["answer_tokens_per_s_b8"] / out["answer_tokens_per_s_b1"]

    # resume: every question already answered -> only manifest checks and reads
    store = ArtifactStore(str(tmp / "store-8"))
    t0 = time.perf_counter()
    answer_questions(store, "mt_bench_answers/bench", "bench", lm, tok, fmt, qs, max_new_tokens=new_tokens,
                     batch_size=8, progress=lambda m: None)
    per_q = (time.perf_counter() - t0) / len(qs)
    assert all(store.is_complete(question_address("mt_bench_answers/bench", q.question_id)) for q in qs)
    print(f"resume: {per_q * 1000:.2f} ms per already answered question "
          f"({MT_BENCH_QUESTIONS} questions: {per_q * MT_BENCH_QUESTIONS:.2f} s)")
    out["resume_ms_per_question"] = per_q * 1000

    rows = []
    for d in ("markov", "arithmetic", "reverse", "facts"):
        for i, r in enumerate(synthetic.generate(d, 32, seed=1)):
            rows.append({"id": f"{d}-{i}", "source": d, "conversations": r["conversations"]})
    for bs in (1, 8):
        t0 = time.perf_counter()
        res = heldout_nll(lm, fmt, rows, max_length=2048, batch_size=bs)
        wall = time.perf_counter() - t0
        print(f"held-out NLL: batch {bs}: {len(rows)} sequences, {res['all']['tokens']} supervised tokens "
              f"in {wall:.2f} s ({res['all']['tokens'] / wall:.0f} supervised tokens/s)")
        out[f"nll_supervised_tokens_per_s_b{bs}"] = res["all"]["tokens"] / wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.1, help="judge server latency per request (s)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--only", choices=("judge", "model"), help="run one half only")
    args = ap.parse_args()
    figures = {}
    if args.only != "model":
        figures.update(bench_judge(args.latency, [int(c) for c in args.concurrency.split(",")]))
    if args.only != "judge":
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("FUSECHAT_CACHE", str(Path(tmp) / "cache"))
            figures.update(bench_model(args.questions, args.new_tokens, Path(tmp)))
    print()
    for k, v in figures.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
