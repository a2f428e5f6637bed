"""``fusechat``: run, inspect and demo a fusion run.

Exit codes: 0 done, 1 the run failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fusechat_core.config import ConfigError, RunConfig, load_config
from fusechat_core.plan import RunPlan
from fusechat_core.store import ArtifactStore, StoreError

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"fusechat: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusechat", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the pipeline for a config (finished stages are skipped)")
    run.add_argument("config")
    run.add_argument("--store", help="artifact root URL (overrides the config's store)")
    run.add_argument("--until", help="stop after this stage")
    run.add_argument("--plan", action="store_true", help="print every stage's address and state; run nothing")
    run.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    st = sub.add_parser("status", help="every stage: done / partial / missing, address, size")
    st.add_argument("config")
    st.add_argument("--store")
    st.add_argument("--json", action="store_true")
    st.add_argument("--verify", action="store_true", help="re-hash every file against its manifest")

    demo = sub.add_parser("demo", help="run the built-in demo (tiny local models, local store)")
    demo.add_argument("--store", help="artifact root URL (default: ./fusechat-artifacts)")
    demo.add_argument("--until")
    demo.add_argument("--json", action="store_true")
    return p


def _prefect_env() -> None:
    # A cold ephemeral API takes over 20 s to start on a small machine (SPEC §5).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Telemetry races the first write to a cold SQLite database and prints a lock error.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _stage_names() -> tuple[str, ...]:
    from flows.pipeline import STAGES

    return STAGES


def status_rows(cfg: RunConfig, verify: bool = False) -> list[dict[str, Any]]:
    store = ArtifactStore(cfg.store)
    rows = []
    for node in RunPlan(cfg).nodes():
        man = store.manifest(node.address)
        if man is not None and store.is_complete(node.address, verify=verify):
            state, size = "done", man.size
        elif man is not None or store.fs.exists(store._path(node.address)):
            state, size = "partial", None
        else:
            state, size = "missing", None
        rows.append({"stage": node.label, "state": state, "address": node.address, "size": size})
    return rows


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    w = max(len(r["stage"]) for r in rows)
    for r in rows:
        print(f"{r['stage']:<{w}}  {r['state']:<8}  {r['address']}  {_human(r['size'])}")


def _run(cfg: RunConfig, until: str | None, as_json: bool) -> int:
    stages = _stage_names()
    if until is not None and until not in stages:
        print(f"fusechat: error: --until: unknown stage {until!r} (stages: {', '.join(stages)})", file=sys.stderr)
        return EXIT_USAGE
    _prefect_env()
    from flows.pipeline import fusechat_pipeline

    t0 = time.time()
    try:
        results = fusechat_pipeline(config=cfg.model_dump(mode="json"), until=until or stages[-1])
    except Exception as exc:  # the flow's own log has the traceback; the user gets one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fusechat: run failed: {msg}", file=sys.stderr)
        return EXIT_FAILED
    for stage, ref in results.items():
        print(f"{stage:<10} {ref['state']:<10} {ref['address']}  {_human(ref.get('size'))}")
    print(f"done in {time.time() - t0:.1f} s; artifacts in {cfg.store}")
    if as_json:
        print(json.dumps({"store": cfg.store, "stages": results}))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            cfg = load_config(DEMO_CONFIG, store=args.store)
        else:
            cfg = load_config(args.config, store=args.store)
    except ConfigError as exc:
        print(f"fusechat: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "status":
            rows = status_rows(cfg, verify=args.verify)
            print(json.dumps(rows) if args.json else "", end="\n" if args.json else "")
            if not args.json:
                _print_rows(rows)
            return EXIT_OK
        if args.command == "run" and args.plan:
            _print_rows(status_rows(cfg))
            return EXIT_OK
        return _run(cfg, args.until, args.json)
    except StoreError as exc:
        print(f"fusechat: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
