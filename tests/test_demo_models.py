"""The demo's models: a cached stage whose output loads like any hub model."""

from __future__ import annotations

import torch

from fusechat_core.config import parse_config
from fusechat_core.demo import build_demo_model_artifact, materialise, quick_demo
from fusechat_core.models import load_causal_lm
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore


def _cfg(store: str, pivot_steps: int = 3, **demo_extra):
    return parse_config({
        "store": store,
        "pivot": {"name": "pivot", "path": "demo:pivot", "tokenizer": "builtin:mistral-v1"},
        "sources": [{"name": "moe", "path": "demo:moe", "tokenizer": "builtin:mistral-v3"}],
        "data": {"sources": [{"name": "a", "path": "demo:arithmetic", "count": 4}]},
        "demo": {"batch_size": 4, "max_length": 64, **demo_extra,
                 "models": {"pivot": {"arch": "mistral", "hidden": 32, "intermediate": 64, "steps": pivot_steps,
                                      "domains": {"arithmetic": 1, "reverse": 1}},
                            "moe": {"arch": "mixtral", "hidden": 32, "intermediate": 64, "steps": 3,
                                    "domains": {"facts": 1}}}},
    })


def test_demo_config_changes_reach_exactly_the_dependent_addresses(tmp_path):
    a, b = RunPlan(_cfg("file:///x")), RunPlan(_cfg("file:///x", pivot_steps=4))
    pivot_a, pivot_b = a.cfg.pivot, b.cfg.pivot
    moe_a, moe_b = a.cfg.sources[0], b.cfg.sources[0]
    assert a.demo_model(pivot_a) != b.demo_model(pivot_b)
    assert a.represent(pivot_a) != b.represent(pivot_b)
    assert a.demo_model(moe_a) == b.demo_model(moe_b)
    assert a.represent(moe_a) == b.represent(moe_b)
    # shared training settings change every demo model
    c = RunPlan(_cfg("file:///x", learning_rate=1e-2))
    assert c.demo_model(c.cfg.sources[0]) != a.demo_model(moe_a)


def test_the_quick_demo_is_the_demo_at_a_quarter_of_its_rows_and_steps():
    from flows.cli import DEMO_CONFIG, _parser
    from fusechat_core.config import load_config

    full = load_config(DEMO_CONFIG, store="file:///x")
    quick = quick_demo(full)
    assert quick.name == "demo-quick" and _parser().parse_args(["demo", "--quick"]).quick
    # the same world, models and stages: only the counts and steps (each rounded up) and the epochs differ
    assert [(m.name, m.path, m.tokenizer) for m in quick.models] == [(m.name, m.path, m.tokenizer) for m in full.models]
    assert quick.merge == full.merge and quick.represent == full.represent
    assert quick.train == full.train.model_copy(update={"epochs": 1}) and full.train.epochs == 3
    assert [(s.name, s.count) for s in quick.data.sources] == [(s.name, -(-s.count // 4)) for s in full.data.sources]
    for name, spec in full.demo.models.items():
        assert quick.demo.models[name] == spec.model_copy(update={"steps": -(-spec.steps // 4)}), name
    assert full.demo.models["pivot"].steps == 150 and quick.demo.models["pivot"].steps == 38
    a, b = RunPlan(full), RunPlan(quick)
    assert [n.label for n in a.nodes()] == [n.label for n in b.nodes()]
    # both sit in one store: only the vocabulary maps, a function of the tokenizers alone, are shared
    shared = {n.address for n in a.nodes()} & {n.address for n in b.nodes()}
    assert shared == {n.address for n in a.nodes() if n.stage == "vocab_map"} and len(shared) == 2


def test_demo_models_are_deterministic_and_load_like_hub_models(tmp_path):
    digests = []
    for run in ("one", "two"):
        cfg = _cfg(f"file://{tmp_path}/{run}")
        plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
        for spec in cfg.models:
            summary = build_demo_model_artifact(cfg, spec, store, plan.demo_model(spec))
            assert summary["steps"] == 3 and summary["final_loss"] > 0
        digests.append([store.manifest(plan.demo_model(s)).digest for s in cfg.models])
    assert digests[0] == digests[1], "same config and seed must give the same weights, byte for byte"

    materialise(plan, store)
    moe = load_causal_lm(cfg.sources[0], device="cpu")
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.hidden_size == 32 and moe.config.vocab_size == 32768
    with torch.no_grad():
        logits = moe(torch.tensor([[1, 20, 30]])).logits
    assert logits.shape == (1, 3, 32768) and torch.isfinite(logits).all()
    files = {f.path for f in store.manifest(plan.demo_model(cfg.pivot)).files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    # the same bytes wherever it is built: the tests run with HF_HUB_OFFLINE=1, which a
    # saved tokenizer would otherwise record as local_files_only
    assert "local_files_only" not in store.read_bytes(plan.demo_model(cfg.pivot), "tokenizer_config.json").decode()


def test_a_demo_models_own_learning_rate_reaches_that_model_alone(tmp_path):
    from fusechat_core.demo import pretrain_demo_model

    base = _cfg("file:///x")

    def with_moe_rate(rate):
        moe = base.demo.models["moe"].model_copy(update={"learning_rate": rate})
        return base.model_copy(update={"demo": base.demo.model_copy(update={"models": {**base.demo.models,
                                                                                        "moe": moe}})})

    fast = with_moe_rate(3e-2)
    a, b = RunPlan(base), RunPlan(fast)
    assert a.demo_model(base.pivot) == b.demo_model(fast.pivot)
    assert a.demo_model(base.sources[0]) != b.demo_model(fast.sources[0])
    # pre-training takes the model's own rate where it has one, the shared one elsewhere: the
    # shared rate written out is the same training, another rate another one
    digests = {}
    for label, cfg in (("unset", base), ("explicit", with_moe_rate(base.demo.learning_rate)), ("fast", fast)):
        pretrain_demo_model(cfg, cfg.sources[0], tmp_path / label)
        digests[label] = (tmp_path / label / "model.safetensors").read_bytes()
    assert digests["unset"] == digests["explicit"] != digests["fast"]
