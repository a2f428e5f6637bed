"""A user's clone has nothing beside it: no code, test or benchmark may name a path outside
the repository (a ``shared`` folder next to the checkout, a home directory, a path climbed
to from ``__file__`` past the repository root)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("tests", "benchmarks", "fusechat_core", "flows", "tasks")

# Each rule: (why, pattern). Built from pieces so this file does not match itself.
_DOTDOT = r"\.\." + r"[/\\]"
RULES: list[tuple[str, re.Pattern]] = [
    ("names the folder beside the repository", re.compile(_DOTDOT + r"shared\b|[\"']shared[\"']")),
    ("climbs out of the repository from __file__", re.compile(r"(?:REPO|ROOT|HERE)\.parent\b")),
    ("an absolute home or workspace path", re.compile(r"[\"'](?:/home/|/root/|/Users/|/work/|~/)")),
    ("a path that starts above the repository", re.compile(r"[\"']" + _DOTDOT + _DOTDOT)),
]
# A line may carry this marker when the path is data under test, never a file read.
ALLOW = "# outside-path: " + "refused"
_PARENTS = re.compile(r"__file__\)?(?:\.resolve\(\))?\.parents\[(\d+)\]")


def outside_paths(text: str, depth: int) -> list[str]:
    """``(line: why)`` for each line of a source file ``depth`` folders below the repository
    root that names a path outside the repository."""
    hits = []
    for no, line in enumerate(text.splitlines(), 1):
        if ALLOW in line:  # e.g. a test that the store refuses such a path
            continue
        for why, rule in RULES:
            if rule.search(line):
                hits.append(f"{no}: {why}")
        for m in _PARENTS.finditer(line):
            if int(m.group(1)) >= depth:  # parents[depth - 1] is the repository root
                hits.append(f"{no}: climbs out of the repository from __file__")
    return hits


def test_the_rules_catch_what_they_are_for():
    up = ".." + "/"
    bad = [f'MT = Path("{up}shared/mt_bench")', 'SHARED = Path(__file__).resolve().parents[2] / "' + 'shared"',
           "x = REPO" + ".parent / 'data'", 'p = "/ho' + 'me/alice/models"', f'open("{up}{up}secrets")']
    for line in bad:
        assert outside_paths(line, depth=2), line
    good = ['REPO = Path(__file__).resolve().parents[1]', 'p = tmp_path / "shared-cache"',
            'folder = Path(location).expanduser()',
            '"judge_prompts": ("judge_prompts.jsonl", "../judge_prompts.jsonl")']
    for line in good:
        assert not outside_paths(line, depth=2), line
    assert not outside_paths(f'store.write_bytes("{up}{up}x", b"")  ' + ALLOW, depth=2)


def test_no_file_names_a_path_outside_the_repository():
    found = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            depth = len(path.relative_to(REPO).parts) - 1
            for hit in outside_paths(path.read_text(encoding="utf-8"), depth + 1):
                found.append(f"{path.relative_to(REPO)}:{hit}")
    assert not found, "paths outside the repository:\n" + "\n".join(found)
