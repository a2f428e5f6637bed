"""Stage addresses: an input change reaches exactly the stages downstream of it."""

from __future__ import annotations

import sys

import pytest

from fusechat_core.plan import RunPlan
from tests.test_demo_models import _cfg


def _with(cfg, section: str, **changes):
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=changes)})


def test_operational_training_settings_keep_the_target_address():
    base = _cfg("file:///x")
    operational = _with(base, "train", checkpoint_every=7, keep_checkpoints=5)
    assert RunPlan(base).train("moe") == RunPlan(operational).train("moe")
    assert RunPlan(base).train("moe") != RunPlan(_with(base, "train", learning_rate=1e-4)).train("moe")


def test_the_target_address_holds_the_precision_that_runs(monkeypatch):
    """``train.mixed_precision: auto`` is bf16 on a GPU and no change on the CPU: two different
    trainings. The address holds the resolved value: ``auto`` shares its address with the
    explicit value it resolves to on the machine making the plan, and never with the other."""
    import fusechat_core.models as models

    base = _cfg("file:///x")
    plans = {p: RunPlan(_with(base, "train", mixed_precision=p)) for p in ("auto", "bf16", "no", "fp16")}
    for machine, other in (("bf16", "no"), ("no", "bf16")):  # a bf16 GPU; a CPU
        monkeypatch.setattr(models, "_auto_mixed_precision", lambda machine=machine: machine)
        auto = plans["auto"].train("moe")
        assert auto == plans[machine].train("moe") != plans[other].train("moe")
        assert plans["auto"].merge("varm") == plans[machine].merge("varm")  # downstream follows
    assert len({plans[p].train("moe") for p in ("bf16", "no", "fp16")}) == 3


def test_auto_precision_is_what_torch_says_and_needs_no_torch_without_a_gpu(monkeypatch, tmp_path):
    import torch

    import fusechat_core.models as models

    says = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    models._auto_mixed_precision.cache_clear()
    assert models.resolve_mixed_precision("auto") == says
    if not torch.cuda.is_available():  # this machine: the device check alone must have said so
        assert not models._gpu_possible()
    # the device check itself, whatever this machine has: a driver's node present, then hidden
    if sys.platform == "linux":
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.setattr(models, "GPU_DEVICE_PATHS", (str(tmp_path / "nvidiactl"),))
        assert not models._gpu_possible()
        (tmp_path / "nvidiactl").touch()
        assert models._gpu_possible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not models._gpu_possible()
    models._auto_mixed_precision.cache_clear()


def test_the_judge_budget_keeps_the_evaluate_address():
    base = _cfg("file:///x")
    budget = _with(base, "evaluate", judge_timeout_s=5, judge_max_retries=0, judge_max_retry_after_s=1,
                   judge_deadline_s=None, judge_concurrency=16)
    assert RunPlan(base).evaluate("merge-varm") == RunPlan(budget).evaluate("merge-varm")
    assert RunPlan(base).evaluate("merge-varm") != RunPlan(_with(base, "evaluate", judge_model="x")).evaluate(
        "merge-varm")


def test_a_change_propagates_downstream_and_only_downstream():
    a = RunPlan(_cfg("file:///x"))
    b = RunPlan(_with(a.cfg, "represent", top_k=5))
    moe = a.cfg.sources[0]
    assert a.dataset == b.dataset and a.vocab_map(moe) == b.vocab_map(moe)
    assert a.represent(moe) != b.represent(moe)
    assert a.align(moe) != b.align(moe)
    assert a.train("moe") != b.train("moe") and a.merge("varm") != b.merge("varm")
    assert a.evaluate("merge-varm") != b.evaluate("merge-varm")
    # evaluating the sources themselves does not depend on representations
    assert a.evaluate("moe") == b.evaluate("moe")
    # the store location is not an input: the same run in another store has the same addresses
    c = RunPlan(_cfg("file:///elsewhere"))
    assert [n.address for n in c.nodes()] == [n.address for n in a.nodes()]
    # every address is distinct
    addresses = [n.address for n in a.nodes()]
    assert len(addresses) == len(set(addresses))


def test_report_roles_name_each_demo_source_expert_data():
    from fusechat_core.config import load_config

    cfg = load_config("configs/demo.yaml")
    roles = RunPlan(cfg).report_roles()
    assert roles["clm"] == "clm" and roles["merges"][0] == "merge-varm"  # the run's method, then the baselines
    assert set(roles["merges"]) == {f"merge-{m}" for m in RunPlan(cfg).merge_methods()}
    # configs/demo.yaml weighs mixtral 4:4 on markov, facts and llama 8:8 on ballad, reverse (1 elsewhere)
    assert roles["targets"] == {"target-mixtral": {"source": "mixtral", "expert_domains": ["markov", "facts"]},
                                "target-llama": {"source": "llama", "expert_domains": ["ballad", "reverse"]}}
    paper = RunPlan(load_config("configs/fusechat-7b-varm.yaml")).report_roles()
    assert all(t["expert_domains"] is None for t in paper["targets"].values())


# -- incremental fusion: an address depends only on what its stage reads ------------------

def _tiny(tmp_path, **edit):
    import yaml

    from fusechat_core.config import load_config
    from tests.tiny_config import tiny_run_config

    path = tiny_run_config(tmp_path, "file:///x")
    raw = yaml.safe_load(path.read_text())
    for fn in edit.values():
        fn(raw)
    path.write_text(yaml.safe_dump(raw))
    return RunPlan(load_config(path))


def _add_wide(raw):
    raw["sources"].append({"name": "wide", "path": "demo:wide", "tokenizer": "builtin:tekken", "dtype": "float32"})
    raw["demo"]["models"]["wide"] = {"arch": "llama", "hidden": 32, "intermediate": 64, "steps": 2,
                                     "domains": {"markov": 1}}


def _changed(a: RunPlan, b: RunPlan) -> set[str]:
    """Labels of b's nodes whose address a does not have (new or recomputed)."""
    old = {n.address for n in a.nodes()}
    return {n.label for n in b.nodes() if n.address not in old}


def _evaluations(*models: str) -> list[str]:
    """The nodes of each model's evaluation in the tiny run (held-out measures on, MT-Bench off)."""
    return [f"{stage}[{m}]" for m in models for stage in ("heldout_measures", "evaluate")]


def test_adding_a_source_adds_only_its_chain_the_merges_and_the_report(tmp_path):
    a = _tiny(tmp_path)
    b = _tiny(tmp_path, add=_add_wide)
    assert _changed(a, b) == {
        "demo_models[wide]", "represent[wide]", "vocab_map[wide]", "align[wide]", "train[wide]",
        "merge[varm]", "merge[linear]", *_evaluations("wide", "target-wide", "merge-varm", "merge-linear"),
        "report"}
    # removing it again is the first run, address for address
    assert _changed(b, a) == {"merge[varm]", "merge[linear]", *_evaluations("merge-varm", "merge-linear"), "report"}
    # removing another source: the rest of the run is untouched
    c = _tiny(tmp_path, add=_add_wide, drop=lambda raw: raw["sources"].pop(1))
    assert _changed(b, c) == {"merge[varm]", "merge[linear]", *_evaluations("merge-varm", "merge-linear"), "report"}


def test_a_merge_method_or_evaluation_settings_change_only_what_reads_them(tmp_path):
    a = _tiny(tmp_path)
    m = _tiny(tmp_path, m=lambda raw: raw["merge"]["methods_extra"].append("ties"))
    assert _changed(a, m) == {"merge[ties]", *_evaluations("merge-ties"), "report"}
    e = _tiny(tmp_path, e=lambda raw: raw["evaluate"].update(batch_size=4))
    assert _changed(a, e) == {n.label for n in a.nodes() if n.stage in ("heldout_measures", "evaluate", "report")}
    # another judge grades the same answers: the held-out measures (the model, a GPU) stay
    j = _tiny(tmp_path, j=lambda raw: raw["evaluate"].update(judge_model="gpt-4o"))
    assert _changed(a, j) == {n.label for n in a.nodes() if n.stage in ("evaluate", "report")}


def test_varm_granularity_moves_only_the_varm_merge(tmp_path):
    """merge.granularity is VaRM's setting: switching it recomputed every other method's merge
    and evaluation (paid MT-Bench verdicts included) for the same output."""
    a = _tiny(tmp_path)
    layer = _tiny(tmp_path, g=lambda raw: raw["merge"].update(granularity="layer"))
    assert _changed(a, layer) == {"merge[varm]", *_evaluations("merge-varm"), "report"}


def test_the_pivot_and_the_data_still_change_everything_downstream(tmp_path):
    a = _tiny(tmp_path)
    every = {n.label for n in a.nodes() if n.stage not in ("demo_models", "vocab_map")}
    p = _tiny(tmp_path, p=lambda raw: raw["pivot"].update(tokenizer="builtin:mistral-v3"))
    assert every <= _changed(a, p)
    d = _tiny(tmp_path, d=lambda raw: raw["data"].update(max_length=80))
    assert _changed(a, d) == every  # the models' own evaluations too: they read the held-out split


# -- a registered entry's version moves only what was made with it --------------------------

def _bump(monkeypatch, registry, name: str, version: int = 2) -> None:
    """As if ``name`` had been registered with ``version`` (the entry's code changed)."""
    assert name in registry
    monkeypatch.setitem(registry._versions, name, version)


def _moved(before: dict[str, str], plan: RunPlan) -> set[str]:
    """Labels whose address differs from ``before`` (label -> address, taken before a bump:
    a plan derives its addresses when asked, so an old plan asked again sees the new code)."""
    return {n.label for n in plan.nodes() if before.get(n.label) != n.address}


def _snapshot(plan: RunPlan) -> dict[str, str]:
    return {n.label: n.address for n in plan.nodes()}


def test_first_versions_move_no_address_of_an_existing_run():
    """The paper's 7B config's addresses (first derived before registry versions existed,
    commit b8a0af7; moved since only by versions that change what that config makes:
    dataset 5, align 4, evaluate 3 and 4, evaluate.dtype, the varm merge method 2): every
    entry at version 1 must leave them where they are, or a user's finished week of GPU work
    would be recomputed by an upgrade. The varm method's version moves its merge and what
    reads it, never the targets."""
    from fusechat_core.config import load_config

    plan = RunPlan(load_config("configs/fusechat-7b-varm.yaml", store="file:///x"))
    assert plan.dataset == "dataset/15eafc0f086b4d0ce15c"
    assert plan.align(plan.model("mixtral")) == "align/mixtral-33f9214aa39b9d81944f"
    assert plan.train("mixtral") == "train/mixtral-5cc24823c3c646d51c48"
    assert plan.merge("varm") == "merge/varm-dc59e1e066218d92c9fc"
    assert plan.report() == "report/16e904dd1d32c7fff274"  # and so everything upstream of it


def test_a_domain_version_moves_the_demo_artifacts_that_read_it_and_nothing_else(tmp_path, monkeypatch):
    from fusechat_core.data.synthetic import DOMAINS

    a = _snapshot(_tiny(tmp_path))
    every = {label for label in a if label.split("[")[0] not in ("demo_models", "vocab_map")}
    _bump(monkeypatch, DOMAINS, "ballad", 3)  # the tiny run reads no ballad
    assert _moved(a, _tiny(tmp_path)) == set()
    _bump(monkeypatch, DOMAINS, "arithmetic")  # read by the dataset and by deep's pre-training
    assert _moved(a, _tiny(tmp_path)) == every | {"demo_models[deep]"}


def _real_data(tmp_path, fmt: str):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}\n')
    return lambda raw: raw["data"].update(sources=[{"name": "chats", "path": str(path), "format": fmt}])


def test_a_loader_or_cleaner_version_moves_the_datasets_it_may_read(tmp_path, monkeypatch):
    from fusechat_core.data.conversation import LOADERS
    from fusechat_core.data.synthetic import DOMAINS

    formats = ("sharegpt", "alpaca", "auto")
    before = {f: _tiny(tmp_path, d=_real_data(tmp_path, f)).dataset for f in formats}
    assert len(set(before.values())) == 3
    _bump(monkeypatch, DOMAINS, "markov")  # a demo domain: real data keeps its address
    _bump(monkeypatch, LOADERS, "no_robots")  # a loader ``auto`` never chooses
    assert {f: _tiny(tmp_path, d=_real_data(tmp_path, f)).dataset for f in formats} == before

    def dataset_inputs(fmt: str) -> list[str]:
        plan = _tiny(tmp_path, d=_real_data(tmp_path, fmt))
        return plan.inputs(next(n for n in plan.nodes() if n.stage == "dataset"))

    assert not [line for line in dataset_inputs("auto") if line.startswith("implementations")]
    _bump(monkeypatch, LOADERS, "sharegpt")
    after = {f: _tiny(tmp_path, d=_real_data(tmp_path, f)).dataset for f in formats}
    assert after["alpaca"] == before["alpaca"]
    assert after["sharegpt"] != before["sharegpt"] and after["auto"] != before["auto"]
    # --plan names what the address carries under the dataset's row
    assert dataset_inputs("auto")[-1] == "implementations: loader sharegpt version 2"
    assert not [line for line in dataset_inputs("alpaca") if line.startswith("implementations")]
    # the cleaner likewise: only datasets that are cleaned move
    from fusechat_core.data.clean import CLEANERS

    cleaned = lambda raw: raw["data"].update(clean="vicuna")  # noqa: E731
    was_cleaned = _tiny(tmp_path, d=_real_data(tmp_path, "alpaca"), c=cleaned).dataset
    _bump(monkeypatch, CLEANERS, "vicuna")
    assert _tiny(tmp_path, d=_real_data(tmp_path, "alpaca"), c=cleaned).dataset != was_cleaned
    assert _tiny(tmp_path, d=_real_data(tmp_path, "alpaca")).dataset == before["alpaca"]


def test_an_aligner_or_merge_method_version_moves_only_what_it_made(tmp_path, monkeypatch):
    from fusechat_core.align.sequence import SEQUENCE_ALIGNERS
    from fusechat_core.merge.methods import MERGE_METHODS

    offsets = lambda raw: raw.update(align={"method": "offsets"})  # noqa: E731
    a, a_offsets = _snapshot(_tiny(tmp_path)), _snapshot(_tiny(tmp_path, o=offsets))
    _bump(monkeypatch, MERGE_METHODS, "linear")
    assert _moved(a, _tiny(tmp_path)) == {"merge[linear]", *_evaluations("merge-linear"), "report"}
    _bump(monkeypatch, SEQUENCE_ALIGNERS, "dtw")
    # ``auto`` may fall back to DTW (a tokenizer without offsets); ``offsets`` never does
    assert _moved(a_offsets, _tiny(tmp_path, o=offsets)) == {"merge[linear]", *_evaluations("merge-linear"), "report"}
    changed = _moved(a, _tiny(tmp_path))
    assert {"align[moe]", "align[deep]", "train[moe]", "train[deep]"} <= changed
    assert not {n for n in changed if n.split("[")[0] in ("dataset", "represent", "vocab_map", "demo_models")}
    assert "train[clm]" not in changed


def test_only_registries_whose_versions_enter_addresses_take_one():
    from fusechat_core.registry import Registry

    free, addressed = Registry("fusion function"), Registry("data loader", addressed=True)
    with pytest.raises(ValueError, match="enters no address; bump the stage's version"):
        free.register("x", version=2)(object())
    free.register("x")(object())  # a first version is every entry's
    with pytest.raises(ValueError, match="versions start at 1"):
        addressed.register("y", version=0)
    addressed.register("a")(object())
    addressed.register("b", version=3)(object())
    assert addressed.versions(["a", "b", "b", "unknown"]) == {"b": 3}
    assert addressed.version("a") == 1


def test_earlier_judgments_name_the_evaluation_addresses_version_3_gave(monkeypatch):
    """Verdicts bought before they had an address of their own lived under the evaluation's
    address at evaluate version 3: the plan itself, set back to that version, must give the
    very places ``earlier_judgments`` looks in (a run's models and ``fusechat eval``'s)."""
    from fusechat_core.config import load_config
    from fusechat_core.plan import earlier_judgments, standalone_evaluate_address
    from fusechat_core.stages import STAGE_VERSIONS

    cfg = load_config("configs/fusechat-7b-varm.yaml", store="file:///x")
    plan = RunPlan(cfg)
    names = plan.evaluated_models()
    looked = {n: earlier_judgments(n, plan.model_ref(n), cfg.evaluate, plan.dataset) for n in names}
    ref = {"model": {"path": "/models/m"}}
    standalone = earlier_judgments("m", ref, cfg.evaluate, None)
    monkeypatch.setitem(STAGE_VERSIONS, "evaluate", 3)
    then = RunPlan(cfg)
    assert {n: [then.evaluate(n)] for n in names} == looked and len(names) > 5
    assert standalone == [standalone_evaluate_address("m", ref, cfg.evaluate, None)]
