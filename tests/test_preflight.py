"""Everything checkable without running a stage fails before the first one: exit 2 and one
line naming the field. YAML with duplicate keys or anchors/aliases is refused before any
expansion."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from fusechat_core.data.conversation import LOADERS
from tests.test_config import BASE, _with

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, cfg: dict) -> Path:
    cfg = {**cfg, "store": f"file://{tmp_path}/store"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _model_folder(root: Path, *, config: bool = True, tokenizer: bool = True) -> str:
    root.mkdir(parents=True)
    if config:
        (root / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return str(root)


def _cases(tmp: Path) -> list[tuple[dict, str]]:
    (tmp / "empty-data").mkdir()
    (tmp / "no-data").mkdir()
    (tmp / "no-data" / "notes.txt").write_text("not a data file")
    pivot = BASE["pivot"]
    return [
        (_with("data.sources.0.format", "bogus"), "data.sources[0].format: unknown format 'bogus' (known: auto, "),
        (_with("data.sources", [{"name": "m", "path": "demo:markov"}, {"name": "m", "path": "demo:arithmetic"}]),
         "data.sources[1].name: duplicate source name 'm'"),
        # an unnamed source is named after its path: two such are as ambiguous
        (_with("data.sources", [{"path": "demo:markov"}, {"path": "demo:markov", "count": 3}]),
         "data.sources[1].name: duplicate source name 'demo:markov'"),
        (_with("sources.0.tokenizer", "builtin:nope"),
         "sources[0].tokenizer: unknown built-in tokenizer 'builtin:nope'"),
        (_with("sources.1.path", _model_folder(tmp / "empty-model", config=False, tokenizer=False)),
         "sources[1].path: "),  # an empty folder: no config.json, named before the tokenizer library's error
        (_with("sources.1.path", _model_folder(tmp / "no-tokenizer", tokenizer=False)),
         "sources[1].path: "),
        (_with("sources.1", {"name": "b", "path": _model_folder(tmp / "weights-only", tokenizer=False),
                             "tokenizer": _model_folder(tmp / "no-tok-either", config=False, tokenizer=False)}),
         "sources[1].tokenizer: "),
        (_with("evaluate", {"judge_base_url": "not a url"}), "evaluate.judge_base_url: not an http(s) URL"),
        (_with("evaluate", {"judge_base_url": "http://127.0.0.1:99999/v1"}),
         "evaluate.judge_base_url: not a valid URL"),
        # a URL that does not parse is not repeated: what sits where its port should be may be a key
        (_with("evaluate", {"judge_base_url": "https://judge.internal:supersecret/v1"}),
         "evaluate.judge_base_url: not a valid URL (its host or port cannot be read)"),
        (_with("evaluate", {"mt_bench": True, "mt_bench_data": str(tmp / "no-such-folder")}),
         "evaluate.mt_bench_data: no such folder"),
        (_with("evaluate", {"mt_bench_data": "ftp://host/mt_bench"}), "evaluate.mt_bench_data: "),
        (_with("sources.1", {**pivot, "name": "again"}), "sources[1].path: the same model and tokenizer as 'pivot'"),
        (_with("data.sources.0.path", str(tmp / "empty-data")), "data.sources[0].path: "),
        (_with("data.sources.0.path", str(tmp / "no-data")), "data.sources[0].path: "),
        (_with("evaluate", {"models": ["pivot", "nobody"]}), "evaluate.models[1]: unknown model 'nobody'"),
        (_with("pivot.chat_template", "klingon"), "pivot.chat_template: unknown 'klingon'"),
        (_with("train", {"accelerate_config": str(tmp / "none.yaml")}), "train.accelerate_config: no such file"),
        # 8 processes (as configs/accelerate-fsdp-8gpu.yaml) of 4 sequences each do not split 120
        (_with("train", {"accelerate_config": _accelerate(tmp / "eight.yaml", 8), "batch_size": 120,
                         "micro_batch_size": 4}),
         "train.batch_size: 120 is not a multiple of micro_batch_size 4 × 8 processes"),
        (_with("train", {"accelerate_config": _accelerate(tmp / "eight-ok.yaml", 8), "batch_size": 128,
                         "micro_batch_size": 4}), None),
        # a second node's ranks' checkpoint files would never reach the store
        (_with("train", {"accelerate_config": _accelerate(tmp / "two-nodes.yaml", 16, num_machines=2),
                         "batch_size": 128, "micro_batch_size": 4}),
         "train.accelerate_config: num_machines 2 in "),
        (_with("store", ""), "store: empty URL"),
        # hub ids cannot be checked offline: they pass
        (_with("sources.1", {"name": "b", "path": "org/model-b", "revision": "v2"}), None),
    ]


def _accelerate(path, processes: int, **more) -> str:
    path.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_processes": processes, **more}))
    return str(path)


def test_each_preflight_failure_exits_2_with_one_line_naming_the_field(tmp_path, capsys):
    from fusechat_core.config import load_config
    from fusechat_core.preflight import check_config

    for i, (cfg, expected) in enumerate(_cases(tmp_path)):
        path = tmp_path / f"run{i}.yaml"
        path.write_text(yaml.safe_dump(cfg if "store" in cfg else {**cfg, "store": f"file://{tmp_path}/store"}))
        if expected is None:
            check_config(load_config(path))
            continue
        assert main(["run", str(path), "--plan"]) == 2, expected
        line = _one_error_line(capsys)
        assert line.startswith("fusechat: config error: " + expected), (expected, line)
        assert "supersecret" not in line


def test_known_formats_come_from_the_loader_registry(tmp_path, capsys):
    main(["status", str(_write(tmp_path, _with("data.sources.0.format", "bogus")))])
    known = _one_error_line(capsys).split("(known: ", 1)[1].rstrip(")").split(", ")
    assert known == ["auto", *LOADERS.names()] and "sharegpt" in known and "alpaca" in known
    # a registered loader is a known format at once
    from fusechat_core.config import load_config
    from fusechat_core.preflight import check_config

    LOADERS.register("preflight-test-format")(lambda row: [])
    try:
        check_config(load_config(_write(tmp_path, _with("data.sources.0.format", "preflight-test-format"))))
    finally:
        LOADERS._items.pop("preflight-test-format")


def test_an_empty_store_is_an_error_not_the_working_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, BASE)
    for command in (["run", str(path), "--plan"], ["status", str(path)], ["eval", "some/model", "--heldout", "x"]):
        assert main([*command, "--store", ""]) == 2
        assert _one_error_line(capsys) == ("fusechat: error: --store: empty URL: "
                                           "give a folder, a file:// or an s3:// URL")
    assert main(["run", str(path), "--plan", "--store", " "]) == 2
    assert _one_error_line(capsys).startswith("fusechat: ")
    assert not (tmp_path / "_prefect-records").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_eval_refuses_a_judge_url_that_is_not_one(capsys):
    assert main(["eval", "some/model", "--mt-bench", "--judge-base-url", "not a url"]) == 2
    assert _one_error_line(capsys) == "fusechat: error: --judge-base-url: not an http(s) URL (scheme 'none')"


def test_duplicate_yaml_keys_are_refused_naming_the_key(tmp_path, capsys):
    text = yaml.safe_dump(BASE)
    second = text.splitlines().index("name: t") + 2  # the later one is the duplicate
    cases = {"name: t\n" + text: f"name: duplicate key (line {second})",
             text.replace("  name: pivot\n", "  name: pivot\n  name: other\n", 1): "pivot.name: duplicate key",
             text + "sources: []\n": "sources: duplicate key"}
    for doc, expected in cases.items():
        path = tmp_path / "dup.yaml"
        path.write_text(doc)
        assert main(["run", str(path), "--plan"]) == 2
        assert _one_error_line(capsys).startswith("fusechat: config error: " + expected)


def test_yaml_aliases_are_refused_before_any_expansion(tmp_path):
    # A billion laughs: 10^9 strings once expanded. Refused at the first anchor, in a
    # fresh interpreter whose whole run (imports included) is bounded by the timeout.
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = yaml.safe_dump(BASE) + "merge:\n  method: ties\n  parameters:\n" + "".join(f"    {x}\n" for x in lines)
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--plan"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    line = len(yaml.safe_dump(BASE).splitlines()) + 4
    assert proc.stderr.strip() == f"fusechat: config error: {path}: line {line}: " \
                                  "YAML anchors and aliases are not allowed (&l0)"
    assert took < 30, took
    # an alias alone, without the anchor being refused first, is refused as well
    path.write_text(yaml.safe_dump(BASE) + "seed: *nowhere\n")
    with pytest.raises(Exception, match="YAML anchors and aliases are not allowed"):
        from fusechat_core.config import load_config

        load_config(path)


def test_mergekit_yaml_is_read_as_strictly(tmp_path):
    from fusechat_core.merge.translate import MergeError, configuration_from_yaml

    with pytest.raises(MergeError, match=r"^merge.mergekit_yaml: line 1: YAML anchors and aliases are not allowed"):
        configuration_from_yaml("a: &x [1, 2]\nb: *x\n", "/pivot", {})
    with pytest.raises(MergeError, match=r"^merge.mergekit_yaml: merge_method: duplicate key"):
        configuration_from_yaml("merge_method: linear\nmerge_method: ties\n", "/pivot", {})


def test_registry_checks_wait_for_the_invocation_that_runs_their_stage(tmp_path, capsys):
    """A bad merge parameter fails any run that merges (and its --plan), before anything runs; a run
    stopping before the merge (``--until represent``) and ``status`` neither check it nor pay for
    importing mergekit (seconds, in every such process)."""
    from fusechat_core.config import ConfigError, load_config
    from fusechat_core.preflight import preflight

    path = _write(tmp_path, _with("merge", {"method": "ties", "parameters": {"densty": 0.5}}))
    cfg = load_config(path)
    for until in ("merge", "report"):
        with pytest.raises(ConfigError, match=r"^merge\.parameters\.densty"):
            preflight(cfg, until)
    preflight(cfg, "represent")
    preflight(cfg, None)
    assert main(["run", str(path), "--plan", "--until", "merge"]) == 2
    assert _one_error_line(capsys).startswith("fusechat: config error: merge.parameters.densty")
    assert main(["run", str(path), "--plan", "--until", "train"]) == 0
    capsys.readouterr()
    code = ("import sys; from flows.cli import main; main(['status', sys.argv[1]]); "
            "print('mergekit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path):
    """`fusechat status CONFIG | head -1`: the pipe closes before status writes; exit 1, quietly."""
    from tests.tiny_config import tiny_run_config

    path = tiny_run_config(tmp_path, f"file://{tmp_path}/store")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "status", str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child can have written anything: it starts in a second or more
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_run_to_grade_by_openai_without_its_key_stops_before_its_first_stage(tmp_path, capsys, monkeypatch,
                                                                                tiny_models, caplog):
    """OpenAI's API answers a request without a key with 401: found after a week's stages and
    hours of answers on the GPU before. A run that still has evaluations to grade there stops
    at once, naming the variable; a local judge (which may need no key) and a run that ends
    before evaluation go on."""
    from flows.pipeline import fusechat_pipeline, run_can_start
    from fusechat_core.config import load_config
    from fusechat_core.plan import RunPlan
    from tests.tiny_config import tiny_run_config

    monkeypatch.delenv("FUSECHAT_TEST_ABSENT_KEY", raising=False)
    path = tiny_run_config(tmp_path, f"file://{tmp_path / 'store'}")
    raw = yaml.safe_load(path.read_text())
    raw["evaluate"] = {**raw.get("evaluate", {}), "mt_bench": True, "judge_base_url": "https://api.openai.com/v1",
                       "judge_api_key_env": "FUSECHAT_TEST_ABSENT_KEY"}
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    assert _one_error_line(capsys).startswith("fusechat: config error: evaluate.judge_api_key_env: "
                                              "FUSECHAT_TEST_ABSENT_KEY is not set in this process's environment")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    cfg = load_config(path)
    plan = RunPlan(cfg)
    run_can_start(cfg, plan, "train")  # no grading in this run
    monkeypatch.setenv("FUSECHAT_TEST_ABSENT_KEY", "sk-test\n")
    run_can_start(cfg, plan, "report")
    monkeypatch.delenv("FUSECHAT_TEST_ABSENT_KEY")
    local = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"judge_base_url": "http://127.0.0.1:8000/v1"})})
    run_can_start(local, RunPlan(local), "report")
    # under Dask the grading runs on the workers, whose environment this process cannot see
    dask = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"task_runner": "dask"})})
    import logging

    said = logging.getLogger("fusechat")
    said.addHandler(caplog.handler)  # the CLI above set the logger up to print, not to propagate
    try:
        run_can_start(dask, RunPlan(dask), "report")
    finally:
        said.removeHandler(caplog.handler)
    assert "FUSECHAT_TEST_ABSENT_KEY is not set" in caplog.text and "Dask workers" in caplog.text
    # a deployed run: the flow itself refuses, before its first task
    with pytest.raises(Exception, match="evaluate.judge_api_key_env: FUSECHAT_TEST_ABSENT_KEY is not set"):
        fusechat_pipeline(config=cfg.model_dump(mode="json"))
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
    capsys.readouterr()  # the flow run's own log lines
    # `fusechat eval` of a model not yet evaluated
    assert main(["eval", str(tiny_models["pivot"]), "--store", f"file://{tmp_path / 'eval-store'}", "--mt-bench",
                 "--judge-base-url", "https://api.openai.com/v1", "--judge-api-key-env",
                 "FUSECHAT_TEST_ABSENT_KEY"]) != 0
    assert "FUSECHAT_TEST_ABSENT_KEY is not set" in _one_error_line(capsys)


def test_status_reads_a_run_whose_accelerate_file_is_on_the_gpu_node_only(tmp_path, capsys):
    """`status` makes nothing: it refused a 7B config whose accelerate file exists only where
    the training runs. A run that trains still refuses it, naming the field."""
    from tests.tiny_config import tiny_run_config

    path = tiny_run_config(tmp_path, f"file://{tmp_path / 'store'}")
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {**raw["train"], "accelerate_config": str(tmp_path / "on-the-gpu-node.yaml")}
    path.write_text(yaml.safe_dump(raw))
    assert main(["status", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--plan"]) == 2
    assert _one_error_line(capsys).startswith("fusechat: config error: train.accelerate_config: no such file")
