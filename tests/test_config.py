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
    # an AWS secret holding "/" hides the "@" from a userinfo pattern: the bucket name gives it away
    (("store", "s3://AKIAIOSFODNN7EXAMPLE:wJalrX/supersecret/bPxRfiCY@mybucket/runs"),
     "store: s3 URL: the bucket is not an S3 bucket name"),
    (("evaluate", {"judge_base_url": "https://judge:supersecret@judge.internal/v1"}),
     "evaluate.judge_base_url: credentials do not belong in the URL"),
    (("evaluate", {"mt_bench_data": "https://me:supersecret@files.internal/mt-bench"}),
     "evaluate.mt_bench_data: credentials do not belong in the URL"),
    # a password holding "/" parses as a host and a path; a key in the query; a presigned URL
    (("evaluate", {"judge_base_url": "https://u:super/secret@judge.internal/v1"}),
     "evaluate.judge_base_url: credentials do not belong in the URL"),
    (("evaluate", {"judge_base_url": "https://judge.internal/v1?api_key=supersecret"}),
     "evaluate.judge_base_url: credentials do not belong in the URL"),
    (("evaluate", {"mt_bench_data": "https://b.s3.amazonaws.com/mt?X-Amz-Credential=AKIA&X-Amz-Signature=supersecret"}),
     "evaluate.mt_bench_data: credentials do not belong in the URL"),
    (("train", {"adam_betas": [0.9, 1.5]}), "train.adam_betas: each beta must be in [0, 1)"),
    (("data", {"sources": []}), "data: give a preset or at least one"),
    (("sources.1.name", "a"), "sources[1].name: duplicate model name"),
    (("data.sources.0.path", "./missing.jsonl"), "data.sources[0].path: no such file"),
    (("pivot.dtype", "int8"), "pivot.dtype: "),
    (("sources", []), "sources: "),
    (("train", {"lam": 1.5}), "train.lam: "),
    (("train", {"lam": [0.9, 1.2]}), "train.lam: "),
    (("train", {"lam": [0.9, 0.5, 0.9], "clm_baseline": True}), "train.lam: "),
    (("train", {"lam": [0.9, 0.5]}), "train.lam: [0.9, 0.5]: a λ ablation is measured against the CLM baseline"),
    (("merge", {"granularity": "neuron"}), "merge.granularity: "),
    (("pivot.name", "Bad Name!"), "pivot.name: "),
    (("train", {"fusion_function": "maxce"}), "train.fusion_function: unknown 'maxce'"),
    (("merge", {"method": "ties", "parameters": {"densty": 0.5}}), "merge.parameters.densty: "),
    (("sources.0.path", "demo:unknown"), "sources[0].path: 'demo:unknown' needs an entry under demo.models"),
    (("train", {"learning_rate": float("inf")}), "train.learning_rate: Input should be a finite number"),
    (("train", {"learning_rate": 1e39}), "train.learning_rate: 1e+39 cannot be represented in float32"),
    (("demo.learning_rate", 3.5e38), "demo.learning_rate: 3.5e+38 cannot be represented in float32"),
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
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert main(["run", str(latin1)]) == 2
    assert capsys.readouterr().err.strip() == f"fusechat: config error: {latin1}: not UTF-8 text (byte 9)"


def test_console_script_exit_code_is_2(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_with("bogus", 1)))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fusechat: config error: bogus: unknown key"


def test_an_s3_bucket_name_is_any_name_s3_allows_and_never_credentials():
    from fusechat_core.config import s3_bucket_problem

    # today's rule and the legacy us-east-1 one (uppercase, "_", up to 255): both still work
    for ok in ("s3://fusechat/runs", "s3://my.bucket-1", "s3://Legacy_Team_Bucket/x", "s3://" + "b" * 255):
        assert s3_bucket_problem(ok) is None, ok
    for bad in ("s3://AKIAXXX:supersecret@bucket/p", "s3://ab/x", "s3://" + "b" * 256,
                "s3://AKIAIOSFODNN7EXAMPLE:wJalrX/supersecret/bPxRfiCY@mybucket/runs"):
        problem = s3_bucket_problem(bad)
        assert problem is not None and "supersecret" not in problem and "AKIA" not in problem, bad


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


def test_demo_ablation_is_the_demo_with_a_lambda_list_and_shares_every_upstream_address():
    """configs/demo-ablation.yaml: demo.yaml but name and train.lam; its addresses of every stage
    above training, of the λ = 0.9 targets and of the CLM baseline are the demo's (Cached after
    `fusechat demo`); it adds one target per source and λ < 1 beyond the first."""
    from flows.cli import DEMO_CONFIG
    from fusechat_core.plan import RunPlan

    demo_raw = yaml.safe_load(DEMO_CONFIG.read_text())
    abl_raw = yaml.safe_load((DEMO_CONFIG.parent / "demo-ablation.yaml").read_text())
    assert abl_raw["train"].pop("lam") == [0.9, 1.0, 0.5, 0.0] and abl_raw.pop("name") == "demo-ablation"
    demo_raw.pop("name")
    assert abl_raw == demo_raw
    demo = RunPlan(load_config(DEMO_CONFIG))
    abl = RunPlan(load_config(DEMO_CONFIG.parent / "demo-ablation.yaml"))
    shared = {n.label: n.address for n in demo.nodes() if n.stage != "report"}  # evaluations too
    mine = {n.label: n.address for n in abl.nodes()}
    assert all(mine[k] == v for k, v in shared.items()), [k for k, v in shared.items() if mine.get(k) != v]
    extra = sorted(set(mine) - set(shared) - {"report"})
    assert extra == [f"{stage}[{p}{s}-lam{lam}]" for stage, p in (("evaluate", "target-"),
                                                                  ("heldout_measures", "target-"), ("train", ""))
                     for s in ("llama", "mixtral") for lam in ("0.5", "0")]
    assert abl.target_lam("mixtral-lam0") == 0.0 and abl.target_source("mixtral-lam0") == "mixtral"
    # an ablation target differs from its run-λ sibling by λ alone: same upstream artifacts
    assert abl.train("mixtral-lam0.5") != abl.train("mixtral")
    assert abl.report_roles()["ablation"] == {
        s: {"0.9": f"target-{s}", "1": "clm", "0.5": f"target-{s}-lam0.5", "0": f"target-{s}-lam0"}
        for s in ("mixtral", "llama")}
    assert "ablation" not in demo.report_roles()


def test_paper_config_ships_an_8_gpu_fsdp_launch_and_spreads_mixtral_over_gpus():
    import transformers
    from accelerate.commands.config.config_args import load_config_from_file

    from fusechat_core.plan import RunPlan
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "fusechat-7b-varm.yaml")
    # relative to the repository's root, the working folder of a deployment run
    accel = REPO / cfg.train.accelerate_config
    assert accel.is_file()
    launch = load_config_from_file(str(accel))  # accelerate's own reader of `accelerate config` files
    assert str(launch.distributed_type) in ("FSDP", "DistributedType.FSDP") and launch.num_processes == 8
    assert launch.mixed_precision == cfg.train.mixed_precision == "bf16"
    # FSDP wraps each decoder layer of the pivot (OpenChat-3.5: a Mistral model)
    assert hasattr(transformers, launch.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].replace(
        "DecoderLayer", "ForCausalLM"))
    from transformers.models.mistral import modeling_mistral

    assert hasattr(modeling_mistral, launch.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    mixtral = next(s for s in cfg.sources if s.name == "mixtral")
    assert mixtral.device_map == "auto"
    # where a model sits is not what it is: no address moves
    plain = cfg.model_copy(update={"sources": [s.model_copy(update={"device_map": None}) for s in cfg.sources]})
    assert [n.address for n in RunPlan(plain).nodes()] == [n.address for n in RunPlan(cfg).nodes()]


def test_every_cli_option_has_help_and_shows_its_default():
    import argparse

    from flows.cli import _parser

    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.option_strings)
            if not action.required and not isinstance(action, argparse._StoreTrueAction):
                formatter = sub._get_formatter()
                assert "default" in formatter._get_help_string(action), (name, action.option_strings)
        assert "(default: %" not in text, name  # every %(default)s was filled in
    run_help = subs.choices["run"].format_help()
    for stage in ("dataset", "represent", "align", "train", "merge", "evaluate", "report"):
        assert stage in run_help  # --until lists the stages
    assert "(default: keep the server's, or 90)" in " ".join(subs.choices["setup"].format_help().split())


def test_third_party_progress_bars_are_off_where_stages_run():
    """Any process that runs a stage imports tasks._stage first: the bars of transformers,
    datasets, huggingface_hub and plain tqdm are off there."""
    code = ("import tasks._stage, io, tqdm, transformers, datasets, huggingface_hub.utils as h\n"
            "from transformers.utils import logging as tl\n"
            "from datasets.utils import logging as dl\n"
            "buf = io.StringIO()\n"
            "for _ in tqdm.tqdm(range(3), file=buf): pass\n"
            "print(tl.is_progress_bar_enabled(), dl.is_progress_bar_enabled(), h.are_progress_bars_disabled(),"
            " repr(buf.getvalue()))\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False False True ''"
