"""Incremental fusion on the tiny run: adding a source to a finished run pays only for it.

One run to the end; then a source ``wide`` is added whose chat template is so verbose
that many rows no longer fit ``represent.max_length`` under it. Checked on the Prefect
task runs the server recorded:

- the pivot's and the old sources' represent / vocab_map / align / train tasks (shards
  included), the dataset and the old models' evaluations are ``Cached``; the new
  source's chain ``Completed``; the report has the new target;
- every model's representation shards (and every source's aligned shards) hold the
  dataset's rows, in the dataset's order; the rows the new source saw only a prefix of
  are counted in its stage summary, and that count matches an independent rendering;
- removing the source again: every task is ``Cached`` (its addresses are the first run's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from fusechat_core.chat import TEMPLATES
from fusechat_core.config import load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore
from tests.prefect_server import final_task_runs, latest_flow_run
from tests.tiny_config import tiny_run_config

pytestmark = pytest.mark.slow

# User turns behind a long header: whole conversations outgrow max_length under it.
VERBOSE = "verbose-header-test"
_HEADER = ("### The user writes the message below; read all of it with care, think about what is "
           "asked, and then answer it in full, in plain words, without skipping a step. ###\n")
if VERBOSE not in TEMPLATES:
    TEMPLATES.register(VERBOSE)(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}" + _HEADER.replace("'", "")
        + "{{ m['content'] }}\n### Answer: ###\n{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}"
        "{% endfor %}")


def _run(path: Path, capsys, expected: int | None = None) -> dict[str, str]:
    """Run the config to the end; every task run of that flow run, by name → state name."""
    from prefect.client.orchestration import get_client

    capsys.readouterr()
    code = main(["run", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    with get_client(sync_client=True) as client:
        run = latest_flow_run(client, load_config(path).name)
        tasks = final_task_runs(client, run.id, expected=expected)
    states = {t.name: t.state.name for t in tasks}
    assert len(states) == len(tasks), "task run names must tell instances apart"
    return states


def _of(states: dict[str, str], *patterns: str) -> dict[str, str]:
    return {n: s for n, s in states.items() if any(re.fullmatch(p, n) for p in patterns)}


@pytest.mark.timeout(1800)  # three runs of the tiny pipeline (about 4 minutes on one free core)
def test_adding_a_source_runs_only_its_chain_and_keeps_rows_aligned(tmp_path, capsys):
    base = tiny_run_config(tmp_path, f"file://{tmp_path}/store", name="tiny-incremental")
    raw = yaml.safe_load(base.read_text())
    raw["train"]["clm_baseline"] = False
    raw["merge"]["methods_extra"] = []
    # The tiny mixture's blocks are 22-38 tokens under the pivot, 61-78 under the verbose
    # template: at 72, some rows are cut for the new source and most are not.
    raw["represent"]["max_length"] = 72
    base.write_text(yaml.safe_dump(raw))
    raw["sources"].append({"name": "wide", "path": "demo:wide", "tokenizer": "builtin:mistral-v1",
                           "chat_template": VERBOSE, "dtype": "float32"})
    raw["demo"]["models"]["wide"] = {"arch": "llama", "hidden": 32, "intermediate": 64, "steps": 2,
                                     "domains": {"markov": 1}}
    added = tmp_path / "added.yaml"
    added.write_text(yaml.safe_dump(raw))

    first = _run(base, capsys)
    assert set(first.values()) == {"Completed"}, first
    second = _run(added, capsys)

    old = r"(represent|vocab_map|align|train)\[(model|source|target)=(pivot|moe|deep)(, shard=\d/\d)?\]"
    kept = _of(second, old, r"dataset", r"demo_model\[(pivot|moe|deep)\]",
               r"(measure|evaluate)\[model=(pivot|moe|deep|target-moe|target-deep)\]")
    assert len(kept) == 1 + 3 + 3 * 3 + 2 * (1 + 3) + 2 + 2 * 5, sorted(kept)  # every old task is there
    assert set(kept.values()) == {"Cached"}, {n: s for n, s in kept.items() if s != "Cached"}
    new = _of(second, r"(represent|vocab_map|align|train)\[(model|source|target)=wide(, shard=\d/\d)?\]",
              r"demo_model\[wide\]", r"merge\[method=varm\]",
              r"(measure|evaluate)\[model=(wide|target-wide|merge-varm)\]", r"report")
    assert len(new) == 1 + 3 + 1 + 3 + 1 + 1 + 2 * 3 + 1, sorted(new)
    assert set(new.values()) == {"Completed"}, {n: s for n, s in new.items() if s != "Completed"}
    assert set(second) == set(kept) | set(new), sorted(set(second) - set(kept) - set(new))

    cfg = load_config(added)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    report = json.loads(store.read_bytes(plan.report(), "report.json"))
    assert "target-wide" in report["domains"]

    # Row order and counts: every model's shards, and every source's aligned shards, hold the
    # dataset's training rows in its order.
    from fusechat_core.data import read_split

    rows = read_split(store, plan.dataset, "train")
    ids = [r["id"] for r in rows]
    n = cfg.represent.shards
    for spec in cfg.models:
        got = [i for k in range(n) for i in store.read_json(plan.represent_shard(spec, k), "meta.json")["row_ids"]]
        assert got == ids, spec.name
    for spec in cfg.sources:
        got = [i for k in range(n) for i in store.read_json(plan.align_shard(spec, k), "meta.json")["row_ids"]]
        assert got == ids, spec.name

    # The rows the new source saw only a prefix of, counted independently: its template's
    # rendering, tokenized, is longer than represent.max_length.
    from fusechat_core.models import load_tokenizer, tokenizer_ref

    tok = load_tokenizer(*tokenizer_ref(plan.model("wide")))
    template = TEMPLATES.get(VERBOSE)
    roles = {"human": "user", "gpt": "assistant"}
    longer = 0
    for r in rows:
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
        longer += len(tok(text, add_special_tokens=False)["input_ids"]) > cfg.represent.max_length
    assert 0 < longer < len(rows), "the test needs some rows cut for the new source and some not"
    wide = store.manifest(plan.represent(plan.model("wide"))).meta
    assert wide["n_cut"] == longer and wide["n_seq"] == len(rows)
    assert store.manifest(plan.represent(cfg.pivot)).meta["n_cut"] == 0  # the dataset fits the pivot
    assert store.manifest(plan.align(plan.model("wide"))).meta["source_cut_sequences"] == longer
    # ... and the represent stage's summary on the dashboard says so
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks._stage import dashboard_key

    key = dashboard_key(store.url, plan.represent(plan.model("wide")))
    with get_client(sync_client=True) as client:
        [summary] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                          limit=1)
    assert f"| n_cut | {longer} |" in summary.data

    # Removing the source again: the first run's addresses, all found.
    third = _run(base, capsys, expected=len(first))
    assert set(third.values()) == {"Cached"}, {n: s for n, s in third.items() if s != "Cached"}
    assert set(third) == set(first)
