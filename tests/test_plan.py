"""Stage addresses: an input change reaches exactly the stages downstream of it."""

from __future__ import annotations

import sys

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


def test_adding_a_source_adds_only_its_chain_the_merges_and_the_report(tmp_path):
    a = _tiny(tmp_path)
    b = _tiny(tmp_path, add=_add_wide)
    assert _changed(a, b) == {
        "demo_models[wide]", "represent[wide]", "vocab_map[wide]", "align[wide]", "train[wide]",
        "merge[varm]", "merge[linear]", "evaluate[wide]", "evaluate[target-wide]", "evaluate[merge-varm]",
        "evaluate[merge-linear]", "report"}
    # removing it again is the first run, address for address
    assert _changed(b, a) == {"merge[varm]", "merge[linear]", "evaluate[merge-varm]", "evaluate[merge-linear]",
                              "report"}
    # removing another source: the rest of the run is untouched
    c = _tiny(tmp_path, add=_add_wide, drop=lambda raw: raw["sources"].pop(1))
    assert _changed(b, c) == {"merge[varm]", "merge[linear]", "evaluate[merge-varm]", "evaluate[merge-linear]",
                              "report"}


def test_a_merge_method_or_evaluation_settings_change_only_what_reads_them(tmp_path):
    a = _tiny(tmp_path)
    m = _tiny(tmp_path, m=lambda raw: raw["merge"]["methods_extra"].append("ties"))
    assert _changed(a, m) == {"merge[ties]", "evaluate[merge-ties]", "report"}
    e = _tiny(tmp_path, e=lambda raw: raw["evaluate"].update(batch_size=4))
    assert _changed(a, e) == {n.label for n in a.nodes() if n.stage in ("evaluate", "report")}


def test_the_pivot_and_the_data_still_change_everything_downstream(tmp_path):
    a = _tiny(tmp_path)
    every = {n.label for n in a.nodes() if n.stage not in ("demo_models", "vocab_map")}
    p = _tiny(tmp_path, p=lambda raw: raw["pivot"].update(tokenizer="builtin:mistral-v3"))
    assert every <= _changed(a, p)
    d = _tiny(tmp_path, d=lambda raw: raw["data"].update(max_length=80))
    assert _changed(a, d) == every  # the models' own evaluations too: they read the held-out split
