"""Hostile data files: each bad row is skipped and counted under its own reason, and a file
that cannot be read at all fails in one line naming the source and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusechat_core.config import DataConfig, DataSourceSpec
from fusechat_core.data.build import DataError, build_mixture, token_counter

GOOD = [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
        for i in range(20)]


def _build(path: Path, name: str = "hostile"):
    spec = DataSourceSpec(name=name, path=str(path), format="sharegpt")
    cfg = DataConfig(sources=[spec], max_length=256, heldout_fraction=0.0)
    return build_mixture(cfg, seed=1, count=token_counter([]))


def _texts(mix) -> set[str]:
    return {t["value"] for r in mix.train + mix.heldout for t in r["conversations"]}


def test_deep_nesting_and_bad_utf8_lines_are_skipped_under_their_own_reasons(tmp_path):
    deep = b'{"conversations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    latin1 = json.dumps({"conversations": [{"from": "human", "value": "Caf\u00e9?"},
                                           {"from": "gpt", "value": "Oui."}]}, ensure_ascii=False).encode("latin-1")
    lone = b'{"conversations": [{"from": "human", "value": "broken \\ud800 half"}, {"from": "gpt", "value": "x"}]}'
    # a valid escaped pair (an emoji) and a literal U+2028 inside a string are text: kept
    pair = json.dumps({"conversations": [{"from": "human", "value": "smile \U0001F600?"},
                                         {"from": "gpt", "value": "line\u2028separator"}]}).encode()
    assert b"\\ud83d\\ude00" in pair
    raw_sep = json.dumps({"conversations": [{"from": "human", "value": "para\u2029graph?"},
                                            {"from": "gpt", "value": "Yes."}]}, ensure_ascii=False).encode()
    assert "\u2029".encode() in raw_sep
    lines = [json.dumps(r).encode() for r in GOOD] + [deep, latin1, b"\xff\xfe{}", lone, pair, raw_sep]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    mix = _build(path)
    st = mix.stats["sources"]["hostile"]
    assert st["skipped"] == {"too_deep": 1, "invalid_utf8": 3}
    assert st["rows_read"] == len(lines) and st["kept"] == len(GOOD) + 2
    texts = _texts(mix)
    assert "smile \U0001F600?" in texts and "line\u2028separator" in texts and "para\u2029graph?" in texts
    assert not any("\ufffd" in t for t in texts)  # nothing was kept as a replacement character
    assert not any("Caf" in t for t in texts)


def test_json_lines_read_line_by_line_keep_their_numbers_bom_and_crlf(tmp_path):
    """Read a line at a time (a multi-GB dump is never held whole): a byte-order mark on the
    first line, Windows line ends, blank lines and a .json file of JSON lines behind a long
    run of blank space read as before, and a bad row still names its line."""
    lines = [json.dumps(r).encode() for r in GOOD[:5]]
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines[:3] + [b"", b"{broken"] + lines[3:]) + b"\r\n")
    mix = _build(path, "windows")
    st = mix.stats["sources"]["windows"]
    assert st["kept"] == 5 and st["skipped"] == {"invalid_json": 1}
    assert st["first_skipped"] == {"invalid_json": "windows.jsonl line 5"}
    spaced = tmp_path / "spaced.json"
    spaced.write_bytes(b"\n" * 70_000 + b"\n".join(lines))
    assert _build(spaced, "spaced").stats["sources"]["spaced"]["kept"] == 5
    assert _texts(_build(spaced, "spaced")) == {t["value"] for r in GOOD[:5] for t in r["conversations"]}


def test_a_whole_json_file_with_bad_bytes_or_deep_nesting_fails_naming_the_file(tmp_path):
    rows = json.dumps(GOOD, ensure_ascii=False).encode()
    bad = tmp_path / "latin.json"
    bad.write_bytes(rows[:40] + b"\xe9" + rows[40:])
    with pytest.raises(DataError) as err:
        _build(bad, "latin")
    assert str(err.value) == f"data source latin: {bad}: not valid UTF-8 (line 1, byte 40)"

    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" + rows[1:-1] + b", " + b"[" * 100_000 + b"]" * 100_000 + b"]")
    with pytest.raises(DataError) as err:
        _build(deep, "deep")
    assert str(err.value) == f"data source deep: {deep}: JSON nested too deeply to read"

    # a lone surrogate inside an otherwise good whole-JSON file is one skipped row
    lone = tmp_path / "lone.json"
    lone.write_bytes(rows[:-1] + b', {"conversations": [{"from": "human", "value": "\\udfff"}, '
                     b'{"from": "gpt", "value": "x"}]}]')
    mix = _build(lone, "lone")
    assert mix.stats["sources"]["lone"]["skipped"] == {"invalid_utf8": 1}
    # a byte-order mark is not an error
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + rows)
    assert _build(bom, "bom").stats["sources"]["bom"]["kept"] == len(GOOD)


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not a parquet file at all", "truncated"])
def test_an_empty_or_corrupt_parquet_file_fails_naming_source_and_file(tmp_path, content):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD * 50), path)
    if content == "truncated":
        data = path.read_bytes()
        content = data[: len(data) // 2] + data[-8:]  # the footer survives, the pages do not
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        _build(path, "pq")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"data source pq: {path}: not a readable Parquet file ("), msg


def test_a_good_parquet_file_still_reads(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    assert _build(path).stats["sources"]["hostile"]["kept"] == len(GOOD)


def _conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


def test_a_leading_greeting_and_a_reply_that_never_came_are_repaired_and_counted(tmp_path):
    """Scraped chats (ShareGPT) often open with the assistant's greeting or end on an empty
    reply: the rest of the conversation is good data. Kept without them (FastChat's training
    code skips a leading assistant turn too), and counted; an empty turn mid-conversation
    still makes the row malformed (what would the next answer be answering?)."""
    rows = GOOD + [
        _conv(("gpt", "Hello! How can I help?"), ("human", "Greeted Q?"), ("gpt", "Greeted A.")),
        _conv(("human", "Unfinished Q1?"), ("gpt", "Unfinished A1."), ("human", "Unfinished Q2?"), ("gpt", " ")),
        _conv(("gpt", "Hi!"), ("human", "Only a question?")),  # nothing answered once repaired
        _conv(("human", "Gap Q1?"), ("gpt", ""), ("human", "Gap Q2?"), ("gpt", "Gap A2.")),
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mix = _build(path)
    convs = {r["conversations"][0]["value"]: [(t["from"], t["value"]) for t in r["conversations"]]
             for r in mix.train}
    assert convs["Greeted Q?"] == [("human", "Greeted Q?"), ("gpt", "Greeted A.")]
    assert convs["Unfinished Q1?"] == [("human", "Unfinished Q1?"), ("gpt", "Unfinished A1.")]
    assert not any(q.startswith(("Only", "Gap")) for q in convs)
    st = mix.stats["sources"]["hostile"]
    assert st["repaired"] == {"leading_assistant_turn": 1, "trailing_empty_turn": 1}  # kept rows only
    assert st["skipped"] == {"no_assistant_turn": 1, "empty_turn": 1}
    assert st["first_skipped"] == {"no_assistant_turn": "chats.jsonl line 23", "empty_turn": "chats.jsonl line 24"}
