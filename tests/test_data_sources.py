"""Every preset source read by the loader of its published schema; pinning; loud failure; cleaning.

Rows are written here in each hub dataset's published shape (nested structs, nulls,
extra columns: what ``datasets`` yields for the dataset card's features) and read back
through the preset's own source spec with a local path, so the preset names the right
loader. The expected conversations are written out by hand, not produced by the loaders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from fusechat_core.config import DataConfig, DataSourceSpec, load_config
from fusechat_core.data.build import DataError, build_mixture, token_counter
from fusechat_core.data.presets import PRESETS
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore

SYSTEM = "You are an AI assistant. You will be given a task. You must generate a detailed and long answer."


def _conv(*turns: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


def _orca_rows():
    rows = [
        {"id": "c-0", "instruction": SYSTEM, "num_samples": 2,
         "cluster": {"samples": [{"input": "Translate 'bonjour' to English.", "output": "It means 'hello'.",
                                  "similarity": 0.93},
                                 {"input": "Translate 'merci' to English.", "output": "It means 'thank you'.",
                                  "similarity": 0.91}],
                     "centroid_id": 4}},
        # a null system prompt (the column is nullable): the samples are still the conversation
        {"id": "c-1", "instruction": None, "num_samples": 1,
         "cluster": {"samples": [{"input": "Is 7 prime?", "output": "Yes: its only divisors are 1 and 7.",
                                  "similarity": None}], "centroid_id": 9}},
    ]
    rows += [{"id": f"c-{i}", "instruction": SYSTEM, "num_samples": 1,
              "cluster": {"samples": [{"input": f"What is {i} + {i}?", "output": f"{i} + {i} = {2 * i}.",
                                       "similarity": 1.0}], "centroid_id": i}} for i in range(2, 6)]
    # one sample without an output (a null in the struct): the row is counted, not half-read
    bad = {"id": "c-9", "instruction": SYSTEM, "num_samples": 2,
           "cluster": {"samples": [{"input": "A?", "output": "B.", "similarity": 0.5},
                                   {"input": "C?", "output": None, "similarity": 0.4}], "centroid_id": 1}}
    expected = [_conv("Translate 'bonjour' to English.", "It means 'hello'.",
                      "Translate 'merci' to English.", "It means 'thank you'."),
                _conv("Is 7 prime?", "Yes: its only divisors are 1 and 7.")]
    expected += [_conv(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.") for i in range(2, 6)]
    return rows + [bad], expected, {"bad_cluster_sample": 1}


def _capybara_rows():
    rows = [{"source": "Airoboros", "conversation": [
        {"input": "Name a prime above 10.", "output": "11 is prime."},
        {"input": "And the next one?", "output": "13."}]},
        {"source": "Know-Logic", "conversation": [{"input": "What is the capital of Peru?", "output": "Lima."}]}]
    return rows, [_conv("Name a prime above 10.", "11 is prime.", "And the next one?", "13."),
                  _conv("What is the capital of Peru?", "Lima.")], {}


def _no_robots_rows():
    rows = [{"prompt": "Write a haiku about rain.", "prompt_id": "a1f3", "category": "Generation",
             "messages": [{"content": "You are a poet.", "role": "system"},
                          {"content": "Write a haiku about rain.", "role": "user"},
                          {"content": "Soft rain on the roof\nthe garden drinks it slowly\nmorning smells of earth",
                           "role": "assistant"}]},
            {"prompt": "Who wrote Hamlet?", "prompt_id": "b7c2", "category": "Open QA",
             "messages": [{"content": "Who wrote Hamlet?", "role": "user"},
                          {"content": "William Shakespeare.", "role": "assistant"},
                          {"content": "When?", "role": "user"},
                          {"content": "Around 1600.", "role": "assistant"}]}]
    return rows, [_conv("Write a haiku about rain.",
                        "Soft rain on the roof\nthe garden drinks it slowly\nmorning smells of earth"),
                  _conv("Who wrote Hamlet?", "William Shakespeare.", "When?", "Around 1600.")], {}


def _sharegpt_gpt4_rows():
    rows = [{"conversations": [{"from": "human", "value": "Explain recursion briefly."},
                               {"from": "gpt", "value": "A function that calls itself on a smaller input."},
                               {"from": "human", "value": "Example?"},
                               {"from": "gpt", "value": "Factorial: n! = n * (n-1)!"}]},
            {"conversations": [{"from": "human", "value": "What is HTTP?"},
                               {"from": "gpt", "value": "The protocol browsers use to fetch pages."}]}]
    return rows, [_conv("Explain recursion briefly.", "A function that calls itself on a smaller input.",
                        "Example?", "Factorial: n! = n * (n-1)!"),
                  _conv("What is HTTP?", "The protocol browsers use to fetch pages.")], {}


def _oasst_rows():
    rows = [{"text": "<|im_start|>user\nHow do plants make food?<|im_end|>\n<|im_start|>assistant\n"
                     "By photosynthesis, from light, water and CO2.<|im_end|>\n<|im_start|>user\n"
                     "Where does it happen?<|im_end|>\n<|im_start|>assistant\nIn the chloroplasts.<|im_end|>\n"},
            {"text": "<|im_start|>user\nName a noble gas.<|im_end|>\n<|im_start|>assistant\nNeon.<|im_end|>\n"}]
    return rows, [_conv("How do plants make food?", "By photosynthesis, from light, water and CO2.",
                        "Where does it happen?", "In the chloroplasts."),
                  _conv("Name a noble gas.", "Neon.")], {}


def _metamathqa_rows():
    rows = [{"type": "GSM_Rephrased", "query": "If Tom has 3 apples and buys 4 more, how many does he have?",
             "original_question": "Tom has 3 apples. He buys 4. How many?",
             "response": "3 + 4 = 7.\nThe answer is: 7"},
            {"type": "MATH_AnsAug", "query": "What is $2^5$?", "original_question": "What is $2^5$?",
             "response": "$2^5 = 32$. The answer is: 32"}]
    return rows, [_conv("If Tom has 3 apples and buys 4 more, how many does he have?",
                        "3 + 4 = 7.\nThe answer is: 7"),
                  _conv("What is $2^5$?", "$2^5 = 32$. The answer is: 32")], {}


def _magicoder_rows():
    rows = [{"lang": "python", "raw_index": 120, "index": 0, "seed": "def area(r):\n    return 3.14 * r * r\n",
             "openai_fingerprint": None,
             "problem": "Write a function that returns the area of a circle of radius r.",
             "solution": "```python\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n```"},
            {"lang": "rust", "raw_index": 7, "index": 1, "seed": "fn main() {}", "openai_fingerprint": "fp_44709d6fcb",
             "problem": "Print hello in Rust.", "solution": "```rust\nfn main() { println!(\"hello\"); }\n```"}]
    return rows, [_conv("Write a function that returns the area of a circle of radius r.",
                        "```python\nimport math\n\ndef area(r):\n    return math.pi * r ** 2\n```"),
                  _conv("Print hello in Rust.", "```rust\nfn main() { println!(\"hello\"); }\n```")], {}


def _evol_rows():
    rows = [{"instruction": "Reverse a list in Python.", "output": "Use `xs[::-1]` or `xs.reverse()`."},
            {"instruction": "Sum the numbers 1..10.", "output": "`sum(range(1, 11))` gives 55."}]
    return rows, [_conv("Reverse a list in Python.", "Use `xs[::-1]` or `xs.reverse()`."),
                  _conv("Sum the numbers 1..10.", "`sum(range(1, 11))` gives 55.")], {}


def _python23k_rows():
    rows = [{"id": "p-1", "conversations": [{"from": "human", "value": "Write a Python function to square x."},
                                            {"from": "gpt", "value": "def square(x):\n    return x * x"}]},
            {"id": "p-2", "conversations": [{"from": "human", "value": "Check if a string is a palindrome."},
                                            {"from": "gpt", "value": "def is_pal(s):\n    return s == s[::-1]"}]}]
    return rows, [_conv("Write a Python function to square x.", "def square(x):\n    return x * x"),
                  _conv("Check if a string is a palindrome.", "def is_pal(s):\n    return s == s[::-1]")], {}


def _released_rows():
    rows = [{"id": "fusechat-1", "conversations": [{"from": "human", "value": "Give me a synonym of happy."},
                                                   {"from": "gpt", "value": "Joyful."}]},
            {"id": "fusechat-2", "conversations": [{"from": "human", "value": "2 * 21?"},
                                                   {"from": "gpt", "value": "42."}]}]
    return rows, [_conv("Give me a synonym of happy.", "Joyful."), _conv("2 * 21?", "42.")], {}


# (preset, source name, rows factory, how the hub stores it)
CASES = [
    ("fusechat-mixture", "orca-best", _orca_rows, "parquet"),
    ("fusechat-mixture", "capybara", _capybara_rows, "parquet"),
    ("fusechat-mixture", "no_robots", _no_robots_rows, "parquet"),
    ("fusechat-mixture", "sharegpt_gpt4", _sharegpt_gpt4_rows, "jsonl"),
    ("fusechat-mixture", "oasst_top1", _oasst_rows, "parquet"),
    ("fusechat-mixture", "metamathqa", _metamathqa_rows, "json"),
    ("fusechat-mixture", "magicoder_oss", _magicoder_rows, "parquet"),
    ("fusechat-mixture", "evol_codealpaca", _evol_rows, "json"),
    ("fusechat-mixture", "python_code_23k", _python23k_rows, "json"),
    ("fusechat-mixture-released", "fusechat-mixture", _released_rows, "json"),
]


def _write(folder: Path, name: str, rows: list[dict], kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)  # nested structs; missing keys become nulls
    elif kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def _preset_source(preset: str, name: str, path: Path, **extra) -> DataSourceSpec:
    spec = dict(next(s for s in PRESETS[preset] if s["name"] == name))
    for k in ("count", "revision", "data_files"):
        spec.pop(k, None)
    return DataSourceSpec(**{**spec, "path": str(path), **extra})


def _build(sources: list[DataSourceSpec], **data):
    cfg = DataConfig(sources=sources, **{"heldout_fraction": 0.0, "max_length": 4096, **data})
    return build_mixture(cfg, 0, token_counter([]))


def test_the_preset_names_a_loader_for_every_source():
    names = {s["name"] for s in PRESETS["fusechat-mixture"]}
    assert {c[1] for c in CASES if c[0] == "fusechat-mixture"} == names and len(names) == 9
    assert all(s["format"] != "auto" for s in PRESETS["fusechat-mixture"])


@pytest.mark.parametrize(("preset", "name", "factory", "kind"), CASES, ids=[c[1] for c in CASES])
def test_each_preset_source_reads_its_published_shape(tmp_path, preset, name, factory, kind):
    rows, expected, skips = factory()
    path = _write(tmp_path, name, rows, kind)
    mix = _build([_preset_source(preset, name, path)])
    got = sorted((r["conversations"] for r in mix.train), key=json.dumps)
    assert got == sorted(expected, key=json.dumps)
    st = mix.stats["sources"][name]
    assert st["skipped"] == skips
    assert st["rows_read"] == len(rows)


def test_orca_best_rows_are_conversations_under_format_auto_too(tmp_path):
    rows, expected, _ = _orca_rows()
    path = _write(tmp_path, "orca", rows, "parquet")
    mix = _build([DataSourceSpec(name="orca", path=str(path), format="auto")])
    assert len(mix.train) == len(expected)
    assert mix.stats["sources"]["orca"]["skipped"] == {"bad_cluster_sample": 1}


def test_data_files_pins_one_file_of_a_folder(tmp_path):
    gpt4, expected, _ = _sharegpt_gpt4_rows()
    repo = tmp_path / "sharegpt_gpt4"
    _write(repo, "sharegpt_gpt4", gpt4, "jsonl")
    # the repository's other, larger files (not GPT-4): never read when the file is pinned
    other = [{"conversations": [{"from": "human", "value": f"other {i}"}, {"from": "gpt", "value": "x"}]}
             for i in range(5)]
    _write(repo, "sharegpt_V3_format", other, "jsonl")
    _write(repo / "sharegpt_jsonl", "common_zh_70k", other, "jsonl")

    pinned = _preset_source("fusechat-mixture", "sharegpt_gpt4", repo, data_files="sharegpt_gpt4.jsonl")
    mix = _build([pinned])
    assert sorted((r["conversations"] for r in mix.train), key=json.dumps) == sorted(expected, key=json.dumps)
    unpinned = _build([_preset_source("fusechat-mixture", "sharegpt_gpt4", repo)])
    assert len(unpinned.train) == len(expected) + 5  # the duplicates of "other" in two files count once

    with pytest.raises(DataError, match="data_files 'missing.jsonl' matches no file"):
        _build([_preset_source("fusechat-mixture", "sharegpt_gpt4", repo, data_files="missing.jsonl")])


def test_a_local_copy_of_a_hub_dataset_reads_the_split_it_names(tmp_path, caplog):
    """A folder laid out as a Hub repository (``data/train-00000-of-00001.parquet``, its test
    split beside it, the Hub's metadata files) reads as ``datasets`` reads it: the test split
    never joins the training rows and the metadata is no row. Before, every .json/.jsonl/
    .parquet file under the folder was read: 3 test rows trained, dataset_infos.json a
    malformed row."""
    repo = tmp_path / "no_robots"
    train = [{"conversations": _conv(f"train question {i}", f"answer {i}")} for i in range(6)]
    test = [{"conversations": _conv(f"test question {i}", f"answer {i}")} for i in range(3)]
    _write(repo / "data", "train-00000-of-00001", train, "parquet")
    _write(repo / "data", "test-00000-of-00001", test, "parquet")
    (repo / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {}}}))
    (repo / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    spec = DataSourceSpec(name="nr", path=str(repo), format="sharegpt")
    got = _build([spec])
    assert sorted(r["conversations"][0]["value"] for r in got.train) == sorted(f"train question {i}" for i in range(6))
    assert got.stats["sources"]["nr"]["skipped"] == {}
    tested = _build([spec.model_copy(update={"split": "test"})])
    assert sorted(r["conversations"][0]["value"] for r in tested.train) == [f"test question {i}" for i in range(3)]
    with pytest.raises(DataError, match=r"no files of split 'validation' \(its files name the splits test, train\)"):
        _build([spec.model_copy(update={"split": "validation"})])
    # datasets read from a folder before this rule are made again; those of a file or a Hub id are not
    from fusechat_core.data.build import reader_versions

    assert reader_versions([spec], None)["folder"] == {"files of a split": 2}
    for other in (DataSourceSpec(name="f", path=str(repo / "dataset_infos.json")), DataSourceSpec(path="org/set"),
                  spec.model_copy(update={"data_files": "data/*.parquet"})):
        assert "folder" not in reader_versions([other], None)
    # a folder that names no split is all train; a file it cannot read is said, not passed over
    flat = tmp_path / "flat"
    _write(flat, "chats", train, "jsonl")
    (flat / "more.jsonl.gz").write_bytes(b"\x1f\x8b")
    with caplog.at_level("WARNING", logger="fusechat.data"):
        assert len(_build([DataSourceSpec(name="flat", path=str(flat), format="sharegpt")]).train) == 6
    assert "1 files of split 'train' not read (only .json/.jsonl/.parquet files are): more.jsonl.gz" in caplog.text


def test_a_source_whose_every_exchange_is_too_long_fails_naming_it(tmp_path, caplog):
    """Exchanges longer than data.max_length leave training: said per source in the log, and a
    source left without one training block fails the stage (it succeeded with the source's
    share silently gone). The byte estimate (no tokenizer) is len(bytes) // 3 + 1 per turn."""
    short = [{"conversations": _conv(f"question {i}", "yes")} for i in range(4)]
    long_ = [{"conversations": _conv(f"question {i}", "x" * 600)} for i in range(4)]
    mixed = [{"conversations": _conv(f"other question {i}", "no")} for i in range(2)]
    mixed.append({"conversations": _conv("long one", "y" * 600)})
    sources = [DataSourceSpec(name=n, path=str(_write(tmp_path, n, rows, "jsonl")), format="sharegpt")
               for n, rows in (("short", short), ("mixed", mixed))]
    with caplog.at_level("WARNING", logger="fusechat.data"):
        mix = _build(sources, max_length=64)
    assert mix.stats["sources"]["mixed"]["too_long"] == 1 and mix.stats["sources"]["mixed"]["blocks"] == 2
    assert ("data source mixed: 1 exchanges (a user turn and its answer) longer than data.max_length "
            "(64 pivot tokens) left out of training") in caplog.text
    assert "data source short" not in caplog.text
    sources.append(DataSourceSpec(name="long", path=str(_write(tmp_path, "long", long_, "jsonl")), format="sharegpt"))
    with pytest.raises(DataError, match=r"^data source long: no training block: all 4 exchanges of its 4 training "
                                        r"conversations are longer than data.max_length \(64 pivot tokens\)$"):
        _build(sources, max_length=64)
    assert len(_build(sources, max_length=4096).train) == 4 + 3 + 4  # long enough: every one trains


def test_a_pin_that_does_not_apply_to_a_local_path_is_refused(tmp_path):
    """subset and revision pin a Hub repository; a single file has no splits. Given for a local
    path, they entered the dataset's address and changed nothing that was read."""
    from pydantic import ValidationError

    path = _write(tmp_path, "chats", [{"conversations": _conv("q", "a")}], "jsonl")
    for field, value in (("revision", "v1"), ("subset", "en")):
        with pytest.raises(ValidationError, match=rf"{field}: \S+ is a local path: {field} pins a hub repository"):
            DataSourceSpec(name="x", path=str(tmp_path), **{field: value})
    with pytest.raises(ValidationError, match=r"split: \S+ is one file, which has no splits"):
        DataSourceSpec(name="x", path=str(path), split="test")
    assert DataSourceSpec(name="x", path="org/set", revision="v1", subset="en", split="test").local is False


def test_a_preset_names_hub_repositories_whatever_the_current_folder_holds(tmp_path, monkeypatch):
    """A folder under the current directory named like a preset's repository (a download with
    ``--local-dir HuggingFaceH4/no_robots``) was read instead of the pinned Hub dataset, and
    the dataset's address took its absolute path."""
    from fusechat_core.data.presets import sources_of

    monkeypatch.chdir(tmp_path)
    hub_ids = [s["path"] for s in PRESETS["fusechat-mixture"]]
    for hub_id in hub_ids:
        _write(tmp_path / hub_id, "train", [{"conversations": _conv("q", "a")}], "jsonl")
    specs = sources_of(DataConfig(preset="fusechat-mixture"))
    assert [s.path for s in specs] == hub_ids and not any(s.local for s in specs)
    # a source of the config's own naming a folder is that folder
    own = DataConfig(sources=[{"name": "mine", "path": hub_ids[0]}]).sources[0]
    assert own.local and own.path == str((tmp_path / hub_ids[0]).resolve())


def test_the_dataset_address_includes_every_pin(tmp_path, monkeypatch):
    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "fusechat-7b-varm.yaml"
    cfg = load_config(cfg_path)
    base = RunPlan(cfg).dataset
    rebuilt = cfg.model_copy(update={"data": DataConfig(preset="fusechat-mixture", heldout_fraction=0)})
    first = RunPlan(rebuilt).dataset
    assert first != base
    # a preset whose pin changes makes another dataset, though its name is the same
    changed = [dict(s) for s in PRESETS["fusechat-mixture"]]
    changed[0]["revision"] = "0" * 40
    monkeypatch.setitem(PRESETS, "fusechat-mixture", changed)
    assert RunPlan(rebuilt).dataset != first
    for field, value in (("data_files", "a.jsonl"), ("split", "test"), ("subset", "en"), ("revision", "v1")):
        src = DataSourceSpec(name="x", path="org/set")
        one = RunPlan(cfg.model_copy(update={"data": DataConfig(sources=[src])})).dataset
        two = RunPlan(cfg.model_copy(update={"data": DataConfig(
            sources=[src.model_copy(update={field: value})])})).dataset
        assert one != two, field


def test_skipped_share_over_the_threshold_fails_with_one_line(tmp_path):
    good = [{"instruction": f"Task {i}", "output": f"Done {i}."} for i in range(7)]
    bad = [{"instruction": "x", "output": None}] * 2 + [{"instruction": 5, "output": "y"}]
    path = _write(tmp_path, "evol", good + bad, "json")
    with pytest.raises(DataError) as err:
        _build([_preset_source("fusechat-mixture", "evol_codealpaca", path)])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("data source evol_codealpaca: 3 of 10 rows skipped")
    assert "most common reason: missing_output (2 rows, the first: evol.json item 8)" in msg
    # the threshold is the source's own setting
    mix = _build([_preset_source("fusechat-mixture", "evol_codealpaca", path, max_skipped_fraction=0.3)])
    assert mix.stats["sources"]["evol_codealpaca"]["skipped"] == {"missing_output": 2, "non_text_value": 1}
    assert mix.stats["sources"]["evol_codealpaca"]["first_skipped"] == {"missing_output": "evol.json item 8",
                                                                        "non_text_value": "evol.json item 10"}
    assert len(mix.train) == 7


def test_vicuna_cleaning_drops_non_english_and_symbol_dumps(tmp_path):
    rows = [
        {"conversations": _conv("How long should I boil an egg?", "About nine minutes for a hard egg.")},
        {"conversations": _conv("Write a Python function that adds two numbers.",
                                "```python\ndef add(a, b):\n    return a + b\n```")},
        {"conversations": _conv("Combien de temps faut-il cuire un oeuf dur ?",
                                "Environ neuf minutes dans l'eau bouillante, puis refroidir.")},
        {"conversations": _conv("如何煮一个完美的鸡蛋？请告诉我步骤。", "把鸡蛋放进沸水里煮九分钟，然后用冷水冷却。")},
        {"conversations": _conv("#$%^&*()_+{}|:<>?~!@#$%^&*()", "!!!???***###$$$%%%^^^&&&***((()))")},
    ]
    path = _write(tmp_path, "mixed", rows, "jsonl")
    spec = DataSourceSpec(name="mixed", path=str(path), format="sharegpt")
    mix = _build([spec], clean="vicuna")
    assert sorted(r["conversations"][0]["value"] for r in mix.train) == [
        "How long should I boil an egg?", "Write a Python function that adds two numbers."]
    st = mix.stats["sources"]["mixed"]
    assert st["cleaned"] == {"non_english": 2, "special_characters": 1}
    assert st["skipped"] == {} and mix.stats["cleaned_total"] == 3
    assert len(_build([spec]).train) == 5  # no cleaning unless asked


def test_all_malformed_source_fails_the_stage_exit_1_nothing_committed(tmp_path, capsys, prefect_server):
    good = _write(tmp_path, "good", _evol_rows()[0] * 3, "json")
    # orca-best-shaped rows under a loader that does not fit them: every row skipped
    broken = _write(tmp_path, "orca", _orca_rows()[0], "parquet")
    store_url = f"file://{tmp_path}/store"
    cfg = {
        "name": "loud-failure", "store": store_url, "seed": 1,
        "pivot": {"name": "pivot", "path": "example/pivot-model", "tokenizer": "builtin:mistral-v1"},
        "sources": [{"name": "src", "path": "example/source-model", "tokenizer": "builtin:mistral-v1"}],
        "data": {"sources": [{"name": "good", "path": str(good), "format": "evol_codealpaca"},
                             {"name": "orca", "path": str(broken), "format": "sharegpt"}],
                 "heldout_fraction": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api}):  # the session's server: no start per test
        code = main(["run", str(path), "--until", "dataset"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("fusechat:")]
    assert lines == ["fusechat: run failed: data source orca: no usable row, all 7 rows skipped; "
                     "most common reason: missing_conversations (7 rows, the first: orca.parquet row 1)"], err
    address = RunPlan(load_config(path)).dataset
    store = ArtifactStore(store_url)
    assert store.manifest(address) is None and not store.is_complete(address)
    assert not (Path(store.root) / address / "train.parquet").exists()


def test_format_auto_names_the_loader_of_each_shape_and_only_auto_formats():
    """One row per shape ``format: auto`` knows, the loader named by hand; ties go to the
    earlier shape (an orca-best row also has ``instruction``). The names met are exactly
    ``AUTO_FORMATS``, which the dataset's address takes the versions of."""
    from fusechat_core.data.conversation import AUTO_FORMATS, MalformedRow, detect_format

    shapes = [
        ({"instruction": "sys", "cluster": {"samples": []}}, "orca_best"),
        ({"conversations": [], "messages": []}, "sharegpt"),
        ({"messages": []}, "openai"),
        ({"conversation": []}, "capybara"),
        ({"instruction": "q", "input": "", "output": "a", "prompt": "p", "response": "r"}, "alpaca"),
        ({"text": "<|im_start|>user\nhi<|im_end|>"}, "chatml"),
        ({"text": "plain", "question": "q", "answer": "a"}, "prompt_response"),
        ({"problem": "p", "solution": "s"}, "prompt_response"),
        ({"query": "q", "response": "r"}, "prompt_response"),
    ]
    assert [detect_format(row) for row, _ in shapes] == [name for _, name in shapes]
    assert {name for _, name in shapes} == set(AUTO_FORMATS)
    for unknown in ({"text": "plain"}, {"cluster": "not a dict"}, {"prompt": "only"}):
        with pytest.raises(MalformedRow, match="unknown_shape"):
            detect_format(unknown)


def test_held_out_conversations_over_the_cap_train_instead_of_being_lost(tmp_path):
    """heldout_max caps the held-out split across sources; every sampled conversation is in
    exactly one split, and each source's counts add up to what the splits hold."""
    def conv(tag: str, i: int) -> dict:
        return {"conversations": [{"from": "human", "value": f"{tag} question {i}?"},
                                  {"from": "gpt", "value": f"{tag} answer {i}."}]}

    a = _write(tmp_path, "a", [conv("a", i) for i in range(40)], "jsonl")
    b = _write(tmp_path, "b", [conv("b", i) for i in range(20)], "jsonl")
    sources = [DataSourceSpec(name="a", path=str(a), format="sharegpt"),
               DataSourceSpec(name="b", path=str(b), format="sharegpt")]
    cfg = DataConfig(sources=sources, heldout_fraction=0.5, heldout_max=7, max_length=4096)
    mix = build_mixture(cfg, 0, token_counter([]))
    firsts = lambda rows: [r["conversations"][0]["value"] for r in rows]  # noqa: E731
    held, trained = firsts(mix.heldout), firsts(mix.train)
    assert len(held) == 7  # 30 were drawn (half of each source), 7 kept
    assert sorted(held + trained) == sorted([f"a question {i}?" for i in range(40)]
                                            + [f"b question {i}?" for i in range(20)])
    per = mix.stats["sources"]
    assert per["a"]["heldout"] + per["b"]["heldout"] == 7 == mix.stats["heldout"]
    for name, n in (("a", 40), ("b", 20)):
        assert per[name]["heldout"] + per[name]["blocks"] == n
        assert per[name]["heldout"] == sum(h["source"] == name for h in mix.heldout)
    assert len({r["id"] for r in mix.train + mix.heldout}) == 60


_HUB_OFFLINE = r'''
import json, sys
from fusechat_core.config import DataSourceSpec
from fusechat_core.data.build import DataError, iter_rows
from fusechat_core.errors import is_transient
try:
    next(iter_rows(DataSourceSpec(name="orca", path="no-such-org/no-such-dataset", format="sharegpt"), 0))
except DataError as exc:
    print(json.dumps({"message": str(exc), "transient": is_transient(exc)}))
'''


def test_a_hub_source_that_cannot_be_loaded_fails_in_one_line_naming_it():
    """The Hub's own errors name a repository at best; the user needs the config's source.
    (Offline mode: the Hub's answer without a network, the way a cluster without one fails.)"""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _HUB_OFFLINE], capture_output=True, text=True, env=env,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["message"].startswith("data source orca: no-such-org/no-such-dataset: cannot be loaded from "
                                     "the Hugging Face Hub (ConnectionError: "), got
    assert "\n" not in got["message"]
    assert got["transient"] is True  # a network error keeps its retry


def test_a_local_source_edited_since_its_dataset_was_built_stops_the_run(tmp_path, monkeypatch, capsys):
    """A local source is known by its path in the dataset's address (its bytes would move every
    existing run's addresses and hash gigabytes into every plan): a chats.jsonl re-exported in
    place reused the old dataset, and every stage after it, as Cached. The dataset records its
    files' bytes; a run whose file changed since refuses to start, naming it, and `status` says
    the dataset is stale. Touching the file changes nothing; each file is hashed once while it
    stays the same (a stat after, in this process and from the node's cache)."""
    import time

    from fusechat_core.data import build, build_dataset_artifact, changed_local_sources
    from tests.tiny_config import tiny_run_config

    monkeypatch.setenv("FUSECHAT_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "chats.jsonl"
    rows = [{"conversations": _conv(f"question {i}", f"answer {i}")} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tiny_run_config(tmp_path, f"file://{tmp_path / 'store'}")
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {**raw["data"], "sources": [{"name": "mine", "path": str(data), "format": "sharegpt"}]}
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    plan, store = RunPlan(cfg), ArtifactStore(cfg.store)
    from fusechat_core import store as store_module

    reads = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file",
                        lambda p: (reads.append(p) if Path(p).name == "chats.jsonl" else None) or real(p))
    build_dataset_artifact(cfg, store, plan.dataset)
    assert store.manifest(plan.dataset).meta["local_files"]["mine"][0][:2] == ["chats.jsonl", data.stat().st_size]
    assert changed_local_sources(cfg, store, plan.dataset) == [] and len(reads) == 1  # remembered
    store_module._DIGESTS.clear()
    assert changed_local_sources(cfg, store, plan.dataset) == [] and len(reads) == 1  # from the node's cache
    time.sleep(0.01)
    os.utime(data)  # touched, the same bytes: hashed again, nothing changed
    assert changed_local_sources(cfg, store, plan.dataset) == [] and len(reads) == 2

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))  # re-exported with a row less
    assert RunPlan(load_config(path)).dataset == plan.dataset  # the address is the path's
    [line] = changed_local_sources(cfg, store, plan.dataset)
    assert line.startswith(f"data source mine: chats.jsonl changed since dataset {plan.dataset} was built from it")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"fusechat: config error: {line}"
    assert main(["status", str(path), "--json"]) == 0
    [row] = [r for r in json.loads(capsys.readouterr().out) if r["stage"] == "dataset"]
    assert (row["state"], row["reason"]) == ("stale", line)
    # Hub and demo sources carry no files to check
    assert build.local_source_files(DataSourceSpec(name="x", path="org/set")) is None
    assert build.local_source_files(DataSourceSpec(name="m", path="demo:markov")) is None
