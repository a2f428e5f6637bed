"""``fusechat``: run, inspect and demo a fusion run.

Exit codes: 0 done, 1 the run failed, 2 usage or config error (found before any stage
runs), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusechat_core.config import ConfigError, RunConfig, load_config
from fusechat_core.cost import DEFAULT_UTILISATION, H100_BF16_DENSE_TFLOPS
from fusechat_core.plan import RunPlan
from fusechat_core.preflight import preflight
from fusechat_core.stages import complete_checkpoints, shard_address
from fusechat_core.store import ArtifactStore, StoreError, human_size

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it says it itself (a flag's is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings \
                or action.required or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"fusechat: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusechat", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    stages = ", ".join(_stage_names())
    run = sub.add_parser("run", help="run the pipeline for a config (finished stages are skipped)")
    run.add_argument("config", help="the run's YAML file (a path or a URL in the store)")
    run.add_argument("--store", help="artifact root URL (default: the config's store)")
    run.add_argument("--until", metavar="STAGE", help=f"stop after this stage, one of: {stages} "
                                                      "(default: the last)")
    run.add_argument("--plan", action="store_true",
                     help="run nothing; print every stage instance's state (cached / to run / partial), the work "
                          "it implies (sequences, tokens, supervised tokens, bytes to store, FLOPs, GPU-hours; "
                          "offline: N from config.json in the local HF cache) and totals")
    run.add_argument("--against", metavar="OLD.yaml",
                     help="with --plan: list the stage instances this config invalidates against OLD.yaml, and "
                          "which input of each address changed")
    run.add_argument("--gpu-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, metavar="T",
                     help="with --plan: one GPU's peak TFLOPS (default: 989, an H100 SXM's dense bf16)")
    run.add_argument("--gpu-utilisation", type=float, default=DEFAULT_UTILISATION, metavar="U",
                     help="with --plan: the share of --gpu-tflops sustained (model FLOPs utilisation) "
                          "(default: 0.4)")
    run.add_argument("--json", action="store_true",
                     help="print a JSON summary as the last line (with --plan: only one JSON object)")

    st = sub.add_parser("status", help="every stage: done / damaged / partial / missing, address, size "
                                       "(exit 1 when anything is damaged)")
    st.add_argument("config", help="the run's YAML file")
    st.add_argument("--store", help="artifact root URL (default: the config's store)")
    st.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    st.add_argument("--verify", action="store_true", help="re-hash every file against its manifest")

    ev = sub.add_parser("eval", help="evaluate one model (folder, hub id or store artifact) outside a run")
    ev.add_argument("model", metavar="MODEL_OR_ADDRESS", help="a model folder, a hub id or a store address")
    ev.add_argument("--store", help="artifact root URL (default: ./fusechat-artifacts)")
    ev.add_argument("--name", help="the model's name in the report (default: the last path part)")
    ev.add_argument("--heldout", metavar="DATASET_ADDRESS", help="held-out NLL / exact match on this dataset artifact")
    ev.add_argument("--mt-bench", nargs="?", const="fastchat", metavar="LOCATION",
                    help="answer and judge MT-Bench; LOCATION: folder or URL of the data files (default: FastChat's)")
    from fusechat_core.config import EvaluateConfig

    d = EvaluateConfig()
    ev.add_argument("--judge-model", help=f"the judge's model name (default: {d.judge_model})")
    ev.add_argument("--judge-base-url", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
                                             f"(default: {d.judge_base_url})")
    ev.add_argument("--judge-api-key-env", help="name of the environment variable holding the judge's API key "
                                                f"(default: {d.judge_api_key_env})")
    ev.add_argument("--judge-concurrency", type=int, help=f"judge requests at once (default: {d.judge_concurrency})")
    ev.add_argument("--judge-timeout-s", type=float, metavar="S",
                    help=f"seconds one judge request may take in all (default: {d.judge_timeout_s:g})")
    ev.add_argument("--judge-max-retries", type=int, metavar="N",
                    help=f"retries of a failed judge request (default: {d.judge_max_retries})")
    ev.add_argument("--judge-max-retry-after-s", type=float, metavar="S",
                    help="honour a judge's Retry-After up to this many seconds "
                         f"(default: {d.judge_max_retry_after_s:g})")
    ev.add_argument("--judge-deadline-s", type=float, metavar="S",
                    help="judge requests still unanswered this long after grading began fail "
                         f"(default: {d.judge_deadline_s:g})")
    ev.add_argument("--max-new-tokens", type=int, help=f"tokens per MT-Bench answer (default: {d.max_new_tokens})")
    ev.add_argument("--tokenizer", help="tokenizer reference when the model folder has none "
                                        "(default: the model's own)")
    ev.add_argument("--chat-template", help="a registered chat template (default: the tokenizer's own)")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"where the model runs (default: {d.device})")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help=f"the precision the model is evaluated in (default: {d.dtype})")
    ev.add_argument("--json", action="store_true", help="print the results as JSON as the last line")

    mg = sub.add_parser("merge", help="merge targets (folders or hub ids) onto their pivot outside a run")
    from fusechat_core.merge.command import add_arguments as _merge_arguments

    _merge_arguments(mg)

    setup = sub.add_parser("setup", help="prepare a Prefect server: GPU concurrency limit, crash detection, work pool")
    setup.add_argument("--gpu-tag", default="gpu", help="the tag GPU tasks carry (runner.gpu_tag)")
    setup.add_argument("--gpu-limit", type=int, default=None,
                       help="GPUs in the pool: at most this many GPU tasks at once (default: keep the server's, "
                            "or 1 where it has none)")
    setup.add_argument("--heartbeat-timeout", type=int, default=None,
                       help="seconds without a heartbeat before a flow run is marked Crashed (default: keep the "
                            "server's, or 90)")
    setup.add_argument("--work-pool", default="fusechat-local", help="process work pool to create ('' for none)")
    setup.add_argument("--gpu-work-pool", default="fusechat-gpu",
                       help="Kubernetes GPU work pool to create, with deployments/kubernetes-gpu.json as its base "
                            "job template ('' for none)")

    demo = sub.add_parser("demo", help="run the built-in demo (tiny local models, local store)")
    demo.add_argument("--store", help="artifact root URL (default: ./fusechat-artifacts)")
    demo.add_argument("--until", metavar="STAGE", help=f"stop after this stage, one of: {stages} "
                                                       "(default: the last)")
    demo.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    demo.add_argument("--quick", action="store_true",
                      help="a quarter of the demo's rows and pre-training steps: checks an installation end to "
                           "end in about a quarter of the time (the README's figures are the full demo's)")
    return p


def _prefect_env() -> None:
    # A cold ephemeral API takes over 20 s to start on a small machine (SPEC §5).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Flow runs tell the server they are alive; `fusechat setup` crashes the silent ones.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    # Telemetry races the first write to a cold SQLite database and prints a lock error.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from tasks._stage import quiet_progress_bars

    quiet_progress_bars()


def _stage_names() -> tuple[str, ...]:
    from fusechat_core.stages import PIPELINE_STAGES  # not flows.pipeline: no Prefect import to parse

    return PIPELINE_STAGES


def status_rows(cfg: RunConfig, verify: bool = False, *, elsewhere: bool = False) -> list[dict[str, Any]]:
    """Every artifact of the run, with its shards: ``done``, ``damaged`` (committed, but a
    file is missing, short or fails its hash, or its manifest is malformed; ``reason`` says
    which), ``k/N`` shards done, ``partial`` (started, not committed; a training with a
    checkpoint), ``skipped`` (held-out measures of an evaluation done without them), ``stale``
    (a dataset whose local files changed since: a run refuses to start) or ``missing``, and
    its true size (its files and its shards'). ``verify``: re-hash every file.

    ``train.mixed_precision: auto`` resolves where the run runs (bf16 on a GPU, no on a CPU),
    and the targets' addresses with it: read on a laptop, a run made on GPUs would show every
    target and what follows missing. ``elsewhere`` (``fusechat status``): an artifact missing
    here but done under the other resolution is shown done, at that address, saying so. Not
    for ``--plan``: a run started here would make it again."""
    store = ArtifactStore(cfg.store)
    plan = RunPlan(cfg)
    rows = [_status_row(store, plan, node, verify) for node in plan.nodes()]
    from fusechat_core.data import changed_local_sources

    dataset = next(r for r in rows if r["stage"] == "dataset")
    if dataset["state"] == "done" and (changed := changed_local_sources(cfg, store, plan.dataset)):
        dataset.update(state="stale", reason=changed[0])
    if elsewhere and cfg.train.mixed_precision == "auto":
        from fusechat_core.models import resolve_mixed_precision

        other = "no" if resolve_mixed_precision("auto") == "bf16" else "bf16"
        alt = RunPlan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"mixed_precision": other})}))
        there = {n.label: n for n in alt.nodes()}
        for i, row in enumerate(rows):
            node = there.get(row["stage"])
            if row["state"] == "missing" and node is not None and node.address != row["address"]:
                found = _status_row(store, alt, node, verify)
                if found["state"] == "done":
                    rows[i] = {**found, "reason": f"made where train.mixed_precision auto was {other}"}
    return rows


def _status_row(store: ArtifactStore, plan: RunPlan, node: Any, verify: bool) -> dict[str, Any]:
    parts = [node.address] + [shard_address(node.address, i, node.shards) for i in range(node.shards)]
    checks = {a: store.check(a, verify=verify) for a in parts}
    own, done = checks[node.address], sum(checks[a].ok for a in parts[1:])
    damaged = [a for a in parts if checks[a].state == "damaged"]
    if damaged:
        state, reason = "damaged", f"{damaged[0]}: {checks[damaged[0]].reason}"
    elif own.ok and done == node.shards:
        state, reason = "done", ""
    elif done:
        state, reason = f"{done}/{node.shards}", ""
    elif own.ok or store.fs.exists(store._path(node.address)):
        state, reason = "partial", ""
    elif node.stage == "heldout_measures" and store.is_complete(plan.evaluate(node.key)):
        # an evaluation made before the measures had an address of their own: never needed
        state, reason = "skipped", f"evaluate[{node.key}] is done without it"
    else:
        state, reason = "missing", ""
    sizes = [c.manifest.size for c in checks.values() if c.manifest is not None]
    kept = complete_checkpoints(store, node.address) if node.stage == "train" and state != "done" else []
    if kept:  # a preempted training resumes from its last checkpoint (its weights: GBs at 7B)
        state, reason = "partial", f"checkpoint at step {kept[-1][0]}"
        sizes += [m.size for _, a in kept if (m := store.manifest(a)) is not None]
    row = {"stage": node.label, "state": state, "address": node.address, "size": sum(sizes) if sizes else None}
    if kept:
        row["checkpoint_step"] = kept[-1][0]
    if reason:
        row["reason"] = reason
    return row


def _print_rows(rows: list[dict[str, Any]]) -> None:
    w = max(len(r["stage"]) for r in rows)
    for r in rows:
        why = f"  ({r['reason']})" if r.get("reason") else ""
        print(f"{r['stage']:<{w}}  {r['state']:<8}  {r['address']}  {human_size(r['size'])}{why}")


def _print_inputs(plan: RunPlan) -> None:
    """Under the plan's table: the dataset's pinned sources and each merge's parameters."""
    for node in plan.nodes():
        lines = plan.inputs(node)
        if lines:
            print(f"\n{node.label} inputs:")
            for line in lines:
                print(f"  {line}")


def _plan(cfg: RunConfig, args: argparse.Namespace) -> int:
    """``run --plan``: the cost view (``fusechat_core.cost``), or with ``--against`` the diff."""
    plan = RunPlan(cfg)
    if args.against:
        try:
            old = load_config(args.against, store=args.store)
        except ConfigError as exc:
            print(f"fusechat: config error: --against: {exc}", file=sys.stderr)
            return EXIT_USAGE
        changes = plan.diff(RunPlan(old))
        if args.json:
            print(json.dumps({"config": args.config, "against": args.against, "stages": changes}))
        else:
            _print_diff(changes)
        return EXIT_OK
    if not (args.gpu_tflops > 0 and 0 < args.gpu_utilisation <= 1):
        print("fusechat: error: --gpu-tflops must be > 0 and --gpu-utilisation in (0, 1]", file=sys.stderr)
        return EXIT_USAGE
    from fusechat_core.cost import cost_table, plan_costs

    store = ArtifactStore(cfg.store)
    try:
        rows = status_rows(cfg)
    except StoreError as exc:  # a plan is still worth printing without the store
        print(f"fusechat: states unknown: {exc}", file=sys.stderr)
        rows = [{"stage": n.label, "state": "unknown", "address": n.address, "size": None} for n in plan.nodes()]
    costs = plan_costs(plan, store, {r["stage"]: r for r in rows}, gpu_tflops=args.gpu_tflops,
                       utilisation=args.gpu_utilisation)
    if args.json:
        print(json.dumps(costs))
        return EXIT_OK
    for line in cost_table(costs):
        print(line)
    _print_inputs(plan)
    return EXIT_OK


def _print_diff(changes: list[dict[str, Any]]) -> None:
    """What ``--plan --against`` prints: each invalidated instance and why, then the unchanged."""
    moved = [c for c in changes if c["change"] != "unchanged"]
    w = max((len(c["stage"]) for c in moved), default=0)
    for c in moved:
        # upstream artifacts that changed, on one line; the stage's own inputs one a line
        ups = [x[: -len(" changed")] for x in c["why"] if x.endswith(" changed") and ":" not in x]
        why = [x for x in c["why"] if not (x.endswith(" changed") and ":" not in x)]
        why += [f"upstream changed: {', '.join(ups)}"] if ups else []
        print(f"{c['change']:<8}  {c['stage']:<{w}}  {why[0] if why else ''}")
        for more in why[1:]:
            print(f"{'':<8}  {'':<{w}}  {more}")
    same = [c["stage"] for c in changes if c["change"] == "unchanged"]
    print(f"unchanged ({len(same)}): {', '.join(same) if same else '-'}")
    runs = sum(c["change"] in ("changed", "new") for c in changes)
    print(f"{runs} of {runs + len(same)} stage instances to compute; {len(same)} kept (Cached)")


def _on_sigterm(signum: int, frame: Any) -> None:
    """A node being drained sends SIGTERM (a user at the terminal, Ctrl-C: SIGINT): stop now,
    children included, and keep what is done; one line, exit 128 + the signal's number.

    Tasks run in worker threads, which a signal never reaches (SPEC §5), so the
    process stops here: every finished stage, shard and checkpoint is already in
    the store, and the next run resumes from them.
    """
    import psutil

    what = "interrupted (SIGINT)" if signum == signal.SIGINT else "terminated (SIGTERM)"
    print(f"fusechat: {what}; finished stages, shards and checkpoints are kept: "
          "run again to resume", file=sys.stderr, flush=True)
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(128 + signum)


def _ours(exc: BaseException) -> bool:
    """An error this project raises on purpose, its message one line naming the field, file or
    row (a config, data, model or store error), as opposed to a library's or a bug's."""
    return type(exc).__module__.split(".")[0] == "fusechat_core"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if _ours(exc) and first else f"{type(exc).__name__}: {first}".rstrip(": ")


class _ExpectedErrorFilter:
    """On the console, a task or flow failing with one of our own errors (``_ours``) is said
    once, in the CLI's one line: Prefect's records of it (with tracebacks) go only to the
    run's log in the API. Anything else (a bug) keeps its traceback on the console."""

    def filter(self, record: Any) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not _ours(exc)
        # "Finished in state Failed('Task run encountered an exception DataError: ...')"
        return not (record.levelname == "ERROR" and record.name.startswith(("prefect.task_runs", "prefect.flow_runs"))
                    and "Finished in state Failed" in record.getMessage())


def _quiet_expected_errors() -> None:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # "": the root, where Prefect puts it
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, _ExpectedErrorFilter) for f in handler.filters):
                handler.addFilter(_ExpectedErrorFilter())


def _run(cfg: RunConfig, until: str | None, as_json: bool) -> int:
    stages = _stage_names()
    if until is not None and until not in stages:
        print(f"fusechat: error: --until: unknown stage {until!r} (stages: {', '.join(stages)})", file=sys.stderr)
        return EXIT_USAGE
    from flows.ephemeral import guard_ephemeral_server
    from flows.pipeline import fusechat_pipeline, run_can_start, task_runner_for

    try:  # the flow checks it too (a deployed run); here it is a config error, before any server starts
        run_can_start(cfg, RunPlan(cfg), until or stages[-1])
    except ConfigError as exc:
        print(f"fusechat: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    guard_ephemeral_server()
    signal.signal(signal.SIGTERM, _on_sigterm)
    on_sigint = signal.signal(signal.SIGINT, _on_sigterm)
    _quiet_expected_errors()

    t0 = time.time()
    try:
        pipeline = fusechat_pipeline.with_options(task_runner=task_runner_for(cfg))
        results = pipeline(config=cfg.model_dump(mode="json"), until=until or stages[-1])
    except Exception as exc:  # the flow's own log has the traceback; the user gets one line
        print(f"fusechat: run failed: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, on_sigint)
    width = max((len(k) for k in results), default=10)
    for stage, ref in results.items():
        print(f"{stage:<{width}}  {ref['state']:<10} {ref['address']}  {human_size(ref.get('size'))}")
    print(f"done in {time.time() - t0:.1f} s; artifacts in {cfg.store}")
    if "report" in results:  # the run's answer, where a user looks first
        from fusechat_core.evaluate.report import fusion_summary, mt_bench_summary

        store, address = ArtifactStore(cfg.store), results["report"]["address"]
        print(f"report: {store.uri(address, 'report.md')}")
        try:
            report = store.read_json(address, "report.json")
        except StoreError as exc:  # the run succeeded; only its summary here is missing
            print(f"fusechat: warning: the report's summary could not be read: {exc}", file=sys.stderr)
            report = {}
        for line in fusion_summary(report.get("fusion")) + mt_bench_summary(report.get("mt_bench")):
            print(line)
    if as_json:
        out: dict = {"store": cfg.store}
        if "report" in results:
            out["report"] = store.uri(address, "report.json")
        print(json.dumps({**out, "stages": results}))
    return EXIT_OK


def _eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from fusechat_core.config import DEFAULT_STORE, EvaluateConfig
    from fusechat_core.evaluate import EvaluationError, JudgeError, MTBenchDataError, evaluate_standalone
    from fusechat_core.models import ModelLoadError

    fields = {"mt_bench": args.mt_bench is not None, "heldout_nll": args.heldout is not None,
              "judge_model": args.judge_model, "judge_base_url": args.judge_base_url,
              "judge_api_key_env": args.judge_api_key_env, "judge_concurrency": args.judge_concurrency,
              "judge_timeout_s": args.judge_timeout_s, "judge_max_retries": args.judge_max_retries,
              "judge_max_retry_after_s": args.judge_max_retry_after_s, "judge_deadline_s": args.judge_deadline_s,
              "max_new_tokens": args.max_new_tokens, "device": args.device, "dtype": args.dtype}
    if args.mt_bench not in (None, "fastchat"):
        fields["mt_bench_data"] = args.mt_bench
    if args.heldout is None:
        fields["exact_match_sources"] = []
    try:
        cfg = EvaluateConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        print(f"fusechat: error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return EXIT_USAGE
    from fusechat_core.preflight import http_url_problem

    if cfg.mt_bench and (problem := http_url_problem(cfg.judge_base_url)):
        print(f"fusechat: error: --judge-base-url: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not cfg.mt_bench and args.heldout is None:
        print("fusechat: error: nothing to measure: give --mt-bench and/or --heldout", file=sys.stderr)
        return EXIT_USAGE
    store = ArtifactStore(args.store or DEFAULT_STORE)
    try:
        out = evaluate_standalone(store, args.model, cfg, name=args.name, dataset=args.heldout,
                                  tokenizer=args.tokenizer, chat_template=args.chat_template,
                                  progress=lambda m: print(m, file=sys.stderr))
    except (EvaluationError, JudgeError, MTBenchDataError, ModelLoadError, StoreError) as exc:
        print(f"fusechat: eval failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(out["markdown"])
    print(f"evaluation {out['address']}; report in {out['report_uri']}")
    if args.json:
        print(json.dumps({k: out[k] for k in ("name", "address", "answers", "report", "results")}, default=str))
    return EXIT_OK


def _setup(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("fusechat: error: setup needs a Prefect server: set PREFECT_API_URL", file=sys.stderr)
        return EXIT_USAGE
    from flows.setup import MIN_HEARTBEAT_TIMEOUT_S, setup_server

    if (args.gpu_limit is not None and args.gpu_limit < 1) or \
            (args.heartbeat_timeout is not None and args.heartbeat_timeout < MIN_HEARTBEAT_TIMEOUT_S):
        print(f"fusechat: error: --gpu-limit must be >= 1 and --heartbeat-timeout >= {MIN_HEARTBEAT_TIMEOUT_S}",
              file=sys.stderr)
        return EXIT_USAGE
    beat = int(os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"))
    if args.heartbeat_timeout is not None and args.heartbeat_timeout < 2 * beat:
        print(f"fusechat: warning: --heartbeat-timeout {args.heartbeat_timeout} s is under two heartbeat periods "
              f"({beat} s): a live run that misses one heartbeat will be marked Crashed", file=sys.stderr)

    try:
        for line in setup_server(gpu_tag=args.gpu_tag, gpu_limit=args.gpu_limit,
                                 heartbeat_timeout_s=args.heartbeat_timeout, work_pool=args.work_pool or None,
                                 gpu_work_pool=args.gpu_work_pool or None):
            print(line)
    except Exception as exc:  # the API's own message, on one line
        print(f"fusechat: setup failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before or after a run's own handler: one line, no traceback
        print("fusechat: interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader went away (`fusechat status CONFIG | head`): nothing left to say
        # stdout's buffer would fail again at exit, with a traceback: let it flush into /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports Prefect: its settings are read once, at the first import.
    _prefect_env()
    args = _parser().parse_args(argv)
    if getattr(args, "store", None) is not None and not args.store.strip():  # never silently the working folder
        print("fusechat: error: --store: empty URL: give a folder, a file:// or an s3:// URL", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "eval":
        return _eval(args)
    if args.command == "setup":
        return _setup(args)
    if args.command == "merge":
        from fusechat_core.merge.command import merge_command

        return merge_command(args)
    try:
        if args.command == "demo":
            cfg = load_config(DEMO_CONFIG, store=args.store)
            if args.quick:
                from fusechat_core.demo import quick_demo

                cfg = quick_demo(cfg)
        else:
            cfg = load_config(args.config, store=args.store)
        # A run (or its --plan) checks the stages it runs; status makes nothing. An unknown --until is _run's error.
        until = getattr(args, "until", None) or _stage_names()[-1]
        preflight(cfg, until if args.command in ("run", "demo") and until in _stage_names() else None)
    except ConfigError as exc:
        print(f"fusechat: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "status":
            rows = status_rows(cfg, verify=args.verify, elsewhere=True)
            print(json.dumps(rows) if args.json else "", end="\n" if args.json else "")
            if not args.json:
                _print_rows(rows)
            damaged = [r["stage"] for r in rows if r["state"] == "damaged"]
            if damaged:
                print(f"fusechat: damaged: {', '.join(damaged)} (the next run recomputes them)", file=sys.stderr)
                return EXIT_FAILED
            return EXIT_OK
        if args.command == "run" and args.plan:
            return _plan(cfg, args)
        if args.command == "run" and args.against:
            print("fusechat: error: --against needs --plan", file=sys.stderr)
            return EXIT_USAGE
        return _run(cfg, args.until, args.json)
    except StoreError as exc:
        print(f"fusechat: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
