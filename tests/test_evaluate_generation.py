"""MT-Bench answering on a tiny real model: two turns, the model's own template, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fusechat_core.evaluate.loading import EvalModel, load_for_eval
from fusechat_core.evaluate.mt_bench import TEMPERATURES, answer_file, answer_questions, load_mt_bench, question_address
from fusechat_core.store import MANIFEST, ArtifactStore

REPO = Path(__file__).resolve().parents[1]
QIDS = [81, 82, 101, 141]  # writing (T=0.7) twice, reasoning (T=0), stem (T=0.1): the order they are answered in
MAX_NEW = 4

_ANSWER = """
import sys
from fusechat_core.evaluate.loading import EvalModel, load_for_eval
from fusechat_core.evaluate.mt_bench import answer_questions, load_mt_bench
from fusechat_core.store import ArtifactStore
model_dir, mt_dir, store_url, address = sys.argv[1:5]
qids = [int(x) for x in sys.argv[5].split(",")]
data = load_mt_bench(mt_dir)
lm, tok, fmt, _ = load_for_eval(EvalModel("pivot", model_dir), "cpu")
answer_questions(ArtifactStore(store_url), address, "pivot", lm, tok, fmt, [data.question(q) for q in qids],
                 max_new_tokens=MAX_NEW, batch_size=1, seed=3)
""".replace("MAX_NEW", str(MAX_NEW))


@pytest.fixture(scope="module")
def pivot(tiny_models):
    return load_for_eval(EvalModel("pivot", str(tiny_models["pivot"])), "cpu")


def test_two_turns_in_the_models_own_template(pivot, mt_bench_dir, tmp_path):
    lm, tok, fmt, device = pivot
    assert device == "cpu"
    data = load_mt_bench(str(mt_bench_dir))
    qs = [data.question(q) for q in QIDS]
    store = ArtifactStore(str(tmp_path / "store"))
    recs = answer_questions(store, "mt_bench_answers/pivot-x", "pivot", lm, tok, fmt, qs,
                            max_new_tokens=MAX_NEW, batch_size=2, seed=3)
    assert [r["question_id"] for r in recs] == QIDS
    for q, r in zip(qs, recs):
        a1, a2 = r["choices"][0]["turns"]
        assert r["temperature"] == TEMPERATURES[q.category]
        assert all(1 <= n <= MAX_NEW for n in r["new_tokens"])
        # The tiny model's template is Mistral's [INST] format: build the prompts by hand.
        turn1 = f"<s>[INST] {q.turns[0]} [/INST]"
        turn2 = f"{turn1} {a1}</s>[INST] {q.turns[1]} [/INST]"
        assert r["prompt_ids"][0] == tok(turn1, add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"][1] == tok(turn2, add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"][0][0] == tok.bos_token_id
        # the second turn's prompt holds the model's own first answer
        assert tok.decode(r["prompt_ids"][1]).count("[INST]") == 2
        # saved, one artifact per question, in FastChat's answer format
        stored = store.read_json(question_address("mt_bench_answers/pivot-x", q.question_id),
                                 answer_file(q.question_id))
        assert stored["choices"][0]["turns"] == [a1, a2] and stored["model_id"] == "pivot"


def test_greedy_answers_match_a_manual_decoding(pivot, mt_bench_dir, tmp_path):
    """T = 0 categories decode greedily: compare with argmax decoding done by hand."""
    import torch

    lm, tok, fmt, _ = pivot
    data = load_mt_bench(str(mt_bench_dir))
    q = data.question(101)
    store = ArtifactStore(str(tmp_path / "store"))
    rec = answer_questions(store, "mt_bench_answers/greedy", "pivot", lm, tok, fmt, [q], max_new_tokens=MAX_NEW)[0]
    ids = list(rec["prompt_ids"][0])
    new = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = int(lm(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert rec["choices"][0]["turns"][0] == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_resume_after_sigkill_answers_only_missing_questions(tiny_models, pivot, mt_bench_dir, tmp_path):
    model_dir = str(tiny_models["pivot"])
    ref_store, store = tmp_path / "ref", tmp_path / "killed"
    address = "mt_bench_answers/pivot-k"
    env = {**os.environ, "FUSECHAT_KILL_AFTER_FILE": answer_file(QIDS[2])}
    args = [sys.executable, "-c", _ANSWER, model_dir, str(mt_bench_dir), str(store), address,
            ",".join(map(str, QIDS))]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    st = ArtifactStore(str(store))
    complete = [q for q in QIDS if st.is_complete(question_address(address, q))]
    assert complete == QIDS[:2]
    # the killed question's file is there, its manifest is not: it reads as missing
    killed = store / question_address(address, QIDS[2])
    assert (killed / answer_file(QIDS[2])).exists() and not (killed / MANIFEST).exists()
    before = {q: st.read_json(question_address(address, q), answer_file(q)) for q in complete}

    # rerun without the failpoint, as the killed process ran (here: a process of its own would
    # only import torch and transformers again): only the missing questions are answered
    lm, tok, fmt, _ = pivot
    data = load_mt_bench(str(mt_bench_dir))
    answer_questions(st, address, "pivot", lm, tok, fmt, [data.question(q) for q in QIDS],
                     max_new_tokens=MAX_NEW, batch_size=1, seed=3)
    after = {q: st.read_json(question_address(address, q), answer_file(q)) for q in QIDS}
    for q in complete:  # untouched: same record, same time stamp
        assert after[q] == before[q]
    assert all(after[q]["tstamp"] > before[QIDS[1]]["tstamp"] for q in QIDS[2:])

    # and the result equals an uninterrupted run's (seeded sampling per question and turn)
    want = answer_questions(ArtifactStore(str(ref_store)), address, "pivot", lm, tok, fmt,
                            [data.question(q) for q in QIDS], max_new_tokens=MAX_NEW, batch_size=1, seed=3)
    for q, w in zip(QIDS, want):
        assert after[q]["choices"] == w["choices"] and after[q]["prompt_ids"] == w["prompt_ids"]
    json.dumps(after)  # plain JSON all the way
