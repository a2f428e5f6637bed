"""``fusechat run CFG --plan``: the cost view (states, work, bytes, FLOPs); ``--against``: what a change invalidates."""

from __future__ import annotations

import json
import re
import socket

import pytest
import yaml

from fusechat_core.config import ModelSpec, parse_config
from fusechat_core.cost import model_size, plan_costs
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the plan must stay offline."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _hub_cache(root, repo: str, config_json: str):
    """A Hugging Face cache holding only ``repo``'s config.json, laid out as the hub client writes it."""
    commit = "0" * 40
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(config_json)
    return root


def test_parameter_counts_are_the_real_models(tiny_models, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    for name, folder in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        size = model_size(_cfg(tiny_models, tmp_path), ModelSpec(name=name, path=str(folder)))
        assert size.total == model.num_parameters(), name
        c = model.config
        if name == "mixtral":  # only 2 of the 4 experts' MLPs (3 matrices each) run per token
            idle = c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * 3 * c.hidden_size \
                * c.intermediate_size
            assert size.active == size.total - idle and idle > 0
        else:
            assert size.active == size.total
        assert size.vocab_size == c.vocab_size
    # a hub model: its config.json from the local cache only, counted the same way
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "org/tiny-pivot",
                                                                  (tiny_models["pivot"] / "config.json").read_text())))
    hub = model_size(_cfg(tiny_models, tmp_path), ModelSpec(name="p", path="org/tiny-pivot"))
    assert hub.total == AutoModelForCausalLM.from_pretrained(tiny_models["pivot"]).num_parameters()
    missing = model_size(_cfg(tiny_models, tmp_path), ModelSpec(name="m", path="org/not-cached"))
    assert missing.total is None and missing.fill == "huggingface-cli download org/not-cached config.json"


def _cfg(tiny_models, tmp_path, **represent):
    return parse_config({
        "name": "cost-test", "store": f"file://{tmp_path}/store", "seed": 5,
        "pivot": {"name": "pivot", "path": str(tiny_models["pivot"])},
        "sources": [{"name": "mixtral", "path": str(tiny_models["mixtral"])}],
        "data": {"sources": [{"path": "demo:markov", "count": 9}, {"path": "demo:arithmetic", "count": 7}],
                 "heldout_fraction": 0.25, "max_length": 256},
        "represent": {"top_k": 4, "batch_size": 4, "max_length": 256, "shards": 2, "device": "cpu", **represent},
        "align": {"vocab_mapping": "prefix"},
        "train": {"batch_size": 4, "micro_batch_size": 2, "epochs": 2, "max_length": 256},
    })


def _costs(cfg):
    from flows.cli import status_rows

    return plan_costs(RunPlan(cfg), ArtifactStore(cfg.store), {r["stage"]: r for r in status_rows(cfg)})


def _row(costs, label):
    return next(r for r in costs["stages"] if r["stage"] == label)


def test_the_cost_view_follows_the_store_and_its_estimates_hold(tiny_models, tmp_path, no_network):
    from transformers import AutoModelForCausalLM

    from fusechat_core.data import build_dataset_artifact
    from fusechat_core.represent import commit_representation, represent_model

    cfg = _cfg(tiny_models, tmp_path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    n_pivot = AutoModelForCausalLM.from_pretrained(tiny_models["pivot"]).num_parameters()

    # nothing in the store: every instance to run, the work bounded by the config's counts
    empty = _costs(cfg)
    assert {r["state"] for r in empty["stages"]} == {"to run"}
    rep = _row(empty, "represent[pivot]")
    assert (rep["sequences"], rep["tokens"], rep["basis"]) == (12, 12 * 256, "bound")  # (9-2)+(7-2) rows
    assert rep["flops"] == 2 * n_pivot * 12 * 256
    assert empty["totals"]["to_run"] == empty["totals"]["all"] and not empty["totals"]["all"]["unknown"]

    # the dataset built: its rows counted as the representation stage will render them
    build_dataset_artifact(cfg, store, plan.dataset)
    with_data = _costs(cfg)
    assert _row(with_data, "dataset")["state"] == "cached"
    expected = _row(with_data, "represent[pivot]")
    assert expected["basis"] == "dataset" and expected["sequences"] == store.read_json(plan.dataset,
                                                                                       "stats.json")["train"]
    assert _row(with_data, "represent[mixtral]")["basis"] == "~dataset"  # the pivot's count, not its own

    # one shard of two: partial, and half the represent work still to do
    represent_model(cfg, store, plan, cfg.pivot, 0)
    half = _costs(cfg)
    row = _row(half, "represent[pivot]")
    assert row["state"] == "partial (1 of 2 shards)" and row["remaining"] == 0.5
    assert half["totals"]["to_run"]["flops"] < half["totals"]["all"]["flops"]

    # committed: cached, measured; the counts and the byte estimate made before it existed hold
    represent_model(cfg, store, plan, cfg.pivot)
    commit_representation(cfg, store, plan, cfg.pivot)
    done = _row(_costs(cfg), "represent[pivot]")
    assert done["state"] == "cached" and done["basis"] == "measured" and done["bytes_basis"] == "stored"
    man = store.manifest(plan.represent(cfg.pivot)).meta
    assert (expected["sequences"], expected["tokens"], expected["supervised_tokens"]) == \
        (man["n_seq"], man["n_tokens"], man["n_supervised"])
    assert done["flops"] == 2 * n_pivot * man["n_tokens"]
    # the estimate is within 10% of the bytes the stage stored (stage manifest + shards)
    assert abs(expected["bytes"] - done["bytes"]) <= 0.10 * done["bytes"], (expected["bytes"], done["bytes"])
    # the aligned shards' estimate too (their rows are the pivot's supervised rows)
    from fusechat_core.align import align_shard_artifact, build_vocab_map_artifact, finish_align_artifact

    src = cfg.sources[0]
    aligned_estimate = _row(_costs(cfg), "align[mixtral]")["bytes"]
    represent_model(cfg, store, plan, src)
    build_vocab_map_artifact(cfg, store, plan.vocab_map(src), src)
    for i in range(2):
        align_shard_artifact(cfg, store, src, i)
    finish_align_artifact(cfg, store, src)
    aligned = _row(_costs(cfg), "align[mixtral]")
    assert aligned["state"] == "cached" and abs(aligned_estimate - aligned["bytes"]) <= 0.10 * aligned["bytes"], \
        (aligned_estimate, aligned["bytes"])
    # training: steps × batch sequences, 6·N·tokens for 2 epochs of the measured tokens
    train = _row(_costs(cfg), "train[mixtral]")
    assert train["steps"] == 6 and train["sequences"] == 24  # ceil(12/4) × 2 epochs, batch 4
    assert train["flops"] == 6 * n_pivot * round(man["n_tokens"] * 2)
    # preempted after its checkpoint at step 2: status says partial (it said missing, its
    # checkpoints' GBs unseen), and the plan counts the 4 steps left, not all 6
    from flows.cli import status_rows
    from fusechat_core.stages import checkpoint_address

    weights = tmp_path / "checkpoint"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\0" * 4096)
    store.put_dir(checkpoint_address(plan.train("mixtral"), 2), weights)
    [row] = [r for r in status_rows(cfg) if r["stage"] == "train[mixtral]"]
    assert (row["state"], row["reason"], row["checkpoint_step"]) == ("partial", "checkpoint at step 2", 2)
    assert row["size"] >= 4096
    train = _row(_costs(cfg), "train[mixtral]")
    assert train["state"] == "partial (checkpoint at step 2 of 6)" and train["remaining"] == pytest.approx(4 / 6)


def test_plan_offline_with_a_hub_model_prints_question_marks_and_how_to_fill(tiny_models, tmp_path, capsys,
                                                                             no_network):
    from flows.cli import main

    raw = yaml.safe_load(yaml.safe_dump(_cfg(tiny_models, tmp_path).model_dump(mode="json")))
    raw["sources"].append({"name": "solar", "path": "NousResearch/Nous-Hermes-2-SOLAR-10.7B"})
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--plan", "--json", "--gpu-tflops", "100", "--gpu-utilisation", "0.5"]) == 0
    costs = json.loads(capsys.readouterr().out)
    solar = _row(costs, "represent[solar]")
    assert solar["parameters"] is None and solar["flops"] is None and solar["gpu_hours"] is None
    assert "represent[solar]" in costs["totals"]["all"]["unknown"]
    pivot = _row(costs, "represent[pivot]")
    assert pivot["gpu_hours"] == pytest.approx(pivot["flops"] / (100e12 * 0.5) / 3600)
    assert costs["models"]["solar"]["fill"] == "huggingface-cli download NousResearch/Nous-Hermes-2-SOLAR-10.7B " \
                                               "config.json"
    assert main(["run", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "N of solar unknown: huggingface-cli download NousResearch/Nous-Hermes-2-SOLAR-10.7B config.json" in out
    cells = re.split(r"\s{2,}", next(x for x in out.splitlines() if x.startswith("represent[solar]")))
    assert cells[1] == "to run" and cells[2:5] == ["≤12", "≤3.07k", "≤3.07k"] and cells[6:9] == ["?", "?", "?"]
    total = next(x for x in out.splitlines() if x.startswith("total whole run:"))
    assert " FLOPs + ?, " in total and " GPU-hours + ?, " in total
    # solar's representation and held-out evaluation: the only GPU work whose N is unknown
    assert "  ? : N unknown for 2 stage instances (represent[solar], heldout_measures[solar])" in out


# -- --against: which instances a change invalidates, and why ---------------------------------------

def _diff(old_cfg, new_cfg):
    return {c["stage"]: c for c in RunPlan(new_cfg).diff(RunPlan(old_cfg))}


def test_against_names_the_input_that_changed(tiny_models, tmp_path, capsys):
    old = _cfg(tiny_models, tmp_path)
    longer = _cfg(tiny_models, tmp_path, max_length=512)
    d = _diff(old, longer)
    assert d["dataset"]["change"] == "unchanged" and d["vocab_map[mixtral]"]["change"] == "unchanged"
    assert d["represent[pivot]"]["why"] == ["represent.max_length: 256 → 512"]
    assert d["represent[mixtral]"]["why"] == ["represent.max_length: 256 → 512"]
    assert set(d["align[mixtral]"]["why"]) == {"represent[pivot] changed", "represent[mixtral] changed"}
    assert "align[mixtral] changed" in d["train[mixtral]"]["why"]
    assert d["evaluate[pivot]"]["change"] == "unchanged"  # a model's own evaluation reads no representation

    raw = old.model_dump(mode="json")
    raw["data"]["sources"][1]["count"] = 8
    raw["sources"].append({"name": "llama", "path": str(tiny_models["llama"])})
    d = _diff(old, parse_config(raw))
    # said once: the dataset's "sources as read" (preset's, then the config's) repeated it as
    # "sources[1].count", the name of a model source
    assert d["dataset"]["why"] == ["data.sources[1].count: 7 → 8"]
    assert d["represent[pivot]"]["why"] == ["dataset changed"]
    assert d["represent[llama]"]["change"] == "new"
    # the data reaches every stage but the vocabulary maps, which read only the two tokenizers
    assert {k for k, c in d.items() if c["change"] == "unchanged"} == {"vocab_map[mixtral]"}

    # the command line: one line per invalidated instance, the unchanged counted
    from flows.cli import main

    a, b = tmp_path / "old.yaml", tmp_path / "new.yaml"
    a.write_text(yaml.safe_dump(old.model_dump(mode="json")))
    b.write_text(yaml.safe_dump(longer.model_dump(mode="json")))
    assert main(["run", str(b), "--plan", "--against", str(a)]) == 0
    out = capsys.readouterr().out
    assert any(x.split() == ["changed", "represent[pivot]", "represent.max_length:", "256", "→", "512"]
               for x in out.splitlines()), out
    assert any(x.split() == ["changed", "align[mixtral]", "upstream", "changed:", "represent[pivot],",
                             "represent[mixtral]"] for x in out.splitlines()), out
    n_same = sum(c["change"] == "unchanged" for c in _diff(old, longer).values())
    assert f"unchanged ({n_same}): dataset, " in out
    assert main(["run", str(b), "--against", str(a)]) == 2  # --against needs --plan


def test_counts_made_with_a_tokenizer_folder_edited_since_are_made_again(tiny_models, tmp_path, monkeypatch):
    """The dataset's token counts are kept between ``--plan`` calls under the tokenizer's
    identity: a local folder is known by its files, so one edited in place (here: its chat
    template, which every rendered row carries) is counted again, not read from the old counts."""
    import shutil

    from fusechat_core.chat import TEMPLATES
    from fusechat_core.cost import _count_dataset
    from fusechat_core.data import build_dataset_artifact

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "pivot"
    shutil.copytree(tiny_models["pivot"], folder)
    cfg = _cfg(tiny_models, tmp_path)
    cfg = cfg.model_copy(update={"pivot": cfg.pivot.model_copy(update={"path": str(folder)})})
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    build_dataset_artifact(cfg, store, plan.dataset)

    (folder / "chat_template.jinja").write_text(TEMPLATES.get("mistral"))
    before = _count_dataset(plan, store, "train", (256,))[256]
    assert _count_dataset(plan, store, "train", (256,))[256] == before  # kept: same files
    # the same template behind a long system preamble: every row gets longer
    preamble = "You are a careful assistant who answers in full sentences and never guesses. " * 3
    (folder / "chat_template.jinja").write_text(preamble + TEMPLATES.get("mistral"))
    after = _count_dataset(plan, store, "train", (256,))[256]
    assert after.sequences == before.sequences and after.tokens > before.tokens + 20 * before.sequences, \
        (before, after)
    assert len(list((tmp_path / "cache" / "plan-counts").iterdir())) == 2


def test_status_on_a_cpu_machine_finds_what_a_gpu_made_under_mixed_precision_auto(tmp_path, capsys):
    """`auto` is bf16 on a GPU and no on a CPU, and a target's address says which: `status` on
    a laptop showed a run finished on GPUs as every target, merge and evaluation missing. An
    artifact missing here but done under the other resolution is shown done, saying where."""
    from flows.cli import main, status_rows
    from fusechat_core.config import load_config
    from fusechat_core.models import resolve_mixed_precision
    from tests.tiny_config import tiny_run_config

    path = tiny_run_config(tmp_path, f"file://{tmp_path / 'store'}")
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {**raw["train"], "mixed_precision": "auto"}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    other = "no" if resolve_mixed_precision("auto") == "bf16" else "bf16"
    gpu = RunPlan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"mixed_precision": other})}))
    here = RunPlan(cfg)
    target = cfg.sources[0].name
    assert gpu.train(target) != here.train(target) and gpu.dataset == here.dataset
    weights = tmp_path / "target"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"\0" * 64)
    store = ArtifactStore(cfg.store)
    store.put_dir(gpu.train(target), weights)
    rows = {r["stage"]: r for r in status_rows(cfg, elsewhere=True)}
    row = rows[f"train[{target}]"]
    assert (row["state"], row["address"]) == ("done", gpu.train(target))
    assert row["reason"] == f"made where train.mixed_precision auto was {other}"
    assert rows["dataset"]["state"] == "missing" and "reason" not in rows["dataset"]  # the same address either way
    assert main(["status", str(path)]) == 0
    assert f"made where train.mixed_precision auto was {other}" in capsys.readouterr().out
    # the plan counts what a run started here makes: that target, at this machine's address
    train = _row(_costs(cfg), f"train[{target}]")
    assert (train["state"], train["address"], train["remaining"]) == ("to run", here.train(target), 1)
