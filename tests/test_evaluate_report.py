"""The run report: one table row per model, PNG plots of the right size, report.json."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from fusechat_core.evaluate.mt_bench import CATEGORIES
from fusechat_core.evaluate.report import DPI, FIGSIZE, build_report
from fusechat_core.evaluate.stage import loss_history, write_report
from fusechat_core.store import ArtifactStore

MODELS = ["pivot", "mixtral", "llama", "clm", "merge-varm"]


def _results() -> dict[str, dict]:
    out = {}
    for k, name in enumerate(MODELS):
        cats = {c: 5.0 + 0.1 * k + 0.01 * i for i, c in enumerate(CATEGORIES)}
        out[name] = {
            "model": name,
            "mt_bench": {"categories": cats, "average": sum(cats.values()) / len(cats), "turn_1": 6.0,
                         "turn_2": 5.0, "scored": 160, "unparsable": k, "failed": 0, "judge_model": "j"},
            "heldout_nll": {"sources": {"markov": {"nll": 2.0 - 0.1 * k}, "arithmetic": {"nll": 3.0 + k}},
                            "all": {"nll": 2.5}},
            "exact_match": {"sources": {"arithmetic": {"accuracy": 0.1 * k}}, "all": {"accuracy": 0.1 * k}},
        }
    del out["llama"]["mt_bench"]  # a model without MT-Bench still gets its row
    return out


def _table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_report_renders_table_and_plots(tmp_path):
    results = _results()
    losses = {"mixtral": [{"step": s, "loss": 3.0 / (s + 1)} for s in range(20)],
              "llama": [{"step": s, "loss": 2.5 / (s + 1)} for s in range(0, 20, 2)]}
    rep = build_report("Run demo", results, tmp_path, losses)
    rows = _table_rows((tmp_path / "report.md").read_text())
    header, body = rows[0], rows[2:]
    assert [r[0] for r in body] == MODELS  # one row per model, in order
    assert header[1:9] == ["Writing", "Roleplay", "Reasoning", "Math", "Coding", "Extraction", "STEM",
                           "Humanities"]  # the paper's Table 1 columns first
    assert header[9] == "Avg." and "NLL markov" in header and "EM arithmetic" in header
    assert all(len(r) == len(header) for r in body)
    by_model = {r[0]: dict(zip(header, r)) for r in body}
    assert by_model["mixtral"]["Writing"] == "5.10" and by_model["mixtral"]["Roleplay"] == "5.11"
    assert by_model["llama"]["Writing"] == "–"  # absent, not zero
    assert by_model["clm"]["NLL arithmetic"] == "6.000" and by_model["merge-varm"]["unparsable"] == "4"

    want = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    assert sorted(rep["plots"]) == sorted(["plots/mt_bench_categories.png", "plots/heldout_nll.png",
                                           "plots/exact_match.png", "plots/training_loss.png"])
    for rel in rep["plots"]:
        with Image.open(tmp_path / rel) as img:
            assert img.format == "PNG" and img.size == want
            # something was drawn: far from a blank canvas
            assert len(set(img.convert("RGB").getdata())) > 20
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["models"] == MODELS and data["results"]["mixtral"]["mt_bench"]["turn_2"] == 5.0


def test_report_artifact_reads_loss_histories(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    results = _results()
    evals = {}
    for name, res in results.items():
        evals[name] = f"evaluate/{name}-0"
        with store.writer(evals[name]) as w:
            w.write_json("results.json", res)
    with store.writer("train/clm-0") as w:  # what the train stage writes into a target folder
        w.write_json("fusechat_training.json", {"lam": 1.0, "history": [
            {"step": s, "loss": 2.0 - 0.1 * s, "clm_loss": 2.0 - 0.1 * s, "fusion_loss": None} for s in (1, 2, 3)]})
    assert loss_history(store, "train/clm-0") == [{"step": s, "loss": 2.0 - 0.1 * s} for s in (1, 2, 3)]
    with store.writer("train/mixtral-0") as w:
        w.write_bytes("metrics.jsonl", b"".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "lr": 1e-5}).encode()
                                                + b"\n" for s in range(5)))
    with store.writer("train/llama-0") as w:
        w.write_json("trainer_state.json", {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "eval_x": 1},
                                                            {"step": 3, "loss": 1.5}]})
    assert loss_history(store, "train/llama-0") == [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.5}]
    assert loss_history(store, "train/none") is None
    rep = write_report(store, "report/x", "Run", evals, {"mixtral": "train/mixtral-0", "llama": "train/llama-0",
                                                        "clm": "train/clm-0"})
    assert store.is_complete("report/x")
    files = {f.path for f in store.require("report/x").files}
    assert {"report.md", "report.json", "plots/training_loss.png"} <= files
    assert len(_table_rows(rep["markdown"])) == 2 + len(MODELS)
    assert set(store.read_json("report/x", "report.json")["loss_histories"]) == {"mixtral", "llama", "clm"}


@pytest.mark.parametrize("bad", [{}, {"pivot": {"model": "pivot"}}])
def test_report_without_measures_still_lists_models(tmp_path, bad):
    rep = build_report("Empty", bad, tmp_path)
    assert len(_table_rows(rep["markdown"])) == 2 + len(bad)
    assert rep["plots"] == []


def _nll_results(table: dict[str, dict[str, float]], em: dict[str, dict[str, float]] | None = None) -> dict:
    return {m: {"heldout_nll": {"sources": {d: {"nll": v} for d, v in row.items()}},
                "exact_match": {"sources": {d: {"accuracy": a} for d, a in (em or {}).get(m, {}).items()}}}
            for m, row in table.items()}


def test_report_json_answers_whether_fusion_beat_the_clm_baseline(tmp_path):
    table = {"clm": {"a": 2.0, "b": 3.0, "c": 1.0},
             "target-x": {"a": 1.9, "b": 3.2, "c": 1.2},   # better on expert a, worse on b: mean worse
             "target-y": {"a": 2.1, "b": 2.95, "c": 1.01},  # better on expert b, worse on c: mean better
             "merge-varm": {"a": 1.95, "b": 3.0, "c": 1.02}}
    roles = {"clm": "clm", "merges": ["merge-varm"],
             "targets": {"target-x": {"source": "x", "expert_domains": ["a", "b"]},
                         "target-y": {"source": "y", "expert_domains": ["b", "c"]}}}
    rep = build_report("Run", _nll_results(table, {"clm": {"a": 0.5}}), tmp_path, roles=roles)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["domains"]["clm"] == {"a": {"nll": 2.0, "exact_match": 0.5}, "b": {"nll": 3.0}, "c": {"nll": 1.0}}
    fx, fy = data["fusion"]["targets"]["target-x"], data["fusion"]["targets"]["target-y"]
    # by hand: x over (a, b) 2.55 vs clm 2.5; y over (b, c) 1.98 vs clm 2.0
    assert fx["margins"] == pytest.approx({"a": 0.1, "b": -0.2}) and fx["margin"] == pytest.approx(-0.05)
    assert fx["beats_clm"] is False
    assert fy["mean_nll"] == pytest.approx(1.98) and fy["margin"] == pytest.approx(0.02)
    # per-domain aggregates only: no interval, so no claim either way
    assert fy["interval"] is None and fy["verdict"] == "not distinguishable" and fy["beats_clm"] is False
    m = data["fusion"]["merges"]["merge-varm"]
    # by hand: clm mean 2.0, merge mean (1.95 + 3.0 + 1.02) / 3 = 1.99
    assert m["mean_nll"] == pytest.approx(1.99) and m["margin"] == pytest.approx(0.01)
    md = rep["markdown"]
    assert "Did fusion beat plain fine-tuning?" in md
    assert ("**target-x** on x's expert data (a, b): not distinguishable, 2.5500 vs 2.5000, margin -0.0500 "
            "(per data source: a +0.1000, b -0.2000)") in md
    assert "**merge-varm** on all data sources: not distinguishable, 1.9900 vs 2.0000, margin +0.0100" in md
    assert rep["plots"][0] == "plots/fusion_margin.png" and "![fusion_margin](plots/fusion_margin.png)" in md
    assert Image.open(tmp_path / "plots" / "fusion_margin.png").size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def test_report_without_a_clm_baseline_has_no_verdict(tmp_path):
    rep = build_report("Run", _nll_results({"pivot": {"a": 1.0}}), tmp_path,
                       roles={"clm": None, "targets": {}, "merges": []})
    assert json.loads((tmp_path / "report.json").read_text())["fusion"] is None
    assert "Did fusion beat" not in rep["markdown"]


def test_plots_inline_as_data_uris_a_browser_renders_without_the_store(tmp_path):
    import base64
    import io
    import re

    from fusechat_core.evaluate.report import inline_images

    losses = {"mixtral": [{"step": s, "loss": 3.0 / (s + 1)} for s in range(20)]}
    rep = build_report("Run demo", _results(), tmp_path, losses)
    md = inline_images(rep["markdown"], lambda rel: (tmp_path / rel).read_bytes())
    assert "](plots/" not in md  # no link left that only the store could serve
    found = dict(re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md))
    assert set(found) == {p.split("/")[-1][:-4] for p in rep["plots"]}
    for stem, b64 in found.items():
        raw = base64.b64decode(b64, validate=True)
        assert raw == (tmp_path / "plots" / f"{stem}.png").read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            assert img.format == "PNG" and img.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    # the artifact stays a reasonable size for the Prefect database and a browser
    assert len(md) < 400_000, len(md)
    print(f"report markdown with {len(found)} inline plots: {len(md) / 1000:.0f} kB")


def _seq_results(per_model: dict[str, list[float]], tokens: dict[str, int], domains: list[str]) -> dict:
    """Results with per-sequence held-out figures (as ``nll.heldout_nll`` stores them): every
    sequence has 40 bytes; sequence i belongs to ``domains[i % len(domains)]``."""
    out = {}
    for m, nlls in per_model.items():
        ids = [f"r{i:03d}" for i in range(len(nlls))]
        src = [domains[i % len(domains)] for i in range(len(nlls))]
        n = tokens[m]
        sources = {d: {"nll": sum(x for x, s in zip(nlls, src) if s == d) / (n * src.count(d))} for d in domains}
        out[m] = {"heldout_nll": {"sources": sources, "sequences": {
            "id": ids, "source": src, "nll": nlls, "tokens": [n] * len(nlls), "bytes": [40] * len(nlls)}}}
    return out


def test_margins_carry_paired_bootstrap_intervals_and_the_gap_closed(tmp_path):
    n = 60
    base = [20.0 + (i * 7 % 11) for i in range(n)]  # sequences of very different difficulty
    wobble = [0.5 if (i // 2) % 2 else -0.5 for i in range(n)]  # mean 0 within each domain
    per_model = {"clm": base,
                 "target-x": [b - 1.0 + w for b, w in zip(base, wobble)],  # 0.1 nats/token better
                 "x": [b - 3.0 for b in base],  # the expert: 3 nats per sequence better
                 "target-x-lam0": [b - 2.0 + w for b, w in zip(base, wobble)],
                 "merge-varm": [b + w for b, w in zip(base, wobble)]}  # no better than clm
    tokens = {"clm": 10, "target-x": 10, "target-x-lam0": 10, "merge-varm": 10, "x": 8}
    roles = {"clm": "clm", "merges": ["merge-varm"],
             "targets": {"target-x": {"source": "x", "expert_domains": ["a"]}},
             "ablation": {"x": {"1.0": "clm", "0.9": "target-x", "0.0": "target-x-lam0"}}}
    why = {"target-x": {"source": "x", "fusion_function": "mince", "coverage": 0.75,
                        "source_chosen": {"a": 0.9, "b": 0.2}}}
    rep = build_report("Run", _seq_results(per_model, tokens, ["a", "b"]), tmp_path, roles=roles,
                       fusion_stats=why)
    data = json.loads((tmp_path / "report.json").read_text())
    f = data["fusion"]
    t = f["targets"]["target-x"]
    assert t["margin"] == pytest.approx(0.1)
    lo, hi = t["interval"]
    assert 0 < lo < 0.1 < hi < 0.2 and t["verdict"] == "yes" and t["beats_clm"] is True
    assert t["intervals"]["a"] == t["interval"]  # one expert domain: its mean is itself
    assert t["intervals_all"]["a"] == t["interval"] and set(t["intervals_all"]) == {"a", "b"}  # for the plot
    m = f["merges"]["merge-varm"]
    assert m["interval"][0] < 0 < m["interval"][1] and m["verdict"] == "not distinguishable"
    assert f["bootstrap"]["resamples"] >= 1000 and f["bootstrap"]["level"] == 0.95
    # gap closed in bits per byte, by hand: 1 nat of 3 per sequence, the same bytes
    g = f["gap_closed"]["target-x"]
    assert g["source"] == "x" and g["gap_closed"] == pytest.approx(1 / 3) and g["status"] == "closed"
    assert g["gap"]["bpb"] == pytest.approx(3 / (40 * math.log(2))) and g["gap"]["interval"][0] > 0
    bpb_clm = sum(b for i, b in enumerate(base) if i % 2 == 0) / (30 * 40 * math.log(2))
    assert g["per_domain"]["a"]["bpb"]["clm"] == pytest.approx(bpb_clm)
    assert g["interval"][0] < 1 / 3 < g["interval"][1] and g["interval"][1] - g["interval"][0] < 0.2
    ab = f["ablation"]["x"]
    assert list(ab) == ["0.0", "0.9", "1.0"]
    assert ab["1.0"]["gap_closed"] == 0.0 and ab["0.0"]["gap_closed"] == pytest.approx(2 / 3)
    # the per-sequence figures stay in the evaluate artifacts, not in the report
    assert all("sequences" not in r["heldout_nll"] for r in data["results"].values())
    assert data["why"] == why
    md = rep["markdown"]
    assert "**target-x** on x's expert data (a): yes, " in md and f"margin +0.1000 [{lo:+.4f}, {hi:+.4f}]" in md
    assert "2000 resamples" in md and "**merge-varm** on all data sources: not distinguishable" in md
    assert "**target-x**: 33.3%" in md and "| x | 0 | target-x-lam0 | 66.7% [" in md
    assert "| target-x | x | mince | 75.0% | 90% | 20% |" in md
    assert rep["plots"][:2] == ["plots/fusion_margin.png", "plots/gap_closed.png"]
    assert Image.open(tmp_path / "plots" / "gap_closed.png").size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def test_the_gap_closed_leaves_out_rows_a_tokenizer_cut(tmp_path):
    """A row longer than evaluate.max_length is cut by each tokenizer at its own place: the
    source then measured other text than the pivot's models. Its bits per byte would be
    compared across different text, so the gap closed leaves such rows out."""
    n = 40
    base = [20.0 + (i * 7 % 11) for i in range(n)]
    per_model = {"clm": base, "target-x": [b - 1.0 for b in base], "x": [b - 3.0 for b in base]}
    results = _seq_results(per_model, {"clm": 10, "target-x": 10, "x": 8}, ["a", "b"])
    # the source measured only the start of row r000 (its tokenizer's cut): less text, less NLL
    seq = results["x"]["heldout_nll"]["sequences"]
    seq["cut"] = [i == 0 for i in range(n)]
    seq["nll"][0], seq["bytes"][0] = 2.0, 4
    roles = {"clm": "clm", "merges": [], "targets": {"target-x": {"source": "x", "expert_domains": ["a"]}}}
    rep = build_report("Run", results, tmp_path, roles=roles)
    assert "; 1 sequences left out, cut to evaluate.max_length" in rep["markdown"]
    g = json.loads((tmp_path / "report.json").read_text())["fusion"]["gap_closed"]["target-x"]
    assert g["sequences"] == n // 2 - 1 and g["cut_left_out"] == 1  # of data source a's rows: the share's
    assert g["gap_closed"] == pytest.approx(1 / 3)  # by hand: 1 nat of 3 on every whole row
    rows_a = [i for i in range(1, n) if i % 2 == 0]
    assert g["per_domain"]["a"]["bpb"]["source"] == pytest.approx(
        sum(base[i] - 3.0 for i in rows_a) / (len(rows_a) * 40 * math.log(2)))


def test_a_gap_closed_measured_on_nothing_says_every_sequence_was_cut(tmp_path):
    """An expert domain of long answers under a short evaluate.max_length: the source's
    tokenizer cut every one of its rows. The report says the share was not measured and why,
    instead of leaving the target out of the section as if it had no source."""
    n = 40
    base = [20.0 + (i * 7 % 11) for i in range(n)]
    per_model = {"clm": base, "target-x": [b - 1.0 for b in base], "x": [b - 3.0 for b in base]}
    results = _seq_results(per_model, {"clm": 10, "target-x": 10, "x": 8}, ["a", "b"])
    seq = results["x"]["heldout_nll"]["sequences"]
    seq["cut"] = [s == "a" for s in seq["source"]]  # every row of the expert domain
    roles = {"clm": "clm", "merges": [], "targets": {"target-x": {"source": "x", "expert_domains": ["a"]}}}
    rep = build_report("Run", results, tmp_path, roles=roles)
    g = json.loads((tmp_path / "report.json").read_text())["fusion"]["gap_closed"]["target-x"]
    assert g["gap_closed"] is None and g["status"] == "every sequence cut" and g["cut_domains"] == ["a"]
    assert g["cut_left_out"] == n // 2 and g["sequences"] == 0  # a's rows; b's, whole, are not compared
    assert ("**target-x** against `x`: not measured: every held-out sequence of a was cut to "
            "evaluate.max_length") in rep["markdown"]
    assert "plots/gap_closed.png" not in rep["plots"]  # no bar to draw


def test_the_gap_closed_is_no_share_where_the_baseline_already_matches_the_expert(tmp_path):
    """A share of the gap means something only where the source is better than the baseline.
    Domain a: the source is *worse* than clm (a ratio there, 1 / -2 = -50%, would say "moved
    away from the expert" of a move toward a better model); domain b: a gap of 0.05 nats a
    sequence under a noise of ±3, so the ratio's interval is unbounded."""
    n = 60
    base = [20.0 + (i * 7 % 11) for i in range(n)]
    wobble = [0.5 if (i // 2) % 2 else -0.5 for i in range(n)]  # mean 0 within each domain
    per_model = {"clm": base,
                 "target-x": [b - (1.0 if i % 2 == 0 else 0.02) for i, b in enumerate(base)],
                 "x": [b + 2.0 if i % 2 == 0 else b - 0.05 + 6 * w for i, (b, w) in enumerate(zip(base, wobble))]}
    tokens = {"clm": 10, "target-x": 10, "x": 8}
    roles = {"clm": "clm", "merges": [], "targets": {"target-x": {"source": "x", "expert_domains": ["a", "b"]}},
             "ablation": {"x": {"1.0": "clm", "0.9": "target-x"}}}
    rep = build_report("Run", _seq_results(per_model, tokens, ["a", "b"]), tmp_path, roles=roles)
    g = json.loads((tmp_path / "report.json").read_text())["fusion"]["gap_closed"]["target-x"]
    a, b = g["per_domain"]["a"], g["per_domain"]["b"]
    per_byte = 1 / (40 * math.log(2))  # one nat a sequence of 40 bytes, in bits per byte
    assert a["gap"]["bpb"] == pytest.approx(-2.0 * per_byte)
    assert a["gap_closed"] is None and a["interval"] is None and a["status"] == "no gap"
    assert a["gap"]["interval"][1] < 0
    assert b["gap"]["bpb"] == pytest.approx(0.05 * per_byte)
    assert b["gap"]["interval"][0] < 0 < b["gap"]["interval"][1]
    assert b["gap_closed"] == pytest.approx(0.02 / 0.05) and b["interval"] is None
    assert b["status"] == "gap not distinguishable from 0"
    # over both domains the source is worse than the baseline: no share either
    assert g["gap_closed"] is None and g["status"] == "no gap"
    assert g["gap"]["bpb"] == pytest.approx((-2.0 + 0.05) / 2 * per_byte)
    md = rep["markdown"]
    assert "a no gap to close (the baseline is at least as good as the source: -0.072 BPB)" in md
    assert "b 40.0% (no interval: the gap itself, +0.002 [" in md and "is not distinguishable from 0)" in md
    assert "| x | 1 | clm | no gap to close" in md  # λ = 1 is the baseline: nothing moved, no gap to move into
    assert Image.open(tmp_path / "plots" / "gap_closed.png").size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)


def test_the_terminal_summary_reads_any_report_json_it_is_given():
    """The lines a run ends with: one per target and merge, widths set by the longest name and
    verdict; a report.json from an older version (no verdict, no interval, a merge without a
    margin) gives what it has, and no fusion section gives no lines."""
    from fusechat_core.evaluate.report import fusion_summary

    fusion = {"clm": "clm", "bootstrap": {"level": 0.9},
              "targets": {"target-a": {"source": "a", "domains": ["x", "y"], "margin": 0.01234, "verdict": "yes",
                                       "interval": [0.001, 0.02]}},
              "merges": {"merge-varm": {"margin": -0.5, "verdict": "not distinguishable", "interval": [-1.0, 0.1]},
                         "merge-old": {"beats_clm": True}}}
    assert fusion_summary(fusion) == [
        "Did fusion beat plain fine-tuning (`clm`, λ = 1)? Held-out NLL margin, 90% interval:",
        "  target-a    yes                  +0.0123 [+0.0010, +0.0200]  on a's expert data (x, y)",
        "  merge-varm  not distinguishable  -0.5000 [-1.0000, +0.1000]  on all data sources"]
    del fusion["targets"]["target-a"]["verdict"], fusion["targets"]["target-a"]["interval"]
    assert fusion_summary(fusion)[1] == "  target-a    None                 +0.0123  on a's expert data (x, y)"
    assert fusion_summary(None) == fusion_summary({}) == fusion_summary({"targets": {}, "merges": {}}) == []


def _ci_text(iv: list[float]) -> str:
    return f" [{iv[0]:+.2f}, {iv[1]:+.2f}]"


def _mt(scores: dict[int, tuple[str, list[float]]]) -> dict:
    """A model's mt_bench results from per-question (category, [turn scores]), as summarise makes them."""
    from fusechat_core.evaluate.judge import Judgment, summarise

    js = [Judgment(q, cat, t + 1, "single-v1", "judge", "ok", score=s)
          for q, (cat, turns) in scores.items() for t, s in enumerate(turns)]
    return {**summarise(js), "judge_model": "judge"}


def test_mt_bench_averages_carry_a_bootstrap_interval_over_questions_and_paired_margins(tmp_path):
    """80 questions, 10 per category. The CLM baseline's scores vary a lot from question to
    question; the target scores exactly one more on every turn, the merge the same as the
    baseline give or take 1 (alternating). Paired, the target's margin is +0.5 with no spread
    at all (every resample gives +0.5) while each average alone has a wide interval; the
    merge is not distinguishable from the baseline."""
    import statistics

    cats = CATEGORIES
    base = {q: (cats[q // 10], [float(1 + (q * 7) % 9), float(1 + (q * 5) % 9)]) for q in range(80)}
    per_model = {"clm": _mt(base),
                 "target-x": _mt({q: (c, [s + 0.5 for s in t]) for q, (c, t) in base.items()}),
                 "merge-varm": _mt({q: (c, [s + (1 if q % 2 else -1) for s in t]) for q, (c, t) in base.items()})}
    results = {n: {"model": n, "mt_bench": m} for n, m in per_model.items()}
    roles = {"clm": "clm", "merges": ["merge-varm"], "targets": {"target-x": {"source": "x"}}}
    rep = build_report("Run", results, tmp_path, roles=roles)
    data = json.loads((tmp_path / "report.json").read_text())["mt_bench"]
    clm = data["models"]["clm"]
    turns = [s for _, t in base.values() for s in t]
    assert clm["average"] == pytest.approx(statistics.mean(turns)) and clm["questions"] == 80
    # the interval's half-width against the normal approximation, by hand: per-question means,
    # ±1.96·sd/√n (stratification only narrows it)
    per_q = [statistics.mean(t) for _, t in base.values()]
    half = 1.96 * statistics.stdev(per_q) / math.sqrt(80)
    lo, hi = clm["interval"]
    assert lo < clm["average"] < hi and 0.5 * half < (hi - lo) / 2 < 1.2 * half
    t = data["vs_clm"]["target-x"]
    assert t["margin"] == pytest.approx(0.5) and t["interval"] == pytest.approx([0.5, 0.5])
    assert t["verdict"] == "yes" and t["questions"] == 80
    tgt_lo, tgt_hi = data["models"]["target-x"]["interval"]
    assert tgt_lo < hi  # unpaired, the two averages' intervals overlap: pairing is what decides
    m = data["vs_clm"]["merge-varm"]
    assert m["margin"] == pytest.approx(0.0) and m["interval"][0] < 0 < m["interval"][1]
    assert m["verdict"] == "not distinguishable"
    from fusechat_core.evaluate.report import mt_bench_summary

    assert mt_bench_summary(data) == [
        "On MT-Bench, against `clm` (judge score margin, 95% interval over questions):",
        f"  merge-varm  not distinguishable  {m['margin']:+.2f}{_ci_text(m['interval'])}  80 questions",
        "  target-x    yes                  +0.50 [+0.50, +0.50]  80 questions"]  # as report.json keeps them
    assert mt_bench_summary(None) == [] and mt_bench_summary({"vs_clm": {}}) == []
    md = rep["markdown"]
    assert f"- clm: average {clm['average']:.2f} [{lo:+.2f}, {hi:+.2f}] over 80 questions" in md
    assert "- **target-x** vs `clm` on MT-Bench: yes, margin +0.50 [+0.50, +0.50] over 80 questions" in md
    # the per-question columns stay in the evaluate artifacts, not in the report's results
    assert "questions" not in json.loads((tmp_path / "report.json").read_text())["results"]["clm"]["mt_bench"]


def test_an_unscored_turn_counts_in_no_questions_mean_and_old_results_have_no_interval(tmp_path):
    from fusechat_core.evaluate.judge import Judgment, summarise

    js = [Judgment(1, "writing", 1, "p", "j", "ok", score=8.0), Judgment(1, "writing", 2, "p", "j", "unparsable"),
          Judgment(2, "math", 1, "p", "j", "ok", score=2.0), Judgment(2, "math", 2, "p", "j", "ok", score=4.0),
          Judgment(3, "math", 1, "p", "j", "failed"), Judgment(3, "math", 2, "p", "j", "failed")]
    q = summarise(js)["questions"]
    assert q == {"id": [1, 2, 3], "category": ["writing", "math", "math"], "score_sum": [8.0, 6.0, 0.0],
                 "scored": [1, 2, 0]}
    old = {k: v for k, v in summarise(js).items() if k != "questions"}  # an evaluation before version 4
    # a judge that never gave a rating: no average, no interval, and the report is still made
    silent = [Judgment(1, "writing", t, "p", "j", "unparsable") for t in (1, 2)]
    build_report("Run", {"c": {"model": "c", "mt_bench": {**summarise(silent), "judge_model": "j"}}},
                 tmp_path / "silent")
    assert json.loads((tmp_path / "silent" / "report.json").read_text())["mt_bench"] is None
    rep = build_report("Run", {"a": {"model": "a", "mt_bench": {**summarise(js), "judge_model": "j"}},
                               "b": {"model": "b", "mt_bench": {**old, "judge_model": "j"}}}, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())["mt_bench"]
    assert data["models"]["a"]["average"] == pytest.approx(14 / 3) and data["models"]["a"]["questions"] == 2
    assert "b" not in data["models"]
    assert "- b: average without an interval (no per-question scores)" in rep["markdown"]
    assert "sampled" not in rep["markdown"]
    # a judge that took no temperature 0: its verdicts are sampled, and the report says how many
    for j in js:
        j.sampled = j.status == "ok"
    rep = build_report("Run", {"a": {"model": "a", "mt_bench": {**summarise(js), "judge_model": "o3"}}},
                       tmp_path / "sampled")
    assert "3 scored, 1 unparsable, 2 failed (judge o3; 3 verdicts sampled: the judge took no temperature 0)" \
        in rep["markdown"]


def test_models_judged_apart_are_said_not_comparable(tmp_path):
    """A model evaluated later, after FastChat's main branch moved a reference answer, or by
    another judge: its MT-Bench figures are no comparison with the cached ones."""
    base = {q: (CATEGORIES[q // 10], [5.0, 6.0]) for q in range(20)}
    results = {n: {"model": n, "mt_bench": {**_mt(base), "data_digests": {"questions": "a", "references": ref},
                                             "judge_model": judge}}
               for n, ref, judge in (("clm", "r1", "gpt-4"), ("target-x", "r2", "gpt-4"),
                                     ("merge-varm", "r1", "gpt-4o"))}
    roles = {"clm": "clm", "merges": ["merge-varm"], "targets": {"target-x": {"source": "x"}}}
    rep = build_report("Run", results, tmp_path, roles=roles)
    mt = json.loads((tmp_path / "report.json").read_text())["mt_bench"]
    assert mt["vs_clm"]["target-x"]["verdict"] == "not comparable"
    assert mt["vs_clm"]["target-x"]["why"] == "different question or reference files (clm; target-x)"
    assert mt["vs_clm"]["merge-varm"]["why"] == "different judges (clm; merge-varm)"
    assert "**Not comparable as measured**: the models were judged with different judges" in rep["markdown"]
    # the same judge and files: no warning
    same = {n: {"model": n, "mt_bench": {**_mt(base), "data_digests": {"q": "a"}, "judge_model": "gpt-4"}}
            for n in ("clm", "target-x")}
    rep = build_report("Run", same, tmp_path / "same", roles={"clm": "clm", "targets": {"target-x": {}}})
    mt = json.loads((tmp_path / "same" / "report.json").read_text())["mt_bench"]
    assert mt["judged_apart"] is None and mt["vs_clm"]["target-x"]["verdict"] == "not distinguishable"
    assert "Not comparable" not in rep["markdown"]
