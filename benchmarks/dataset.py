"""What reading a local data source costs: the reader's peak memory against the file's size,
and the dataset stage's rows per second.

A ShareGPT dump is gigabytes of JSON lines; the reader holds one line at a time (it held the
whole file and its split lines, twice the file). The file is generated here: ``--rows``
conversations of about ``--row-bytes`` each, one line in 50 malformed.

    python benchmarks/dataset.py [--rows 200000] [--row-bytes 1500]

Prints ``file_bytes``, ``reader_peak_bytes`` and ``reader_peak_vs_file`` (the reader alone,
by tracemalloc), ``build_rows_per_s`` (``build_mixture``: read, normalise, clean, dedupe,
sample, split into blocks; word-count tokens) and ``build_peak_bytes_per_row``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusechat_core.config import DataConfig, DataSourceSpec  # noqa: E402
from fusechat_core.data.build import _iter_file, build_mixture  # noqa: E402


def write_source(path: Path, rows: int, row_bytes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["fusion", "pivot", "source", "token", "model", "answer", "question", "merge", "data", "chat"]
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            if i % 50 == 49:
                fh.write('{"conversations": [broken\n')
                continue
            n = max(1, row_bytes // 14)
            text = " ".join(rng.choice(words) for _ in range(n))
            row = {"id": str(i), "conversations": [{"from": "human", "value": f"Q{i}: {text[: len(text) // 3]}?"},
                                                   {"from": "gpt", "value": text}]}
            fh.write(json.dumps(row) + "\n")


def word_count(text: str) -> int:
    return len(text.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--row-bytes", type=int, default=1500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sharegpt.jsonl"
        write_source(path, args.rows, args.row_bytes)
        size = path.stat().st_size
        print(f"file_bytes: {size}")

        tracemalloc.start()
        n = sum(1 for _ in _iter_file(path))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == args.rows, (n, args.rows)
        print(f"reader_peak_bytes: {peak}")
        print(f"reader_peak_vs_file: {peak / size:.4f}")

        spec = DataSourceSpec(name="dump", path=str(path), format="sharegpt", max_skipped_fraction=0.05)
        cfg = DataConfig(sources=[spec], max_length=4096, heldout_fraction=0.01)
        tracemalloc.start()
        t0 = time.perf_counter()
        mix = build_mixture(cfg, seed=1, count=word_count)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        st = mix.stats["sources"]["dump"]
        print(f"rows_read: {st['rows_read']}")
        print(f"skipped: {sum(st['skipped'].values())}")
        print(f"build_seconds: {seconds:.3f}")
        print(f"build_rows_per_s: {args.rows / seconds:.1f}")
        print(f"build_peak_bytes_per_row: {peak / args.rows:.1f}")


if __name__ == "__main__":
    main()
