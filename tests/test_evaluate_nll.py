"""Offline measures on a tiny real model, checked against computations done by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fusechat_core.chat import IGNORE
from fusechat_core.data import synthetic
from fusechat_core.evaluate.loading import EvalModel, load_for_eval
from fusechat_core.evaluate.nll import exact_match, heldout_nll, normalise_answer


def _rows() -> list[dict]:
    rows = []
    for domain in ("markov", "arithmetic", "reverse"):
        for i, r in enumerate(synthetic.generate(domain, 3, seed=5)):
            rows.append({"id": f"{domain}-{i}", "source": domain, "conversations": r["conversations"]})
    # a two-exchange conversation: both assistant turns are supervised
    rows.append({"id": "multi", "source": "markov", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there."},
        {"from": "human", "value": "And goodbye?"}, {"from": "gpt", "value": "Goodbye, friend."}]})
    return rows


@pytest.fixture(scope="module")
def llama(tiny_models):
    # the tekken byte-level BPE model: a large vocabulary and a different tokenizer family
    return load_for_eval(EvalModel("llama", str(tiny_models["llama"])), "cpu")


def _manual(lm, fmt, rows, max_length):
    """One sequence at a time, no padding: forward, log_softmax, gather the labels."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        enc = fmt.encode(r["conversations"], max_length=max_length)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits[0].double(), dim=-1)
        acc = sums.setdefault(r["source"], [0.0, 0])
        for t in range(1, len(enc.input_ids)):
            if enc.labels[t] != IGNORE:
                acc[0] -= float(logp[t - 1, enc.labels[t]])
                acc[1] += 1
    return sums


def test_heldout_nll_matches_a_manual_computation(llama):
    lm, tok, fmt, _ = llama
    rows = _rows()
    for max_length in (512, 24):  # 24 cuts the longer rows: truncation is applied the same way
        got = heldout_nll(lm, fmt, rows, max_length=max_length, batch_size=3)
        want = _manual(lm, fmt, rows, max_length)
        for src, (nll, n) in want.items():
            if n == 0:
                continue
            assert got["sources"][src]["tokens"] == n
            assert got["sources"][src]["nll"] == pytest.approx(nll / n, rel=1e-4)
            assert got["sources"][src]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-3)
            # the per-sequence figures the report's bootstrap resamples add up to the same sums
            seq = got["sequences"]
            mine = [k for k, s in enumerate(seq["source"]) if s == src]
            assert sum(seq["nll"][k] for k in mine) == pytest.approx(nll, rel=1e-4)
            assert sum(seq["tokens"][k] for k in mine) == n
            assert sum(seq["bytes"][k] for k in mine) == got["sources"][src]["bytes"]
        assert seq["id"] == sorted(seq["id"]) and len(set(seq["id"])) == got["all"]["sequences"]
        whole = {r["id"]: len(fmt.encode(r["conversations"]).input_ids) for r in rows}
        assert seq["cut"] == [whole[i] > max_length for i in seq["id"]]
        assert any(seq["cut"]) == (max_length == 24)
        total_nll = sum(v[0] for v in want.values())
        total_n = sum(v[1] for v in want.values())
        assert got["all"]["tokens"] == total_n
        assert got["all"]["nll"] == pytest.approx(total_nll / total_n, rel=1e-4)
    # bits per byte: the same NLL over the bytes of the scored text. Untruncated, the scored
    # text holds every assistant answer and lies inside the assistant spans of the template.
    full = heldout_nll(lm, fmt, rows, max_length=512, batch_size=3)
    lo = hi = 0
    for r in rows:
        text, spans = fmt.assistant_spans([{"role": "user" if t["from"] == "human" else "assistant",
                                            "content": t["value"]} for t in r["conversations"]])
        lo += sum(len(t["value"].encode()) for t in r["conversations"] if t["from"] == "gpt")
        hi += sum(len(text[a:b].encode()) for a, b in spans)
    assert lo <= full["all"]["bytes"] <= hi
    assert full["all"]["bytes"] == lo  # the answers' own bytes, no template marker
    assert full["all"]["bits_per_byte"] == pytest.approx(
        full["all"]["nll"] * full["all"]["tokens"] / (full["all"]["bytes"] * math.log(2)), rel=1e-9)
    # a random model over a 131k vocabulary sits near log(V) nats per token
    assert abs(got["all"]["nll"] - math.log(len(tok))) < 1.5


def test_bits_per_byte_count_the_answers_bytes_once_whatever_the_tokenizer(llama, tiny_models):
    """Two tokenizers and templates (tekken byte-level BPE; Mistral v1's SentencePiece, whose
    byte fallback gives one character several tokens with the same offsets): the byte count
    is the UTF-8 length of the answers, counted by hand, for both."""
    rows = _rows() + [{"id": "utf8", "source": "markov", "conversations": [
        {"from": "human", "value": "Order a coffee."},
        {"from": "gpt", "value": "Un café ☕, s'il vous plaît — 日本茶も。🙂"}]}]
    want = sum(len(t["value"].encode()) for r in rows for t in r["conversations"] if t["from"] == "gpt")
    pivot = load_for_eval(EvalModel("pivot", str(tiny_models["pivot"])), "cpu")
    enc = pivot[2].encode(rows[-1]["conversations"])
    spans = [o for o, y in zip(enc.offsets, enc.labels) if y != IGNORE]
    assert len(spans) != len(set(spans)), "no byte-fallback token here: the test would not test it"
    for lm, _, fmt, _ in (llama, pivot):
        assert heldout_nll(lm, fmt, rows, max_length=512)["all"]["bytes"] == want


def test_supervised_tokens_are_the_assistants_only(llama):
    lm, tok, fmt, _ = llama
    row = _rows()[-1]
    got = heldout_nll(lm, fmt, [row], max_length=512)
    enc = fmt.encode(row["conversations"])
    supervised = tok.decode([i for i, y in zip(enc.input_ids, enc.labels) if y != IGNORE])
    assert "Hello there." in supervised and "Goodbye, friend." in supervised
    assert "Say hello" not in supervised and "goodbye?" not in supervised
    assert got["all"]["tokens"] == sum(1 for y in enc.labels[1:] if y != IGNORE)


def test_a_model_with_nan_weights_fails_the_measure_naming_row_and_domain(llama):
    import copy

    from fusechat_core.evaluate.loading import EvaluationError

    lm, _, fmt, _ = llama
    poisoned = copy.deepcopy(lm)
    with torch.no_grad():
        poisoned.model.norm.weight[0] = float("nan")  # every position's logits become NaN
    row = next(r for r in _rows() if r["source"] == "reverse")
    with pytest.raises(EvaluationError, match=rf"^held-out NLL is nan on row {row['id']} of domain reverse: "):
        heldout_nll(poisoned, fmt, [row], max_length=512)
    assert math.isfinite(heldout_nll(lm, fmt, [row], max_length=512)["all"]["nll"])  # the model itself is fine


def test_exact_match_against_manual_greedy_decoding(tiny_models):
    lm, tok, fmt, _ = load_for_eval(EvalModel("pivot", str(tiny_models["pivot"])), "cpu")
    rows = [r for r in _rows() if r["source"] in ("arithmetic", "reverse")]
    # Greedy decoding by hand: the model's own answers become the references of some rows,
    # so exact match must find exactly those (the model is random; its answers are not the truth).
    from fusechat_core.chat import to_messages

    def greedy(messages, n=6):
        ids = fmt.prompt_ids(messages)
        new = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(lm(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        return tok.decode(new, skip_special_tokens=True)

    expected_hits = {}
    for k, r in enumerate(rows):
        if k % 2 == 0:
            own = greedy(to_messages(r["conversations"])[:-1])
            # extra spaces and a newline: matching is after whitespace normalisation
            r["conversations"][-1]["value"] = "  " + own.replace(" ", "  \n", 1) + " "
            expected_hits.setdefault(r["source"], []).append(r["id"])
    res = exact_match(lm, tok, fmt, rows, ["arithmetic", "reverse", "facts"], max_new_tokens=6, batch_size=2)
    for src in ("arithmetic", "reverse"):
        n = sum(r["source"] == src for r in rows)
        hits = len(expected_hits.get(src, []))
        assert (res["sources"][src]["n"], res["sources"][src]["correct"]) == (n, hits)
        assert res["sources"][src]["accuracy"] == pytest.approx(hits / n)
    assert "facts" not in res["sources"]  # no held-out row of that source
    assert res["all"]["n"] == len(rows)
    assert all(m["got"] != m["expected"] for s in res["sources"].values() for m in s["mismatches"])


def test_normalise_answer():
    assert normalise_answer("  12\n") == "12"
    assert normalise_answer("a  b\tc") == "a b c"
    assert normalise_answer("ab") != normalise_answer("a b")


def test_every_model_is_evaluated_in_float32_unless_told_so_a_small_update_is_seen(tiny_models, tmp_path):
    """A target is its pivot moved a little. Every weight moved by 2**-10 of itself (under half a
    bf16 step, over a thousand float32 steps): in float32 the held-out NLL sees it; in bf16
    both load as the same numbers."""
    import shutil

    def copy(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_models["pivot"], folder)
        lm = load_for_eval(EvalModel(name, str(folder)), "cpu")[0]
        assert {p.dtype for p in lm.parameters()} == {torch.float32}  # the default
        with torch.no_grad():
            for p in lm.parameters():
                p.copy_(change(p))
        lm.save_pretrained(folder)  # float32, as training saves its targets
        return folder

    # a pivot as the hub ships one, in bf16 (here stored as float32), and its target
    pivot = copy("pivot", lambda p: p.to(torch.bfloat16).float())
    nudged = copy("nudged", lambda p: p.to(torch.bfloat16).float() * (1 + 2.0 ** -10))
    rows = _rows()[:4]
    nll = {}
    for dtype in ("float32", "bfloat16"):
        for name, path in (("pivot", pivot), ("nudged", nudged)):
            m, _, f, _ = load_for_eval(EvalModel(name, str(path)), "cpu", dtype)
            assert {p.dtype for p in m.parameters()} == {getattr(torch, dtype)}
            nll[dtype, name] = heldout_nll(m, f, rows, max_length=512)["all"]["nll"]
    assert nll["float32", "pivot"] != nll["float32", "nudged"]
    assert nll["bfloat16", "pivot"] == nll["bfloat16", "nudged"]


def test_a_model_whose_config_names_its_dtype_keeps_it_and_answers_depend_on_the_dtype(tiny_models):
    """evaluate.dtype is for models that name none (targets, merges): a source such as
    Mixtral-8x7B named bfloat16 in its config fits one GPU only so. MT-Bench answers are
    generated in the evaluation's dtype, so it is part of their address."""
    from fusechat_core.config import EvaluateConfig
    from fusechat_core.evaluate.loading import resolve_model
    from fusechat_core.plan import mt_bench_answers_address

    named = resolve_model(None, "src", {"model": {"path": str(tiny_models["pivot"]), "dtype": "bfloat16"}})
    unnamed = resolve_model(None, "piv", {"model": {"path": str(tiny_models["pivot"]), "dtype": "auto"}})
    assert {p.dtype for p in load_for_eval(named, "cpu")[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_for_eval(unnamed, "cpu")[0].parameters()} == {torch.float32}
    ref = {"model": {"path": "org/m"}}
    assert mt_bench_answers_address("m", ref, EvaluateConfig(dtype="float32")) != \
        mt_bench_answers_address("m", ref, EvaluateConfig(dtype="bfloat16"))
