"""``merge.preset: paper``: the baselines with the released FuseChat mergekit configs' values.

The expected values are the released files themselves (FuseAI/FuseChat at
FuseChat/merge/mergekit_configs/, Feb 2024), copied here as published, and the
released linear merge (merge/VaRM/merge.py --linear_weights "1,2").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.cli import main
from fusechat_core.config import MergeConfig, load_config
from fusechat_core.merge.methods import method_parameters
from fusechat_core.merge.translate import MergeError, build_configuration, check_merge_config
from fusechat_core.plan import RunPlan

REPO = Path(__file__).resolve().parents[1]

_TASK_VECTORS = """
models:
  - model: openchat/openchat_3.5
  - model: FuseAI/OpenChat-3.5-7B-Mixtral
    parameters:
      density: 0.5
      weight: 0.25
  - model: FuseAI/OpenChat-3.5-7B-Solar
    parameters:
      density: 0.5
      weight: 0.5
merge_method: {method}
base_model: openchat/openchat_3.5
parameters:
  normalize: true
dtype: bfloat16
"""
RELEASED = {m: yaml.safe_load(_TASK_VECTORS.format(method=m)) for m in ("task_arithmetic", "ties", "dare_linear")}
RELEASED["slerp"] = yaml.safe_load("""
slices:
  - sources:
      - model: FuseAI/OpenChat-3.5-7B-Mixtral
        layer_range: [0, 32]
      - model: FuseAI/OpenChat-3.5-7B-Solar
        layer_range: [0, 32]
merge_method: slerp
base_model: openchat/openchat_3.5
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""")
TARGETS = {"mixtral": "/t/mixtral", "solar": "/t/solar"}  # the paper's target order


def _config(method: str, merge: MergeConfig):
    return build_configuration(method, "/pivot", TARGETS, parameters=method_parameters(merge, method))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear"])
def test_task_vector_baselines_take_the_released_values(method):
    cfg = _config(method, MergeConfig(method="varm", methods_extra=[method], preset="paper"))
    released = RELEASED[method]
    assert cfg.merge_method == released["merge_method"]
    assert cfg.base_model.model.path == "/pivot"  # the pivot is the base, as openchat_3.5 is there
    per_target = [m["parameters"] for m in released["models"][1:]]  # Mixtral, then Solar
    assert [m.parameters for m in cfg.models] == per_target
    assert cfg.parameters == released["parameters"]


def test_slerp_takes_the_released_gradients_and_linear_weights_one_to_two():
    merge = MergeConfig(method="varm", methods_extra=["slerp", "linear"], preset="paper")
    slerp = _config("slerp", merge)
    got = [{k: v for k, v in c.model_dump().items() if v is not None} for c in slerp.parameters["t"]]
    assert got == RELEASED["slerp"]["parameters"]["t"]
    assert [m.model.model.path for m in slerp.models] == ["/t/mixtral", "/t/solar"]
    linear = _config("linear", merge)
    weights = [m.parameters["weight"] for m in linear.models]
    assert linear.parameters.get("normalize", True) is True
    assert [w / sum(weights) for w in weights] == pytest.approx([1 / 3, 2 / 3])


def test_our_defaults_stay_and_the_main_methods_parameters_win():
    ours = _config("ties", MergeConfig(method="varm", methods_extra=["ties"]))
    assert [m.parameters for m in ours.models] == [{"weight": 1.0, "density": 0.5}] * 2
    override = MergeConfig(method="ties", preset="paper", parameters={"density": 0.7})
    cfg = _config("ties", override)
    assert [m.parameters for m in cfg.models] == [{"weight": 0.25, "density": 0.7}, {"weight": 0.5, "density": 0.7}]


def test_the_paper_preset_needs_the_papers_two_targets():
    merge = MergeConfig(method="varm", methods_extra=["ties"], preset="paper")
    check_merge_config(merge, ["mixtral", "solar"])
    with pytest.raises(MergeError, match=r"^merge.preset: paper .* this run has 3 \(a, b, c\)$"):
        check_merge_config(merge, ["a", "b", "c"])


def test_plan_of_the_paper_config_shows_pins_and_the_paper_values(tmp_path, capsys):
    cfg_path = REPO / "configs" / "fusechat-7b-varm.yaml"
    cfg = load_config(cfg_path)
    assert cfg.merge.preset == "paper" and cfg.data.heldout_fraction == 0
    assert main(["run", str(cfg_path), "--plan", "--store", f"file://{tmp_path}/store"]) == 0
    out = capsys.readouterr().out
    assert 'data_files="fusechat_v1_clean_split_2048_filter_wrong.json"' in out
    plan = RunPlan(cfg)
    assert "dataset  " in out and plan.dataset in out
    merge_lines = out[out.index("merge[linear] inputs:"):]
    assert '{"weight":[1.0,2.0],"normalize":true}' in merge_lines
    assert '"t":[{"filter":"self_attn","value":[0,0.5,0.3,0.7,1]}' in merge_lines
    assert '{"weight":[0.25,0.5],"density":[0.5,0.5],"normalize":true}' in merge_lines
    # the rebuilt mixture's plan shows the GPT-4 file and orca-best's revision
    rebuilt = tmp_path / "rebuilt.yaml"
    raw = yaml.safe_load(cfg_path.read_text())
    raw["data"] = {"preset": "fusechat-mixture", "clean": "vicuna", "heldout_fraction": 0}
    rebuilt.write_text(yaml.safe_dump(raw))
    assert main(["run", str(rebuilt), "--plan", "--store", f"file://{tmp_path}/store"]) == 0
    out = capsys.readouterr().out
    assert 'source sharegpt_gpt4: shibing624/sharegpt_gpt4 format=sharegpt_gpt4 count=6200 ' \
           'data_files="sharegpt_gpt4.jsonl"' in out
    assert 'revision="58d7d9e8a6ceaaa4ed40c5d1884af4c5f4c0a743"' in out
    assert "clean: vicuna" in out
