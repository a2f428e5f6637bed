"""How close is a no-op rerun of a finished pipeline to Prefect's own floor?

Runs the demo (or any config) once to completion if its store is not complete
yet (not timed), then times, in fresh processes on the same machine:

  1. ``fusechat run CONFIG`` again: every task is a cache hit (the rerun);
  2. an empty Prefect flow that submits the same number of trivial tasks.

Both pay the same ephemeral-API start-up, so the ratio shows what our cache
checks (store manifests, cache records) add on top of Prefect itself.

    python benchmarks/rerun.py [--config configs/demo.yaml] [--store DIR] [--repeat 3] [--profile FILE]

Ends with ``noop_rerun_seconds: S`` and ``noop_vs_empty_flow: R``. ``--profile`` also
writes a cProfile of one more rerun, every thread (the task runs) merged into it:
``python -m pstats FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EMPTY_FLOW = """
import sys
from prefect import flow, task
from prefect.futures import wait

@task(persist_result=False)
def noop(i: int) -> int:
    return i

@flow(name="empty-flow")
def empty(n: int) -> None:
    wait([noop.submit(i) for i in range(n)])

empty(int(sys.argv[1]))
"""

PROFILED_RERUN = """
import cProfile, pstats, sys, threading

profiles = [cProfile.Profile()]
_run = threading.Thread.run


def run(self):
    profiles.append(cProfile.Profile())
    profiles[-1].runcall(_run, self)


threading.Thread.run = run
from flows.cli import main

code = profiles[0].runcall(main, sys.argv[2:])
stats = pstats.Stats(profiles[0])
for p in profiles[1:]:
    stats.add(p)
stats.dump_stats(sys.argv[1])
sys.exit(code)
"""


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--store", help="a store where this config already ran (default: a new temporary one)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", help="write a cProfile of one more rerun (all threads) to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fusechat-bench-rerun-"))
    store = args.store or f"file://{work / 'store'}"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "FUSECHAT_CACHE": os.environ.get("FUSECHAT_CACHE", str(work / "cache"))}
    fusechat = [sys.executable, "-m", "flows.cli"]

    t, out = _timed(fusechat + ["run", args.config, "--store", store, "--json"], env)
    stages = json.loads(out.strip().splitlines()[-1])["stages"]
    fresh = [k for k, v in stages.items() if v["state"] != "Cached"]
    print(f"first run: {t:.1f} s ({len(fresh)} of {len(stages)} stage results computed)")

    # Count every task run of a rerun, shard tasks included, from the plan.
    from fusechat_core.config import load_config
    from fusechat_core.plan import RunPlan

    cfg = load_config(args.config, store=store)
    nodes = RunPlan(cfg).nodes()
    n_tasks = sum(1 + n.shards for n in nodes if n.stage not in ("mt_bench_answers",))
    print(f"tasks per run: {n_tasks}")

    reruns, empties = [], []
    script = work / "empty_flow.py"
    script.write_text(EMPTY_FLOW)
    for i in range(args.repeat):
        t_rerun, out = _timed(fusechat + ["run", args.config, "--store", store, "--json"], env)
        states = {v["state"] for v in json.loads(out.strip().splitlines()[-1])["stages"].values()}
        if states != {"Cached"}:
            sys.exit(f"rerun {i} was not a no-op: states {states}")
        t_empty, _ = _timed([sys.executable, str(script), str(n_tasks)], env)
        reruns.append(t_rerun)
        empties.append(t_empty)
        print(f"repeat {i + 1}: no-op rerun {t_rerun:.2f} s, empty flow with {n_tasks} tasks {t_empty:.2f} s")
    if args.profile:
        profile = str(Path(args.profile).resolve())
        _timed([sys.executable, "-c", PROFILED_RERUN, profile, "run", args.config, "--store", store], env)
        print(f"profile of a rerun (all threads): {profile}")
    rerun, empty = statistics.median(reruns), statistics.median(empties)
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    print(f"noop_rerun_seconds: {rerun:.2f}")
    print(f"noop_vs_empty_flow: {rerun / empty:.2f}")


if __name__ == "__main__":
    main()
