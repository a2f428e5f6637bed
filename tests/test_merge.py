"""Merging: VaRM against its formula computed here, the baselines against known properties.

Targets are the tiny pivot plus deltas chosen in the test, so every expected
tensor is computed independently (float64, from the deltas themselves), never
read back from the code under test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusechat_core.config import parse_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
ZERO = "model.norm.weight"  # no target changes it: the merge must keep the pivot's
ONLY_A = "model.layers.0.input_layernorm.weight"  # only target a changes it: W_a = 1


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _make_target(pivot: Path, out: Path, deltas: dict[str, torch.Tensor]) -> Path:
    """A copy of the pivot folder with θ + Δ for each tensor."""
    shutil.copytree(pivot, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    base = _load_folder(pivot)
    save_file({k: (v + deltas[k]).contiguous() if k in deltas else v for k, v in base.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _known_deltas(base: dict[str, torch.Tensor], seed: int, scale: float, *, zero: set[str]) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, t) in enumerate(sorted(base.items())):
        if name in zero:
            out[name] = torch.zeros_like(t)
            continue
        # unequal sizes across matrices and targets, so the weights really vary
        s = scale * (1 + (i * 7 + seed) % 5)
        out[name] = torch.randn(t.shape, generator=g, dtype=torch.float32) * s
    return out


@pytest.fixture(scope="module")
def known(tiny_models, tmp_path_factory):
    """Pivot, targets a and b with known deltas, and c = pivot + 2·Δ_a (same signs as a)."""
    pivot = tiny_models["pivot"]
    root = tmp_path_factory.mktemp("merge-targets")
    base = _load_folder(pivot)
    da = _known_deltas(base, 1, 0.002, zero={ZERO})
    db = _known_deltas(base, 2, 0.01, zero={ZERO, ONLY_A})
    dc = {k: 2 * v for k, v in da.items()}
    out = {"pivot": pivot, "base": base, "deltas": {}}
    for name, d in (("a", da), ("b", db), ("c", dc)):
        out[name] = _make_target(pivot, root / name, d)
        # Δ as the formula defines it: stored target minus pivot (θ + Δ rounds in float32)
        stored = _load_folder(out[name])
        out["deltas"][name] = {k: stored[k].double() - base[k].double() for k in base}
    return out


def _varm_expected(base, deltas: list[dict[str, torch.Tensor]]):
    """SPEC §1.5, written out independently: float64, per named tensor."""
    merged, weights = {}, {}
    for name, p in base.items():
        ms = [d[name].double().pow(2).mean().item() for d in deltas]
        total = sum(ms)
        w = [m / total for m in ms] if total > 0 else [0.0] * len(ms)
        merged[name] = p.double() + sum(wj * d[name].double() for wj, d in zip(w, deltas))
        weights[name] = w
    return merged, weights


def _assert_close(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(out) == set(expected)
    for name, t in out.items():
        assert t.dtype == torch.float32, name
        err = (t.double() - expected[name].double()).abs().max().item()
        assert err <= atol, f"{name}: max |error| {err:.3g}"


def test_varm_matches_the_formula_tensor_by_tensor_and_the_model_generates(known, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusechat_core.merge import merge_models

    out = tmp_path / "varm"
    res = merge_models("varm", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"])}, out,
                       shard_size=4_000_000, device="cpu")
    merged = _load_folder(out)
    expected, weights = _varm_expected(known["base"], [known["deltas"]["a"], known["deltas"]["b"]])
    _assert_close(merged, expected)
    # all-zero change: exactly the pivot's bytes; one changed target: that target's tensor
    assert torch.equal(merged[ZERO], known["base"][ZERO])
    assert torch.allclose(merged[ONLY_A], _load_folder(known["a"])[ONLY_A], atol=1e-7)
    # the deltas differ in size, so the weights are far from uniform
    spread = [abs(w[0] - w[1]) for n, w in weights.items() if n not in (ZERO, ONLY_A)]
    assert max(spread) > 0.9

    table = json.loads((out / "varm_weights.json").read_text())
    assert table["targets"] == ["a", "b"] and set(table["tensors"]) == set(expected)
    for name, w in weights.items():
        got = table["tensors"][name]["weights"]
        assert got["a"] == pytest.approx(w[0], abs=1e-7) and got["b"] == pytest.approx(w[1], abs=1e-7), name
    assert table["summary"]["unchanged_matrices"] == 1
    assert "| target | matrices dominated |" in (out / "varm_weights.md").read_text()

    # a sharded Hugging Face folder with the pivot's tokenizer and chat template
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected) and len(set(index["weight_map"].values())) > 1
    card = (out / "README.md").read_text()
    assert "varm" in card and str(known["a"]) in card and "lm_head.weight" in card
    # a local pivot saved by transformers 5 records no hub id: named in the text, no base_model
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and "varm" in meta["tags"]
    assert f"base model (pivot): `{known['pivot']}` (a local model" in card
    tok = AutoTokenizer.from_pretrained(out)
    pivot_tok = AutoTokenizer.from_pretrained(known["pivot"])
    assert tok.chat_template == pivot_tok.chat_template and len(tok) == len(pivot_tok)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        logits = model(ids).logits
    assert gen.shape[1] == ids.shape[1] + 4
    # the loaded model is the merged weights, not a re-initialised one
    ref = AutoModelForCausalLM.from_pretrained(known["pivot"]).eval()
    ref.load_state_dict({k: v.float() for k, v in expected.items()})
    with torch.no_grad():
        assert torch.allclose(logits, ref(ids).logits, atol=1e-4)
    assert res["table"]["summary"]["dominated"]["b"] > res["table"]["summary"]["dominated"]["a"]


def test_a_cards_base_model_is_a_hub_id_or_nothing(known, tmp_path):
    """The Hub takes as ``base_model`` only a model id it hosts. A hub pivot is one (its revision
    goes to the text); a local copy whose config.json records the hub id it came from (what
    transformers 4 saved as ``_name_or_path``) names that id; a local folder that records a
    path, or nothing, is named in the text alone."""
    from huggingface_hub import ModelCard

    from fusechat_core.merge.card import model_card, target_card

    def local(name: str, recorded: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((known["pivot"] / "config.json").read_text())
        if recorded is not None:
            config["_name_or_path"] = recorded
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    copy = local("copy", "openchat/openchat_3.5")
    cases = {  # pivot → (base_model, a phrase of the text)
        "openchat/openchat_3.5@c0ffee": ("openchat/openchat_3.5", "`openchat/openchat_3.5` (revision `c0ffee`)"),
        str(copy): ("openchat/openchat_3.5", f"`{copy}` (a local copy of `openchat/openchat_3.5`)"),
        str(local("trained", "/data/ckpt/run-7")): (None, "trained` (a local model"),
        str(local("bare", None)): (None, "bare` (a local model"),
        "demo:pivot": (None, "`demo:pivot` (a local model"),
    }
    for pivot, (base, phrase) in cases.items():
        cards = [model_card(name="m", method="varm", pivot=pivot, targets={"a": "/t/a"}, sources=None,
                            parameters={}, granularity="matrix", dtype="float32", mergekit_yaml="x: 1", table=None),
                 target_card(name="t", pivot=pivot, lam=0.9, fusion_function="mince", steps=1, sequences=1,
                             train_config={})]
        for text, relation in zip(cards, ("merge", "finetune"), strict=True):
            meta = ModelCard(text).data.to_dict()
            assert meta.get("base_model") == base, (pivot, meta)
            assert meta.get("base_model_relation") == (relation if base else None), (pivot, meta)
            assert phrase in text, (pivot, text)
    # a demo pivot's target names its built folder's record through pivot_folder
    demo = target_card(name="t", pivot="demo:pivot", pivot_folder=str(copy), lam=0.9, fusion_function="mince",
                       steps=1, sequences=1, train_config={})
    assert ModelCard(demo).data.base_model == "openchat/openchat_3.5"


@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_varm_granularity_shares_weights_over_the_group(known, tmp_path, granularity):
    from fusechat_core.merge import merge_models

    deltas = [known["deltas"]["a"], known["deltas"]["b"]]
    out = tmp_path / granularity
    merge_models("varm", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"])}, out,
                 granularity=granularity, device="cpu")
    merged = _load_folder(out)

    def group(name: str) -> str:
        if granularity == "model":
            return "all"
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[1] == "layers" else name

    sums: dict[str, list[float]] = {}
    for name in known["base"]:
        row = sums.setdefault(group(name), [0.0, 0.0])
        for j, d in enumerate(deltas):
            row[j] += d[name].double().pow(2).sum().item()
    expected = {}
    for name, p in known["base"].items():
        s = sums[group(name)]
        w = [x / sum(s) for x in s] if sum(s) > 0 else [0.0, 0.0]
        expected[name] = p.double() + w[0] * deltas[0][name].double() + w[1] * deltas[1][name].double()
    _assert_close(merged, expected)
    table = json.loads((out / "varm_weights.json").read_text())
    layer0 = {tuple(r["weights"].values()) for n, r in table["tensors"].items() if n.startswith("model.layers.0.")}
    assert len(layer0) == 1  # one weight pair for the whole layer (or model)
    if granularity == "layer":
        # the final norm is unchanged by every target: its own group keeps the pivot's
        assert torch.equal(merged[ZERO], known["base"][ZERO])


def _run_config(tmp_path: Path, known, method: str, parameters: dict | None = None,
                names: tuple[str, ...] = ("a", "b"), **merge):
    raw = {
        "name": "merge-test", "store": f"file://{tmp_path}/store",
        "pivot": {"name": "pivot", "path": str(known["pivot"])},
        "sources": [{"name": n, "path": str(known["pivot"])} for n in names],
        "data": {"preset": "fusechat-mixture"},
        "merge": {"method": method, "parameters": parameters or {}, "shard_size": 4_000_000,
                  "device": "cpu", **merge},
    }
    return parse_config(raw)


def _stage(cfg, targets: dict[str, Path], store: ArtifactStore | None = None, **kw):
    """Targets uploaded as train artifacts, merged by the run's merge stage, read back from the store."""
    from fusechat_core.merge.stage import merge_stage

    plan = RunPlan(cfg)
    store = store or ArtifactStore(cfg.store)
    addresses = {}
    for name, folder in targets.items():
        addresses[name] = plan.train(name)
        store.put_dir(addresses[name], folder)
    address = plan.merge(cfg.merge.method)
    out = merge_stage(cfg, store, address, cfg.merge.method, addresses, **kw)
    assert store.is_complete(address) and out["address"] == address
    return _load_folder(store.fetch(address)), store, address


def _shifted(known, coef: dict[str, float]) -> dict[str, torch.Tensor]:
    return {n: p.double() + sum(c * known["deltas"][t][n].double() for t, c in coef.items())
            for n, p in known["base"].items()}


def test_linear_with_equal_weights_is_the_mean_of_the_targets(known, tmp_path):
    cfg = _run_config(tmp_path, known, "linear")
    merged, store, address = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"a": 0.5, "b": 0.5}))
    man = store.manifest(address)
    assert man.meta["method"] == "linear" and "README.md" in {f.path for f in man.files}


def test_task_arithmetic_with_weight_one_on_one_target_is_that_target(known, tmp_path):
    cfg = _run_config(tmp_path, known, "task_arithmetic", {"weight": {"a": 1.0, "b": 0.0}})
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"a": 1.0}))


def test_slerp_at_the_ends_is_each_target(known, tmp_path):
    cfg = _run_config(tmp_path, known, "slerp", {"t": 0.0})
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"a": 1.0}))
    cfg = _run_config(tmp_path / "t1", known, "slerp", {"t": 1.0})
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"b": 1.0}))


def test_ties_with_agreeing_signs_and_no_trimming_averages_the_deltas(known, tmp_path):
    # c = 2·Δ_a everywhere: every sign agrees, so TIES (normalised, density 1) = mean of Δ
    cfg = _run_config(tmp_path, known, "ties", {"density": 1.0}, names=("a", "c"))
    merged, _, _ = _stage(cfg, {"a": known["a"], "c": known["c"]})
    _assert_close(merged, _shifted(known, {"a": 1.5}))


def test_dare_linear_without_dropping_is_the_weighted_delta_sum_and_drops_half_by_default(known, tmp_path):
    cfg = _run_config(tmp_path, known, "dare_linear", {"density": 1.0, "weight": [0.25, 0.75]})
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"a": 0.25, "b": 0.75}))
    # default density 0.5: each element of Δ_a is dropped or kept, the kept ones rescaled by
    # one factor (mergekit rescales to the L1 norm of the undropped Δ, ≈ 1/density)
    cfg = _run_config(tmp_path / "default", known, "dare_linear", {"weight": {"a": 1.0, "b": 0.0}})
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    name = "model.layers.1.mlp.up_proj.weight"
    delta = merged[name].double() - known["base"][name].double()
    da = known["deltas"]["a"][name].double()
    kept = delta.abs() > 1e-9
    ratio = delta[kept] / da[kept]
    assert 0.45 < kept.double().mean().item() < 0.55
    assert 1.9 < ratio.mean().item() < 2.1 and ratio.std().item() < 1e-3
    assert delta.abs().sum().item() == pytest.approx(da.abs().sum().item(), rel=1e-4)


def test_sce_weights_agreeing_targets_by_mean_squared_delta(known, tmp_path):
    # select_topk 1: no selection; signs agree; weights ∝ mean(Δ²): 1 and 4 → 0.2, 0.8
    cfg = _run_config(tmp_path, known, "sce", {"select_topk": 1.0}, names=("a", "c"))
    merged, _, _ = _stage(cfg, {"a": known["a"], "c": known["c"]})
    expected = _shifted(known, {"a": 0.2 * 1 + 0.8 * 2})
    expected[ZERO] = known["base"][ZERO].double()
    _assert_close(merged, expected)


def test_a_users_mergekit_yaml_runs_as_given_with_placeholders(known, tmp_path):
    text = ("merge_method: task_arithmetic\nbase_model: ${pivot}\ndtype: float32\n"
            "models:\n  - model: ${b}\n    parameters: {weight: 1.0}\n  - model: ${a}\n    parameters: {weight: 0.0}\n")
    cfg = _run_config(tmp_path, known, "varm", mergekit_yaml=text)
    merged, _, _ = _stage(cfg, {"a": known["a"], "b": known["b"]})
    _assert_close(merged, _shifted(known, {"b": 1.0}))


def test_varm_from_an_s3_store_through_the_local_cache(known, tmp_path, s3_env):
    cfg = _run_config(tmp_path, known, "varm")
    store = ArtifactStore(f"s3://fusechat-test/{uuid.uuid4().hex}")
    merged, store, address = _stage(cfg, {"a": known["a"], "b": known["b"]}, store)
    expected, _ = _varm_expected(known["base"], [known["deltas"]["a"], known["deltas"]["b"]])
    _assert_close(merged, expected)
    assert store.manifest(address).meta["varm_summary"]["unchanged_matrices"] == 1


def test_mixtral_pivot_round_trips_through_mergekit(tiny_models, tmp_path):
    """transformers 5 fuses Mixtral experts in memory but saves them per expert (SPEC §4)."""
    from transformers import AutoModelForCausalLM

    from fusechat_core.merge import merge_models

    pivot = tiny_models["mixtral"]
    base = _load_folder(pivot)
    d = _known_deltas(base, 3, 0.01, zero=set())
    a = _make_target(pivot, tmp_path / "a", d)
    b = _make_target(pivot, tmp_path / "b", {k: torch.zeros_like(v) for k, v in base.items()})
    out = tmp_path / "merged"
    merge_models("varm", str(pivot), {"a": str(a), "b": str(b)}, out, device="cpu")
    # b never moved, so every weight is a's and the merge is target a, expert by expert
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    want = AutoModelForCausalLM.from_pretrained(a).state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.allclose(got[name], t, atol=1e-6), name
    table = json.loads((out / "varm_weights.json").read_text())
    assert all(r["weights"]["b"] == 0.0 for r in table["tensors"].values())


def test_bad_inputs_fail_with_one_line_naming_the_field(known, tmp_path):
    from fusechat_core.config import ConfigError
    from fusechat_core.merge import MergeError, merge_models

    with pytest.raises(ConfigError, match=r"^merge\.method: unknown merge method 'varn'"):
        _run_config(tmp_path, known, "varn")
    with pytest.raises(MergeError, match=r"^merge\.parameters\.densty: unknown parameter for ties"):
        merge_models("ties", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"])},
                     tmp_path / "o", parameters={"densty": 0.5})
    with pytest.raises(MergeError, match=r"^merge\.method: slerp merges exactly 2 targets"):
        merge_models("slerp", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"]),
                                                    "c": str(known["c"])}, tmp_path / "o")
    with pytest.raises(MergeError, match=r"^target b: .* is already target a$"):
        merge_models("varm", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["a"])}, tmp_path / "o")
    with pytest.raises(MergeError, match=r"^target x: no such directory"):
        merge_models("varm", str(known["pivot"]), {"x": str(tmp_path / "missing")}, tmp_path / "o")

def test_a_target_of_another_shape_fails_with_one_line_naming_the_tensor(known, tiny_models, tmp_path):
    from fusechat_core.merge import MergeError, merge_models

    with pytest.raises(MergeError, match=r"^target llama: .* is not the pivot's shape .*LlamaForCausalLM"):
        merge_models("varm", str(known["pivot"]), {"a": str(known["a"]), "llama": str(tiny_models["llama"])},
                     tmp_path / "o", device="cpu")
    # same config, other shapes inside: mergekit's own check, reported in one line
    odd = tmp_path / "odd"
    shutil.copytree(known["pivot"], odd)
    base = _load_folder(known["pivot"])
    base["lm_head.weight"] = base["lm_head.weight"][:-1].contiguous()
    for f in odd.glob("*.safetensors"):
        f.unlink()
    save_file(base, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError) as err:
        merge_models("varm", str(known["pivot"]), {"a": str(known["a"]), "odd": str(odd)}, tmp_path / "o2",
                     device="cpu")
    msg = str(err.value)
    assert msg.startswith("merge (varm) failed: ") and "\n" not in msg and "lm_head.weight" in msg
    assert not (tmp_path / "o2").exists()  # no half-written model left behind


def test_a_non_finite_merge_fails_naming_the_tensor_and_the_target(known, tmp_path):
    from fusechat_core.merge import MergeError, merge_models

    bad_key = "model.layers.1.mlp.down_proj.weight"
    delta = torch.zeros_like(known["base"][bad_key])
    delta[3, 5] = float("nan")
    nan_target = _make_target(known["pivot"], tmp_path / "nan", {bad_key: delta})
    for method in ("varm", "linear"):
        out = tmp_path / f"o-{method}"
        with pytest.raises(MergeError) as err:
            merge_models(method, str(known["pivot"]), {"a": str(known["a"]), "nan": str(nan_target)}, out,
                         device="cpu")
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"merge ({method}): tensor {bad_key}: "), msg
        assert "already not finite in target nan" in msg and "target a" not in msg
        assert not out.exists()  # nothing that looks like a model is left


def test_cli_merges_folders_given_by_name_or_path(known, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "cli"
    code = main(["merge", "--method", "task_arithmetic", "--pivot", str(known["pivot"]),
                 "--targets", f"first={known['a']}", str(known["b"]), "--out", str(out),
                 "--param", "weight=[0.0, 1.0]", "--shard-size", "4000000", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert json.loads(captured.out.strip().splitlines()[-1])["mergekit_method"] == "task_arithmetic"
    _assert_close(_load_folder(out), _shifted(known, {"b": 1.0}))



def test_cli_usage_errors_exit_2_with_one_line(known, tmp_path, capsys):
    from flows.cli import main

    common = ["merge", "--pivot", str(known["pivot"]), "--targets", f"first={known['a']}", str(known["b"]),
              "--out", str(tmp_path / "bad")]
    cases = {
        ("--method", "task_arithmetic", "--param", "weight=[1.0]"):
            "fusechat: error: --param weight: 1 values for 2 targets (first, b)",
        ("--method", "ties", "--param", "density"): "fusechat: error: --param 'density': expected KEY=VALUE",
        ("--method", "mean"): "fusechat: error: --method: unknown merge method 'mean' (known: dare_linear, "
                              "linear, sce, slerp, task_arithmetic, ties, varm)",
    }
    for extra, line in cases.items():
        assert main([*common, *extra]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert main(["merge", "--method", "varm", "--pivot", str(tmp_path / "nope"), "--targets", str(known["a"]),
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"fusechat: error: --pivot: no such directory: {tmp_path / 'nope'}"
    # a path holding "merge." is named as given, not turned into a flag
    missing = tmp_path / "merge.v2" / "b_ft"
    assert main(["merge", "--method", "varm", "--pivot", str(known["pivot"]), "--targets", str(known["a"]),
                 str(missing), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"fusechat: error: --targets (b_ft): no such directory: {missing}"
    assert not (tmp_path / "bad").exists()


def test_cli_pivot_without_a_tokenizer_says_to_pass_one(known, tmp_path, capsys):
    """A pivot folder of weights alone: one line that names --tokenizer, before any tensor is read;
    with --tokenizer the same folders merge, and the merged folder carries that tokenizer."""
    from flows.cli import main

    bare = tmp_path / "pivot-weights-only"
    bare.mkdir()
    for f in Path(known["pivot"]).iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    assert not (bare / "tokenizer.json").exists() and not (bare / "tokenizer_config.json").exists()
    args = ["merge", "--method", "varm", "--pivot", str(bare), "--targets", str(known["a"]), str(known["b"]),
            "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer REF" in err[0] and str(bare) in err[0], err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--tokenizer", str(known["pivot"])]) == 0
    assert (tmp_path / "o" / "tokenizer_config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu_fails_in_one_line(known, tmp_path, capsys):
    from flows.cli import main

    rc = main(["merge", "--method", "varm", "--pivot", str(known["pivot"]), "--targets", str(known["a"]),
               "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fusechat: merge failed: device 'cuda' asked for but no CUDA device is visible")


def test_mergekit_yaml_file_is_read_relative_to_the_run_config(known, tmp_path):
    import yaml

    from fusechat_core.config import ConfigError, load_config

    text = "merge_method: ties\nbase_model: ${pivot}\nmodels:\n  - model: ${a}\n  - model: ${b}\n"
    (tmp_path / "mk.yml").write_text(text)
    raw = {"pivot": {"name": "pivot", "path": str(known["pivot"])},
           "sources": [{"name": "a", "path": str(known["pivot"])}, {"name": "b", "path": str(known["pivot"])}],
           "data": {"preset": "fusechat-mixture"}, "merge": {"mergekit_yaml": "mk.yml"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.merge.mergekit_yaml == text
    # the file's content, not its name, is what the merge address depends on
    before = RunPlan(cfg).merge("varm")
    (tmp_path / "mk.yml").write_text(text.replace("ties", "task_arithmetic"))
    assert RunPlan(load_config(tmp_path / "run.yaml")).merge("varm") != before
    raw["merge"]["mergekit_yaml"] = "missing.yml"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^merge\.mergekit_yaml: no such file: missing\.yml$"):
        load_config(tmp_path / "run.yaml")


def test_mixtral_layer_granularity_matches_the_formula_in_memory(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusechat_core.merge import merge_models

    pivot = tiny_models["mixtral"]
    base = _load_folder(pivot)
    a = _make_target(pivot, tmp_path / "a", _known_deltas(base, 5, 0.01, zero=set()))
    b = _make_target(pivot, tmp_path / "b", _known_deltas(base, 6, 0.02, zero=set()))
    out = tmp_path / "merged"
    merge_models("varm", str(pivot), {"a": str(a), "b": str(b)}, out, granularity="layer", device="cpu")
    # in memory the experts are fused; a layer's Σ Δ² is the same however its tensors are cut
    sd = {k: {n: t.double() for n, t in AutoModelForCausalLM.from_pretrained(f).state_dict().items()}
          for k, f in (("p", pivot), ("a", a), ("b", b), ("m", out))}

    def group(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[1] == "layers" else name

    sums: dict[str, list[float]] = {}
    for n, p in sd["p"].items():
        row = sums.setdefault(group(n), [0.0, 0.0])
        row[0] += (sd["a"][n] - p).pow(2).sum().item()
        row[1] += (sd["b"][n] - p).pow(2).sum().item()
    for n, p in sd["p"].items():
        s = sums[group(n)]
        want = p + (s[0] * (sd["a"][n] - p) + s[1] * (sd["b"][n] - p)) / sum(s)
        assert (sd["m"][n] - want).abs().max().item() <= 1e-6, n


def _safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_fusechat_mergekit_yaml_runs_varm_as_fusechat_merge_does_byte_for_byte(known, tmp_path):
    """mergekit's own CLI, VaRM registered: a hand-written YAML and the replayed mergekit_config.yml
    both give `fusechat merge --method varm`'s weights, byte for byte."""
    import tomllib

    import yaml

    from flows.cli import main
    from fusechat_core.merge.mergekit_yaml import main as mergekit_yaml

    ours = tmp_path / "ours"
    assert main(["merge", "--method", "varm", "--pivot", str(known["pivot"]), "--targets", f"a={known['a']}",
                 f"b={known['b']}", "--out", str(ours), "--device", "cpu"]) == 0
    saved = yaml.safe_load((ours / "mergekit_config.yml").read_text())
    # the saved config names the real folders, absolute, so it replays anywhere they are
    refs = [saved["base_model"], *(m["model"] for m in saved["models"])]
    assert refs == [str(known["pivot"].resolve()), str(known["a"].resolve()), str(known["b"].resolve())]
    hand = tmp_path / "varm.yml"
    hand.write_text(f"merge_method: varm\nbase_model: {known['pivot']}\ndtype: float32\nout_dtype: float32\n"
                    f"models:\n  - model: {known['a']}\n  - model: {known['b']}\n")
    expected = _safetensors_bytes(ours)
    assert expected and sum(len(b) for b in expected.values()) > 100_000
    for name, cfg in (("replay", ours / "mergekit_config.yml"), ("hand", hand)):
        out = tmp_path / name
        assert mergekit_yaml([str(cfg), str(out), "--device", "cpu"]) == 0
        got = _safetensors_bytes(out)
        assert got.keys() == expected.keys() and all(got[k] == expected[k] for k in got), name
    # and the entry point the package installs is that command
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fusechat-mergekit-yaml"] == "fusechat_core.merge.mergekit_yaml:main"


def test_a_run_merge_replays_from_its_store_with_fusechat_mergekit_yaml(known, tmp_path):
    """The run's merged folder names store addresses (same bytes in every store); `--store` turns
    them into the absolute folders holding them, and the replay gives the same weights."""
    import yaml

    cfg = _run_config(tmp_path, known, "varm")
    counts: list[tuple[int, int]] = []
    merged, store, address = _stage(cfg, {"a": known["a"], "b": known["b"]},
                                    on_tensor=lambda done, total: counts.append((done, total)))
    # progress: one call per tensor written, out of every tensor of the merged model
    assert counts == [(i, len(merged)) for i in range(1, len(merged) + 1)]
    folder = store.fetch(address)
    saved = yaml.safe_load((folder / "mergekit_config.yml").read_text())
    assert {m["model"] for m in saved["models"]} == {RunPlan(cfg).train("a"), RunPlan(cfg).train("b")}
    out = tmp_path / "replay"
    # as an installed console script runs it: a process of its own
    proc = subprocess.run([sys.executable, "-m", "fusechat_core.merge.mergekit_yaml", "--store", cfg.store,
                           str(folder / "mergekit_config.yml"), str(out), "--device", "cpu",
                           "--out-shard-size", str(cfg.merge.shard_size)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _safetensors_bytes(out) == _safetensors_bytes(folder)
    replayed = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert {m["model"] for m in replayed["models"]} == {str(Path(store.root, RunPlan(cfg).train(t))) for t in "ab"}


def test_a_random_merge_gives_the_same_bytes_whatever_runs_beside_it(known, tmp_path):
    """DARE drops at random from torch's process-wide generator, which mergekit seeds when a
    merge starts: a merge started meanwhile in another thread (the pipeline's merges run
    side by side) must not re-seed it mid-merge. The second merge is started right after the
    DARE merge wrote its first tensor, while DARE waits a moment there."""
    import hashlib
    import threading
    import time

    from fusechat_core.merge import merge_models

    targets = {"a": str(known["a"]), "b": str(known["b"])}

    def digest(out: Path) -> str:
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))).hexdigest()

    merge_models("dare_linear", str(known["pivot"]), targets, tmp_path / "alone", device="cpu")
    first_tensor, errors = threading.Event(), []

    def pause_after_the_first(done: int, total: int) -> None:
        if done == 1:
            first_tensor.set()
            time.sleep(1.0)  # the other merge starts now

    def other() -> None:
        first_tensor.wait(60)
        try:
            merge_models("ties", str(known["pivot"]), targets, tmp_path / "ties", device="cpu")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    beside = threading.Thread(target=other)
    beside.start()
    merge_models("dare_linear", str(known["pivot"]), targets, tmp_path / "beside", device="cpu",
                 on_tensor=pause_after_the_first)
    beside.join(120)
    assert not errors, errors
    assert digest(tmp_path / "beside") == digest(tmp_path / "alone")


def test_a_corrupt_weights_file_fails_in_one_line_and_leaves_the_given_folder_empty(known, tmp_path):
    from fusechat_core.merge import MergeError, merge_models

    broken = tmp_path / "broken"
    shutil.copytree(known["a"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut mid-header, as a killed copy leaves it
    for granularity in ("matrix", "layer"):
        out = tmp_path / f"out-{granularity}"
        out.mkdir()  # the user's own, empty folder
        with pytest.raises(MergeError) as err:
            merge_models("varm", str(known["pivot"]), {"a": str(broken), "b": str(known["b"])}, out,
                         device="cpu", granularity=granularity)
        assert "\n" not in str(err.value) and str(err.value).startswith("merge (varm"), str(err.value)
        assert out.is_dir() and not any(out.iterdir())


def test_a_merge_killed_mid_write_leaves_nothing_the_next_attempt_keeps(known, tmp_path, monkeypatch):
    """A merge SIGKILLed while writing leaves its staging folder (a whole model: ~28 GB at 7B in
    float32). The next attempt of that merge on the machine removes it, and leaves none of its own."""
    from fusechat_core.merge.stage import merge_staging_dir

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    cfg = _run_config(tmp_path, known, "linear")
    address = RunPlan(cfg).merge("linear")
    killed = merge_staging_dir(ArtifactStore(cfg.store), address)
    assert killed != merge_staging_dir(ArtifactStore(f"file://{tmp_path}/other-store"), address)
    assert str(killed).startswith(str(tmp_path / "cache"))
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1_000_000)
    _stage(cfg, {"a": known["a"], "b": known["b"]})
    assert not killed.exists()
    assert not any((tmp_path / "cache").glob("merge*/**/*.safetensors"))


def test_a_staging_folder_no_merge_will_come_back_to_is_removed_by_the_next_merge(known, tmp_path, monkeypatch):
    """A merge killed and then never retried (its config changed, so its address) left its
    staging folder, a whole model, for good. The next merge on the machine removes the
    folders nothing has written to for a day; a live one's (written a minute ago) stays."""
    import os
    import time

    from fusechat_core.merge.stage import ABANDONED_AFTER_S, merge_staging_dir

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    cfg = _run_config(tmp_path, known, "linear")
    root = merge_staging_dir(ArtifactStore(cfg.store), RunPlan(cfg).merge("linear")).parent
    old, live = root / "0123456789abcdef", root / "fedcba9876543210"
    for folder, age in ((old, ABANDONED_AFTER_S + 60), (live, 60)):
        (folder / "model").mkdir(parents=True)
        shard = folder / "model" / "model-00001-of-00002.safetensors"
        shard.write_bytes(b"\0" * 1000)
        then = time.time() - age
        for p in (shard, folder / "model", folder):
            os.utime(p, (then, then))
    _stage(cfg, {"a": known["a"], "b": known["b"]})
    assert not old.exists() and live.is_dir()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varm_adds_the_update_to_the_pivot_in_float32_at_least(dtype):
    """θ_pivot + Σ W·Δ, as written: an entry no target changed is the pivot's bit for bit, and
    bfloat16 targets (a user's mergekit YAML without dtype) are widened before Δ is formed.
    Before: Σ W·θ moved 3% of untouched float32 entries by an ulp, and bfloat16 arithmetic
    lost most of a fine-tuning-sized update (bf16's ulp at 1.0 is 2^-7). The reference is
    the formula in float64 on the same stored values."""
    from fusechat_core.merge.varm import _combine, _sum_sq_deltas, varm_weights

    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 70, generator=g).to(dtype)
    targets = []
    for j, share in enumerate((0.5, 0.3)):
        changed = torch.rand(base.shape, generator=g) < share
        step = torch.randn(base.shape, generator=g) * (0.02 * (j + 1))
        targets.append(torch.where(changed, base.float() + step, base.float()).to(dtype))
    deltas = [t.double() - base.double() for t in targets]
    sums = _sum_sq_deltas(base, targets)
    assert sums == pytest.approx([d.pow(2).sum().item() for d in deltas], rel=1e-6)
    w = varm_weights([s / base.numel() for s in sums])
    merged = _combine(base, targets, w)
    assert merged.dtype == dtype  # the inputs' precision: a mergekit YAML loading bf16 writes bf16
    untouched = torch.stack([d == 0 for d in deltas]).all(0)
    assert untouched.sum() > 0.3 * base.numel()
    assert torch.equal(merged[untouched], base[untouched])
    expected = base.double() + sum(wj * d for wj, d in zip(w, deltas))
    if dtype == torch.float32:
        err = (merged.double() - expected).abs().max().item()
        assert err <= 2 * torch.finfo(torch.float32).eps * expected.abs().max().item(), err
    else:  # the exact sum rounded once: every entry (bf16 arithmetic got 81% of them)
        assert torch.equal(merged, expected.to(torch.bfloat16))
    # weights given from outside (layer or model granularity), thirds among three targets:
    # 14% of untouched float32 entries moved under Σ W·θ
    thirds = _combine(base, [*targets, targets[0]], [1 / 3] * 3)
    assert torch.equal(thirds[untouched], base[untouched])


def test_a_hub_pivot_merges_offline_from_the_local_cache(known, tmp_path, monkeypatch):
    """A GPU node with HF_HUB_OFFLINE=1 loads a Hub pivot from its cache in every stage; the
    merge gave it to mergekit as a hub id, which lists the repository's files online and
    failed. Now it reads the cached snapshot, and what it writes names the Hub model."""
    import huggingface_hub.constants as hub

    from fusechat_core.merge import MergeError, merge_models

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--fakeorg--pivot"
    shutil.copytree(known["pivot"], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    targets = {"a": str(known["a"]), "b": str(known["b"])}
    local = merge_models("varm", str(known["pivot"]), targets, tmp_path / "local", device="cpu")
    for ref in ("fakeorg/pivot", f"fakeorg/pivot@{sha}"):
        out = tmp_path / ref.replace("/", "_")
        res = merge_models("varm", ref, targets, out, device="cpu")
        assert _safetensors_bytes(out) == _safetensors_bytes(tmp_path / "local")
        written = (out / "mergekit_config.yml").read_text()
        assert f"base_model: {ref}" in written and str(tmp_path / "hf") not in written
        assert str(tmp_path / "hf") not in (out / "README.md").read_text() + (out / "varm_weights.json").read_text()
        assert res["table"]["pivot"] == ref and res["table"]["tensors"] == local["table"]["tensors"]
    with pytest.raises(MergeError, match=r"^pivot: fakeorg/none: cannot be read from the Hugging Face Hub or its "
                                         r"local cache \("):
        merge_models("varm", "fakeorg/none", targets, tmp_path / "none", device="cpu")


def test_a_merge_stopped_midway_leaves_nothing_in_the_folder_it_was_given(known, tmp_path):
    """SIGTERM inside the kernel or Ctrl-C raised through the merge after shards were written:
    they stayed, a rerun refused the folder as not empty, or a folder of shards without a
    card passed for a model. Only a read error cleared them before."""
    from fusechat_core.merge import merge_models

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    given, made = tmp_path / "given", tmp_path / "made"
    given.mkdir()
    for out in (given, made):
        with pytest.raises(KeyboardInterrupt):
            merge_models("linear", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"])}, out,
                         device="cpu", shard_size=100_000, on_tensor=stop_after_two)
    assert given.is_dir() and list(given.iterdir()) == [] and not made.exists()


def test_a_mergekit_yaml_s_card_says_the_precision_and_parameters_it_ran_with(known, tmp_path):
    """The YAML decides dtype and parameters: the card said "saved as: float32" of bfloat16
    weights, and listed parameters the YAML had replaced."""
    from fusechat_core.merge import merge_models

    text = ("merge_method: linear\ndtype: bfloat16\nmodels:\n  - model: ${a}\n    parameters: {weight: 1.0}\n"
            "  - model: ${b}\n    parameters: {weight: 1.0}\n")
    out = tmp_path / "yaml"
    merge_models("linear", str(known["pivot"]), {"a": str(known["a"]), "b": str(known["b"])}, out, device="cpu",
                 mergekit_yaml=text, parameters={"weight": [5.0, 1.0]})
    card = (out / "README.md").read_text()
    assert "- saved as: bfloat16" in card and "weight=" not in card.split("## mergekit configuration")[0]
    assert {t.dtype for t in _load_folder(out).values()} == {torch.bfloat16}
