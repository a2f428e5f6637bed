"""Training tasks: one per target (each source j, and the CLM baseline), independent of each other.

Each can run on its own GPU worker: give the task the pool's GPU tag in the
flow. With ``train.accelerate_config`` set, the task runs the training under
``accelerate launch`` (multi-GPU, FSDP) in a child process and reads its
progress from the child's stdout; otherwise it trains in its own process.
The dashboard gets a progress artifact and a metrics table (loss, lr,
tokens/s, step), refreshed at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from fusechat_core import stopping
from fusechat_core.config import RunConfig
from fusechat_core.plan import RunPlan
from tasks._stage import dashboard_key, open_store, progress_due, run_name, stage_done, stage_task

TABLE_ROWS = 200  # a table of every step of a 2,000-step run would not be read by anyone


class _Reporter:
    """Turns training events into logs, a progress artifact and a metrics table."""

    def __init__(self, target: str, logger: Any, key: str):
        self.target, self.logger, self.key = target, logger, key
        self.rows: list[dict[str, Any]] = []
        self.progress_id: Any = None
        self.total = 0
        self.last_pct = -1.0
        self.last_at = 0.0
        self.last_log = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "resume":
            self.rows = [self._row(r) for r in event.get("history", [])]
            self.logger.info("target %s: resuming from %s (step %d)", self.target, event["checkpoint"], event["step"])
        elif kind == "start":
            self.total = int(event["total_steps"])
            self.logger.info("target %s: %d optimizer steps (%d per epoch) on %s, %d process(es), λ = %s, %s",
                             self.target, self.total, event["steps_per_epoch"], event["device"], event["processes"],
                             event["lam"], event["fusion_function"] or "no fusion term")
            self.progress_id = create_progress_artifact(
                progress=100.0 * event["step"] / self.total, key=None,
                description=f"Training target {self.target}: optimizer steps done")
        elif kind == "step":
            self.rows.append(self._row(event))
            if event.get("update_skipped"):
                self.logger.warning("target %s: step %d/%d made no update (%s)", self.target, event["step"],
                                    self.total, event["update_skipped"])
            pct = 100.0 * event["step"] / max(self.total, 1)
            if self.progress_id is not None and progress_due(pct, self.last_pct, self.last_at,
                                                             event["step"] == self.total):
                update_progress_artifact(self.progress_id, progress=pct)
                self.last_pct, self.last_at = pct, time.monotonic()
            if time.monotonic() - self.last_log > 30 or event["step"] == self.total:
                self.last_log = time.monotonic()
                fusion = "" if event["fusion_loss"] is None else f" (clm {event['clm_loss']:.4f}, " \
                                                                  f"fusion {event['fusion_loss']:.4f})"
                self.logger.info("target %s: step %d/%d loss %.4f%s lr %.3g, %.0f tokens/s", self.target,
                                 event["step"], self.total, event["loss"], fusion, event["lr"], event["tokens_per_s"])
        elif kind == "checkpoint":
            self.logger.info("target %s: checkpoint %s", self.target, event["address"])
            self.table()
        elif kind == "done":
            self.table()

    @staticmethod
    def _row(e: dict[str, Any]) -> dict[str, Any]:
        return {"step": e["step"], "epoch": e["epoch"], "loss": round(e["loss"], 5),
                "clm_loss": round(e["clm_loss"], 5),
                "fusion_loss": None if e["fusion_loss"] is None else round(e["fusion_loss"], 5),
                "lr": e["lr"], "grad_norm": None if e["grad_norm"] is None else round(e["grad_norm"], 4),
                # a resumed step's speed was another process's: the stored history keeps none
                "tokens_per_s": round(e["tokens_per_s"], 1) if "tokens_per_s" in e else None}

    def table(self) -> None:
        if not self.rows:
            return
        stride = max(1, -(-len(self.rows) // TABLE_ROWS))
        rows = self.rows[::stride]
        if rows[-1] is not self.rows[-1]:
            rows.append(self.rows[-1])
        create_table_artifact(table=rows, key=self.key,
                              description=f"Training metrics of target {self.target} (every {stride} step(s))")


@stage_task(name="train", task_run_name=run_name("train", "target"), retries=2, retry_delay_seconds=30)
def train_target(config: dict, target: str, address: str, store: str) -> dict:
    """Train one target (a source's name, or ``clm``); a retry resumes from its newest checkpoint."""
    started = time.monotonic()
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config).model_copy(update={"store": store})
    expected = RunPlan(cfg).train(target)
    if expected != address:
        why = ""
        if cfg.train.mixed_precision == "auto":
            from fusechat_core.models import resolve_mixed_precision

            why = (f" (train.mixed_precision: auto resolves to {resolve_mixed_precision('auto')!r} on this machine, "
                   f"and the plan was made on another kind: set it explicitly)")
        raise ValueError(f"train task for {target!r}: address {address!r} is not the plan's {expected!r}{why}")
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        report = _Reporter(target, logger, dashboard_key(st.url, address, "metrics"))
        if cfg.train.accelerate_config:
            _launch(cfg, target, report, logger)
        else:
            from fusechat_core.train import train_from_config

            train_from_config(cfg, target, on_event=report)
    return stage_done(st, address, f"Training of target `{target}`", started, computed=computed, target=target)


def launch_command(accel: Path, config_file: Path, target: str) -> list[str]:
    """``accelerate launch`` of one target. On one machine, with no port in the accelerate
    config, the processes meet on a free port of this node rather than accelerate's fixed
    29500, which another job's launch on the node (a second run, another team's) may hold:
    a rank then fails to bind, or joins the other job's group."""
    import yaml

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accel)]
    settings = yaml.safe_load(accel.read_text())
    settings = settings if isinstance(settings, dict) else {}
    if int(settings.get("num_machines") or 1) == 1 and not settings.get("main_process_port"):
        with socket.socket() as sock:
            sock.bind(("", 0))
            cmd += ["--main_process_port", str(sock.getsockname()[1])]
    return cmd + ["-m", "fusechat_core.train", str(config_file), "--target", target]


def _launch(cfg: RunConfig, target: str, report: _Reporter, logger: Any) -> None:
    """``accelerate launch -m fusechat_core.train`` in a child; its JSON event lines drive the report."""
    accel = Path(cfg.train.accelerate_config or "")
    if not accel.is_file():
        raise ValueError(f"train.accelerate_config: no such file: {accel}")
    with tempfile.TemporaryDirectory(prefix="fusechat-train-") as tmp:
        config_file = Path(tmp) / "run.json"
        config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
        cmd = launch_command(accel, config_file, target)
        logger.info("target %s: %s", target, " ".join(cmd))
        tail: deque[str] = deque(maxlen=20)
        # credentials stay in the inherited environment, never on the command line
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=os.environ.copy()) as proc, stopping.owned(proc):
            for line in proc.stdout:  # type: ignore[union-attr]
                line = line.rstrip("\n")
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        event = None
                    if isinstance(event, dict) and "event" in event:
                        report(event)
                        continue
                tail.append(line)
        stopping.check()  # terminated with the run: not a training failure
        if proc.returncode != 0:
            last = next((x for x in reversed(tail) if x.strip()), "no output")
            raise RuntimeError(f"training of target {target!r} under accelerate launch exited with "
                               f"{proc.returncode}: {last}")
