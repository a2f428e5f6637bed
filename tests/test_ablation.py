"""A λ ablation is a run of its own that recomputes nothing upstream of training.

The tiny run is trained once at λ = 0.9 (``--until train``); then the same config with
``train.lam: [0.9, 1.0, 0.0]`` runs to the end. On the Prefect task runs the server recorded:
demo models, dataset, representations, vocab maps, alignments and the λ = 0.9 targets and
the CLM baseline are ``Cached``; only the λ = 0 targets train. The report has the gap
closed per λ (λ = 1 is the baseline itself: 0) and plots it.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from flows.cli import main
from flows.pipeline import flow_run_name
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.prefect_server import final_task_runs, latest_flow_run
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow


def _run(args: list[str], capsys) -> dict[str, str]:
    from prefect.client.orchestration import get_client

    capsys.readouterr()
    code = main(["run", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    with get_client(sync_client=True) as client:
        until = args[args.index("--until") + 1] if "--until" in args else None
        run = latest_flow_run(client, flow_run_name(load_config(args[0]).name, until))
        return {t.name: t.state.name for t in final_task_runs(client, run.id)}


@pytest.mark.timeout(900)
def test_lambda_ablation_recomputes_nothing_upstream_and_reports_gap_closed_per_lambda(tmp_path, capsys):
    started = time.monotonic()
    base = tiny_run_config(tmp_path, f"file://{tmp_path}/store", name="tiny-ablation-base")
    raw = yaml.safe_load(base.read_text())
    raw["sources"] = raw["sources"][:1]  # one source (moe) is enough to see the sharing
    del raw["demo"]["models"]["deep"]
    raw["merge"]["methods_extra"] = []
    raw["evaluate"]["exact_match_sources"] = []
    raw["train"]["max_steps"] = 2
    raw["represent"]["shards"] = 1
    # an expert that knows markov better than two fine-tuning steps teach the baseline: without
    # a gap to close (the tiny default leaves moe as untrained as clm) the shares below are None
    raw["demo"]["models"]["moe"].update(steps=40, learning_rate=1e-2)
    base.write_text(yaml.safe_dump(raw))
    raw["name"] = "tiny-ablation"
    raw["train"]["lam"] = [0.9, 1.0, 0.0]
    # what the gap closed needs: the baseline, the source, its targets (no pivot, no merge evaluation)
    raw["evaluate"]["models"] = ["moe", "clm", "target-moe", "target-moe-lam0"]
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(yaml.safe_dump(raw))

    first = _run([str(base), "--until", "train"], capsys)
    assert set(first.values()) == {"Completed"}, first
    t_first = time.monotonic() - started
    second = _run([str(ablation)], capsys)
    upstream = [n for n in second if re.match(r"(demo_model|dataset|represent|vocab_map|align)\b", n)]
    assert len(upstream) == 2 + 1 + 2 * 2 + 1 + 2, sorted(upstream)  # every upstream task is there
    kept = {n: second[n] for n in [*upstream, "train[target=moe]", "train[target=clm]"]}
    assert set(kept.values()) == {"Cached"}, {n: s for n, s in kept.items() if s != "Cached"}
    assert second["train[target=moe-lam0]"] == "Completed"
    assert not [n for n in second if n.startswith("train[") and n not in kept and n != "train[target=moe-lam0]"]

    cfg = load_config(ablation)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    report = json.loads(store.read_bytes(plan.report(), "report.json"))
    gaps = report["fusion"]["ablation"]["moe"]
    assert sorted(gaps, key=float) == ["0", "0.9", "1"]
    # the expert has a gap to close, so every share is a number (an interval where it is certain)
    assert gaps["1"]["status"] == "closed" and gaps["1"]["gap"]["interval"][0] > 0, gaps["1"]
    # λ = 1 is the baseline itself: it closes exactly nothing
    assert gaps["1"]["model"] == "clm" and gaps["1"]["gap_closed"] == 0.0
    assert gaps["0"]["model"] == "target-moe-lam0" and gaps["0.9"]["model"] == "target-moe"
    for g in gaps.values():
        assert set(g["per_domain"]) == {"markov"}  # moe's expert domain in the tiny world
        assert g["gap_closed"] is not None, g
        assert g["interval"] is None or g["interval"][0] <= g["gap_closed"] <= g["interval"][1], g
    # the gap closed at λ = 0.9 is the report's own figure for target-moe
    assert gaps["0.9"]["gap_closed"] == report["fusion"]["gap_closed"]["target-moe"]["gap_closed"]
    assert "plots/gap_closed.png" in report["plots"]
    # the why table: the source's coverage and MinCE choices, for the run's target
    assert 0.0 < report["why"]["target-moe"]["coverage"] <= 1.0
    assert set(report["why"]["target-moe"]["source_chosen"]) == {"markov", "arithmetic"}
    md = store.read_bytes(plan.report(), "report.md").decode()
    assert "### λ ablation: gap closed against λ" in md and "| moe | 0 | target-moe-lam0 |" in md
    print(f"tiny run until train {t_first:.0f} s, then the ablation {time.monotonic() - started - t_first:.0f} s")
