"""Bad configs: exit code 2 and one line that names the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import load_config

BASE = {
    "name": "t",
    "pivot": {"name": "pivot", "path": "demo:pivot", "tokenizer": "builtin:mistral-v1"},
    "sources": [{"name": "a", "path": "demo:a", "tokenizer": "builtin:mistral-v3"},
                {"name": "b", "path": "org/model-b"}],
    "data": {"sources": [{"name": "m", "path": "demo:markov", "count": 5}]},
    "demo": {"models": {"pivot": {"arch": "mistral", "domains": {"markov": 1}},
                        "a": {"arch": "mixtral", "domains": {"markov": 1}}}},
}


def _with(path: str, value, base=None):
    cfg = yaml.safe_load(yaml.safe_dump(base or BASE))
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


_DELETE = object()

BAD = [
    # (edit, expected start of the message)
    (("bogus", 1), "bogus: unknown key"),
    (("sources.1.path", "./no/such/model"), "sources[1].path: no such directory"),
    (("sources.0.tokenizer", "/nonexistent/tok"), "sources[0].tokenizer: no such directory"),
    (("represent", {"top_k": 0}), "represent.top_k: "),
    (("pivot", _DELETE), "pivot: required"),
    (("train", {"batch_size": 10, "micro_batch_size": 4}), "train: batch_size must be a multiple"),
    (("store", "ftp://host/x"), "store: unsupported scheme"),
    (("store", "s3://AKIAXXX:supersecret@bucket/p"), "store: credentials do not belong"),
    (("data", {"sources": []}), "data: give a preset or at least one"),
    (("sources.1.name", "a"), "sources[1].name: duplicate model name"),
    (("data.sources.0.path", "./missing.jsonl"), "data.sources[0].path: no such file"),
    (("pivot.dtype", "int8"), "pivot.dtype: "),
    (("sources", []), "sources: "),
    (("train", {"lam": 1.5}), "train.lam: "),
    (("merge", {"granularity": "neuron"}), "merge.granularity: "),
    (("pivot.name", "Bad Name!"), "pivot.name: "),
    (("train", {"fusion_function": "maxce"}), "train.fusion_function: unknown 'maxce'"),
    (("merge", {"method": "ties", "parameters": {"densty": 0.5}}), "merge.parameters.densty: "),
    (("sources.0.path", "demo:unknown"), "sources[0].path: 'demo:unknown' needs an entry under demo.models"),
    (("train", {"learning_rate": float("inf")}), "train.learning_rate: Input should be a finite number"),
    (("train", {"temperature": float("nan")}), "train.temperature: Input should be a finite number"),
    (("evaluate", {"judge_deadline_s": float("inf")}), "evaluate.judge_deadline_s: Input should be a finite"),
]


@pytest.mark.parametrize("edit,expected", BAD, ids=[b[1].split(":")[0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_config_exits_2_with_one_line_naming_the_field(tmp_path, capsys, edit, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_with(*edit)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fusechat: config error: " + expected), lines[0]
    assert "supersecret" not in err


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\npivot: [unclosed\n")
    assert main(["status", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_console_script_exit_code_is_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_with("bogus", 1)))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fusechat: config error: bogus: unknown key"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("")
    cfg = _with("sources.1.path", "models/m")
    cfg["data"]["sources"][0]["path"] = "data.jsonl"
    path = tmp_path / "sub.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert loaded.sources[1].path == str((tmp_path / "models" / "m").resolve())
    assert loaded.data.sources[0].path == str((tmp_path / "data.jsonl").resolve())
    assert loaded.sources[0].path == "demo:a" and loaded.store.startswith("file:///")


def test_demo_and_paper_configs_validate():
    from flows.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    assert cfg.pivot.name == "pivot" and len(cfg.sources) == 2
