"""``fusechat eval`` end to end: a tiny model, a dataset artifact, MT-Bench files over HTTP, a local judge."""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.cli import main
from fusechat_core.data import synthetic
from fusechat_core.data.build import Mixture, write_mixture
from fusechat_core.evaluate.mt_bench import load_mt_bench
from fusechat_core.store import ArtifactStore
from tests.corpus import write_mt_bench
from tests.test_evaluate_judge import SECRET, JudgeServer

QIDS = [81, 101, 111, 141]


@pytest.fixture
def mt_subset(tmp_path: Path):
    """A few MT-Bench questions, FastChat's layout, served over HTTP from 127.0.0.1: (URL, folder)."""
    root = tmp_path / "fastchat-data"
    write_mt_bench(root, layout="fastchat", qids=QIDS)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/mt_bench", root / "mt_bench"
    httpd.shutdown()
    httpd.server_close()


def _dataset(store: ArtifactStore) -> str:
    heldout = []
    for domain in ("markov", "arithmetic", "facts"):
        for i, r in enumerate(synthetic.generate(domain, 4, seed=11)):
            heldout.append({"id": f"{domain}-{i}", "source": domain, "conversations": r["conversations"]})
    train = [{"id": "t-0", "source": "markov", "conversations": heldout[0]["conversations"]}]
    address = "dataset/test-eval"
    with store.writer(address, meta={"stage": "dataset"}) as w:
        write_mixture(w, Mixture(train, heldout, {"train": 1, "heldout": len(heldout)}))
    return address


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_fusechat_eval_end_to_end(tiny_models, mt_subset, tmp_path, monkeypatch, capsys):
    mt_url, mt_folder = mt_subset
    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    data = load_mt_bench(mt_url)
    assert [q.question_id for q in data.questions] == QIDS and data.sources["questions"].startswith("http://")
    store_url = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(store_url)
    dataset = _dataset(store)
    with JudgeServer({q.turns[0]: q.question_id for q in data.questions}) as judge:
        judge.scripts[(101, 2)] = ["no verdict here"]
        judge.default = "Solid. Rating: [[6]]"
        argv = ["eval", str(tiny_models["pivot"]), "--store", store_url, "--heldout", dataset,
                "--mt-bench", mt_url, "--judge-base-url", judge.url, "--judge-model", "judge-1",
                "--judge-api-key-env", "FUSECHAT_TEST_JUDGE_KEY", "--max-new-tokens", "3", "--json"]
        assert main(argv) == 0
        out = capsys.readouterr()
        res = _last_json(out.out)
        mt = res["results"]["mt_bench"]
        assert (mt["scored"], mt["unparsable"], mt["failed"]) == (7, 1, 0)
        assert mt["average"] == 6.0 and mt["categories"]["reasoning"] == 6.0
        assert set(res["results"]["heldout_nll"]["sources"]) == {"markov", "arithmetic", "facts"}
        assert res["results"]["heldout_nll"]["all"]["tokens"] > 0
        assert res["results"]["dtype"] == "float32"  # evaluate.dtype's default, whatever the files hold
        assert set(res["results"]["exact_match"]["sources"]) == {"arithmetic", "facts"}
        assert res["results"]["exact_match"]["all"]["n"] == 8
        # the printed report table has one row: this model
        table = [line for line in out.out.splitlines() if line.startswith("| ")]
        assert len(table) == 2 and table[1].startswith("| pivot |")
        assert len(judge.log) == 2 * len(QIDS)

        # artifacts: answers, evaluate (results, judgments, answers), report
        assert store.is_complete(res["answers"]) and store.is_complete(res["address"])
        files = {f.path for f in store.require(res["address"]).files}
        assert files == {"results.json", "judgments.jsonl", "answers.jsonl"}
        answers = [json.loads(x) for x in store.read_bytes(res["answers"], "answers.jsonl").decode().splitlines()]
        assert [a["question_id"] for a in answers] == QIDS and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
        assert {"report.md", "report.json"} <= {f.path for f in store.require(res["report"]).files}

        # a second run finds everything done: no judge request, same address (the judge's
        # budget is operational: another budget is the same evaluation)
        budget = ["--judge-timeout-s", "5", "--judge-max-retries", "2", "--judge-max-retry-after-s", "0.2",
                  "--judge-deadline-s", "60"]
        assert main(argv + budget) == 0
        again = _last_json(capsys.readouterr().out)
        assert again["address"] == res["address"] and len(judge.log) == 2 * len(QIDS)
        # what else an evaluation measures moves its address, never its verdicts: a paid judge
        # is not asked again when the held-out measures go (or the batch size, the allowed failures)
        lean = [a for a in argv if a not in ("--heldout", dataset)]
        assert main(lean) == 0
        lean_res = _last_json(capsys.readouterr().out)
        assert lean_res["address"] != res["address"] and len(judge.log) == 2 * len(QIDS)
        assert lean_res["results"]["mt_bench"]["average"] == mt["average"] and "heldout_nll" not in lean_res["results"]
        assert lean_res["results"]["mt_bench"]["judgments"] == mt["judgments"]

        # another judge: a new evaluation, but the answers are reused, not generated again.
        # It asks for Retry-After 100000 s once: the flag caps the wait, and the wait is announced.
        judge.scripts[(81, 1)] = [(429, {"Retry-After": "100000"}, {"error": "slow down"}), "Rating: [[6]]"]
        assert main(argv[:-3] + ["--judge-model", "judge-2", "--max-new-tokens", "3", "--json"] + budget) == 0
        out = capsys.readouterr()
        other = _last_json(out.out)
        # the server's 100000 s capped at 0.2 s, then raised to the first 429's floor (half the 1 s backoff)
        assert "HTTP 429 (asked to wait 100000 s, capped at 0.2 s); waiting 0.5 s for judge (the server's wait), " \
               "rate limited (1), no retry used" in out.err
        asked = judge.requests(81, 1)
        assert [r["body"]["model"] for r in asked] == ["judge-1", "judge-2", "judge-2"]
        assert asked[2]["t"] - asked[1]["t"] < 5
        judge.log.remove(asked[1])  # the refused request: the counts below are of graded ones
        assert other["address"] != res["address"] and other["answers"] == res["answers"]
        assert len(judge.log) == 4 * len(QIDS) and judge.log[-1]["body"]["model"] == "judge-2"
        reread = [json.loads(x) for x in store.read_bytes(res["answers"], "answers.jsonl").decode().splitlines()]
        assert [a["tstamp"] for a in reread] == [a["tstamp"] for a in answers]
        assert all(r["auth"] == f"Bearer {SECRET}" for r in judge.log)

        # the data at the location changed (question 141's second turn): only that question is
        # answered again before a new judge grades
        qfile = mt_folder / "question.jsonl"
        qs = [json.loads(x) for x in qfile.read_text().splitlines()]
        qs[-1]["turns"][1] = "Explain it again, in one sentence."
        qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
        assert main(argv[:-3] + ["--judge-model", "judge-3", "--max-new-tokens", "3", "--json"]) == 0
        third = _last_json(capsys.readouterr().out)
        assert third["answers"] == res["answers"] and third["results"]["mt_bench"]["scored"] == 7
        new = {a["question_id"]: a for a in (json.loads(x) for x in store.read_bytes(
            res["answers"], "answers.jsonl").decode().splitlines())}
        assert [new[a["question_id"]]["tstamp"] == a["tstamp"] for a in answers] == [True, True, True, False]
        assert new[141]["question_turns"][1] == "Explain it again, in one sentence."

    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_fusechat_eval_bad_input(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # not a missing key: the errors below come first
    store_url = f"file://{tmp_path / 'store'}"
    assert main(["eval", str(tmp_path / "no-such-model"), "--store", store_url, "--mt-bench"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-model" in err and "MODEL_OR_ADDRESS" in err
    assert main(["eval", str(tiny_models["pivot"]), "--store", store_url]) == 2
    assert "give --mt-bench and/or --heldout" in capsys.readouterr().err
    assert main(["eval", str(tiny_models["pivot"]), "--store", store_url, "--heldout", "dataset/missing"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset/missing" in err
    assert main(["eval", str(tiny_models["pivot"]), "--store", store_url, "--mt-bench", str(tmp_path),
                 "--judge-concurrency", "0"]) == 2
    assert "--judge-concurrency" in capsys.readouterr().err
    assert main(["eval", str(tiny_models["pivot"]), "--store", store_url, "--mt-bench",
                 "--judge-timeout-s", "0"]) == 2
    assert "--judge-timeout-s" in capsys.readouterr().err
    # a data folder without the files: one line naming what was looked for
    assert main(["eval", str(tiny_models["pivot"]), "--store", store_url, "--mt-bench", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "questions file not found" in err and len(err.splitlines()) == 1


def test_an_evaluation_that_measures_nan_fails_naming_the_model(tiny_models, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nanmodel"
    shutil.copytree(tiny_models["pivot"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    store_url = f"file://{tmp_path / 'store'}"
    dataset = _dataset(ArtifactStore(store_url))
    assert main(["eval", str(folder), "--store", store_url, "--heldout", dataset]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fusechat: eval failed: evaluate[nanmodel]: held-out NLL is nan on row "), err
    assert "of domain " in err[-1]
    assert not [a for a in ArtifactStore(store_url).list("evaluate") if "nanmodel" in a]  # nothing reported


def test_run_models_resolve_for_loading(tiny_models, tmp_path):
    """In a run, targets and merges (store artifacts) speak the pivot's configured template."""
    from fusechat_core.chat import TEMPLATES
    from fusechat_core.config import parse_config
    from fusechat_core.evaluate.loading import load_for_eval, resolve_model, run_model_ref
    from fusechat_core.plan import RunPlan

    run = parse_config({
        "pivot": {"name": "pivot", "path": str(tiny_models["pivot"]), "chat_template": "chatml"},
        "sources": [{"name": "mixtral", "path": str(tiny_models["mixtral"]), "device_map": "auto"}],
        "data": {"sources": [{"name": "arithmetic", "path": "demo:arithmetic", "count": 4}]},
    })
    plan = RunPlan(run)
    store = ArtifactStore(str(tmp_path / "store"))
    target = plan.model_ref("target-mixtral")
    store.put_dir(target["artifact"], tiny_models["pivot"])  # stands in for the trained target's folder
    ref = run_model_ref(run, "target-mixtral", target, store)
    assert ref == {**target, "chat_template": "chatml"}
    _, _, fmt, _ = load_for_eval(resolve_model(store, "target-mixtral", ref), "cpu")
    assert fmt.template == TEMPLATES.get("chatml")
    assert fmt.text([{"role": "user", "content": "hi"}], add_generation_prompt=True).endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # a source keeps its own spec (and its tokenizer's own template)
    src = run_model_ref(run, "mixtral", plan.model_ref("mixtral"), store)
    assert src["model"]["path"] == str(tiny_models["mixtral"]) and src["model"]["chat_template"] is None
    # and is spread over the GPUs as its spec says (Mixtral-8x7B fits no 80 GB GPU alone)
    assert resolve_model(store, "mixtral", src).device_map == "auto"
    assert resolve_model(store, "target-mixtral", ref).device_map is None


def test_fusechat_eval_of_a_store_artifact(tiny_models, tmp_path, capsys):
    store_url = f"file://{tmp_path / 'store'}"
    store = ArtifactStore(store_url)
    dataset = _dataset(store)
    store.put_dir("train/target-x-0123", tiny_models["pivot"])
    assert main(["eval", "train/target-x-0123", "--store", store_url, "--heldout", dataset, "--json"]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["name"] == "target-x-0123" and res["answers"] is None
    assert res["results"]["model_ref"] == {"artifact": "train/target-x-0123"}
    assert "mt_bench" not in res["results"] and res["results"]["heldout_nll"]["all"]["sequences"] == 12


def test_the_evaluate_task_posts_grading_progress(tiny_models, mt_bench_dir, prefect_server, tmp_path, monkeypatch):
    """The evaluate task on a real Prefect server, judged over HTTP: its dashboard shows the
    MT-Bench questions answered and then graded, each bar at 100 % when the task is done."""
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fusechat_core.config import EvaluateConfig
    from tasks._stage import result_storage_for
    from tasks.evaluate import evaluate_model

    monkeypatch.setenv("FUSECHAT_TEST_JUDGE_KEY", SECRET)
    data = load_mt_bench(str(mt_bench_dir))
    qids = [q.question_id for q in data.questions][:3]
    keep = tmp_path / "mt-bench-3"
    write_mt_bench(keep, qids=qids)
    cfg = EvaluateConfig(mt_bench=True, mt_bench_data=str(keep), max_new_tokens=2, heldout_nll=False,
                         judge_model="judge-1", judge_api_key_env="FUSECHAT_TEST_JUDGE_KEY", judge_concurrency=2)
    store = f"file://{tmp_path / 'store'}"

    @flow(name="grading-progress", result_storage=result_storage_for(store))
    def one_evaluation(judge_url: str) -> dict:
        conf = cfg.model_copy(update={"judge_base_url": judge_url}).model_dump(mode="json")
        return evaluate_model(conf, "pivot", {"model": {"path": str(tiny_models["pivot"])}}, "evaluate/pivot-p",
                              store, answers="mt_bench_answers/pivot-p")

    async def progress_bars(flow_run_id) -> dict[str, float]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
        return {a.description.split(":")[1].strip(): float(a.data) for a in arts}

    with JudgeServer({q.turns[0]: q.question_id for q in data.questions}) as judge, \
            temporary_settings(updates={PREFECT_API_URL: prefect_server.api}):
        state = one_evaluation(judge.url, return_state=True)
        assert state.is_completed(), state
        assert state.result()["summary"]["mt_bench"]["scored"] == 2 * len(qids)
        assert len(judge.log) == 2 * len(qids)
        bars = asyncio.run(progress_bars(state.state_details.flow_run_id))
    assert bars == {"MT-Bench questions answered": 100.0, "MT-Bench questions graded": 100.0}, bars


def test_an_evaluation_records_the_precision_the_model_ran_in(tiny_models, tmp_path):
    """A source whose spec names bfloat16 keeps it (Mixtral fits one GPU so); the results say
    bfloat16, not evaluate.dtype, or comparisons across precision read as same-precision ones."""
    from fusechat_core.config import EvaluateConfig
    from fusechat_core.evaluate.stage import evaluate_model

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    dataset = _dataset(store)
    cfg = EvaluateConfig(mt_bench=False, exact_match_sources=[], dtype="float32")
    named = evaluate_model(store, "evaluate/named", "src", {"model": {"path": str(tiny_models["pivot"]),
                                                                     "dtype": "bfloat16"}}, cfg, dataset=dataset,
                           measures_address="heldout_measures/named")
    plain = evaluate_model(store, "evaluate/plain", "pivot", {"model": {"path": str(tiny_models["pivot"])}}, cfg,
                           dataset=dataset, measures_address="heldout_measures/plain")
    assert (named["dtype"], plain["dtype"]) == ("bfloat16", "float32")
    assert named["device"] == plain["device"] == "cpu"


def test_verdicts_an_earlier_version_kept_are_not_bought_again(tiny_models, mt_subset, tmp_path):
    """Before their own address, verdicts lived under the evaluation's (evaluate version 3):
    after an upgrade they are found there and copied, not bought again (160 GPT-4 requests
    a model)."""
    from fusechat_core.config import EvaluateConfig
    from fusechat_core.evaluate.judge import judgment_address
    from fusechat_core.evaluate.stage import evaluate_model
    from fusechat_core.plan import earlier_judgments, mt_bench_answers_address, mt_bench_judgments_address

    mt_url, _ = mt_subset
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    ref = {"model": {"path": str(tiny_models["pivot"])}}
    with JudgeServer({q.turns[0]: q.question_id for q in load_mt_bench(mt_url).questions}) as judge:
        judge.default = "Fine. Rating: [[7]]"
        cfg = EvaluateConfig(mt_bench=True, mt_bench_data=mt_url, judge_base_url=judge.url, judge_model="judge-1",
                             judge_api_key_env="FUSECHAT_NO_SUCH_KEY", max_new_tokens=3, heldout_nll=False,
                             exact_match_sources=[])
        answers = mt_bench_answers_address("pivot", ref, cfg)
        [old] = earlier_judgments("pivot", ref, cfg, None)
        first = evaluate_model(store, "evaluate/now", "pivot", ref, cfg, answers_address=answers, earlier=[old])
        assert len(judge.log) == 2 * len(QIDS)
        # the store as an older version left it: the verdicts under the old evaluation's address
        new = mt_bench_judgments_address("pivot", answers, cfg)
        for q in QIDS:
            store.put_dir(judgment_address(old, q), store.fetch(judgment_address(new, q)))
            store.delete(judgment_address(new, q))
        store.delete("evaluate/now")
        again = evaluate_model(store, "evaluate/now", "pivot", ref, cfg, answers_address=answers, earlier=[old])
        assert len(judge.log) == 2 * len(QIDS)  # nothing bought again
        assert again["mt_bench"]["average"] == first["mt_bench"]["average"] == 7.0
        assert all(store.is_complete(judgment_address(new, q)) for q in QIDS)  # kept at their place now


def test_grading_needs_neither_the_model_nor_its_measures_again(tiny_models, mt_subset, tmp_path):
    """The GPU step stores a model's answers and held-out measures at their own addresses; the
    grading step then reads them and never loads the model (the folder is gone by then). A
    new judge is a new evaluation with the same measures and answers: nothing of the GPU
    step is done again."""
    import shutil

    from fusechat_core.config import EvaluateConfig
    from fusechat_core.evaluate.stage import MEASURES_FILE, evaluate_model, measure_model
    from fusechat_core.plan import evaluate_address, heldout_measures_address, mt_bench_answers_address

    mt_url, _ = mt_subset
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    dataset = _dataset(store)
    folder = tmp_path / "pivot-copy"
    shutil.copytree(tiny_models["pivot"], folder)
    ref = {"model": {"path": str(folder)}}
    with JudgeServer({q.turns[0]: q.question_id for q in load_mt_bench(mt_url).questions}) as judge:
        judge.default = "Fine. Rating: [[7]]"
        cfg = EvaluateConfig(mt_bench=True, mt_bench_data=mt_url, judge_base_url=judge.url, judge_model="judge-1",
                             judge_api_key_env="FUSECHAT_NO_SUCH_KEY", max_new_tokens=3, exact_match_sources=["facts"])
        answers = mt_bench_answers_address("pivot", ref, cfg)
        measures = heldout_measures_address("pivot", ref, cfg, dataset)
        assert measure_model(store, "pivot", ref, cfg, answers_address=answers, measures_address=measures,
                             dataset=dataset) is True
        assert measure_model(store, "pivot", ref, cfg, answers_address=answers, measures_address=measures,
                             dataset=dataset) is False  # both stored: nothing loaded
        measured = store.read_json(measures, MEASURES_FILE)
        assert measured["heldout_nll"]["all"]["tokens"] > 0 and measured["exact_match"]["all"]["n"] == 4
        shutil.rmtree(folder)
        for judge_model in ("judge-1", "judge-2"):
            graded = cfg.model_copy(update={"judge_model": judge_model})
            assert heldout_measures_address("pivot", ref, graded, dataset) == measures
            assert mt_bench_answers_address("pivot", ref, graded) == answers
            res = evaluate_model(store, evaluate_address("pivot", ref, graded, dataset), "pivot", ref, graded,
                                 dataset=dataset, answers_address=answers, measures_address=measures,
                                 expect_measured=True)
            assert res["heldout_nll"] == measured["heldout_nll"] and res["exact_match"] == measured["exact_match"]
            assert (res["device"], res["dtype"]) == ("cpu", "float32")
            assert res["mt_bench"]["judge_model"] == judge_model and res["mt_bench"]["average"] == 7.0
        assert len(judge.log) == 2 * 2 * len(QIDS)  # each judge graded every turn once
        # the precision and device of answers alone (no held-out measure) come from the answers
        alone = cfg.model_copy(update={"judge_model": "judge-3", "heldout_nll": False, "exact_match_sources": []})
        res = evaluate_model(store, evaluate_address("pivot", ref, alone, None), "pivot", ref, alone,
                             answers_address=answers, expect_measured=True)
        assert (res["device"], res["dtype"]) == ("cpu", "float32") and "heldout_nll" not in res


def test_an_evaluation_made_before_its_measures_had_an_address_needs_none(tmp_path, capsys):
    """After the upgrade that split evaluation, a finished evaluation has no held-out measures
    artifact of its own: `status` says its measures were skipped (not missing, which `--plan`
    would count as GPU work to do)."""
    from fusechat_core.config import load_config
    from fusechat_core.plan import RunPlan
    from tests.tiny_config import tiny_run_config

    path = tiny_run_config(tmp_path, f"file://{tmp_path / 'store'}")
    cfg = load_config(path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    done, todo = plan.evaluated_models()[:2]
    store.put_dir(plan.evaluate(done), _results_folder(tmp_path, done))
    assert main(["status", str(path), "--json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[f"heldout_measures[{done}]"]["state"] == "skipped"
    assert rows[f"heldout_measures[{todo}]"]["state"] == "missing"
    assert main(["run", str(path), "--plan", "--json"]) == 0
    costs = {r["stage"]: r for r in json.loads(capsys.readouterr().out)["stages"]}
    assert costs[f"heldout_measures[{done}]"]["remaining"] == 0 and costs[f"heldout_measures[{todo}]"]["remaining"] == 1


def _results_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / f"results-{name}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"model": name}))
    return folder


def test_what_the_gpu_step_left_undone_is_made_by_the_grading_step_saying_so(tiny_models, tmp_path, caplog):
    """The grading step of a run expects the GPU step's answers and measures; one missing (the
    questions at a moving URL changed in between) is made there rather than failing the run,
    and a warning says it ran outside the run's GPU limit. Nothing missing: no warning."""
    import logging

    from fusechat_core.config import EvaluateConfig
    from fusechat_core.evaluate.stage import evaluate_model, measure_model

    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    dataset = _dataset(store)
    ref = {"model": {"path": str(tiny_models["pivot"])}}
    cfg = EvaluateConfig(mt_bench=False, exact_match_sources=[])
    said = logging.getLogger("fusechat.evaluate")
    said.addHandler(caplog.handler)
    try:
        res = evaluate_model(store, "evaluate/a", "pivot", ref, cfg, dataset=dataset,
                             measures_address="heldout_measures/a", expect_measured=True)
        assert res["heldout_nll"]["all"]["tokens"] > 0 and store.is_complete("heldout_measures/a")
        assert "made here, outside the run's GPU limit" in caplog.text
        caplog.clear()
        measure_model(store, "pivot", ref, cfg, measures_address="heldout_measures/b", dataset=dataset)
        evaluate_model(store, "evaluate/b", "pivot", ref, cfg, dataset=dataset, measures_address="heldout_measures/b",
                       expect_measured=True)
        assert "outside the run's GPU limit" not in caplog.text
    finally:
        said.removeHandler(caplog.handler)
