"""The merge task: one merged model per merge method of the run."""

from __future__ import annotations

import time

from prefect import get_run_logger

from tasks._stage import ProgressArtifact, open_store, run_config, run_name, stage_done, stage_task


@stage_task(name="merge", task_run_name=run_name("merge", "method"), retries=1, retry_delay_seconds=30)
def merge_targets(config: dict, method: str, targets: dict[str, str], address: str, store: str) -> dict:
    """Merge the targets (target name → ``plan.train`` address) into ``plan.merge(method)``."""
    from fusechat_core.merge import weights_markdown
    from fusechat_core.merge.stage import merge_stage

    started = time.monotonic()
    logger = get_run_logger()
    cfg = run_config(config)
    st = open_store(store)
    out = merge_stage(cfg, st, address, method, targets, progress=logger.info,
                      on_tensor=ProgressArtifact(f"Merge {method}: tensors written"))
    # VaRM: which target dominates which matrix
    details = "" if out["table"] is None else weights_markdown(out["table"], max_rows=400)
    return stage_done(st, address, f"Merge `{method}`", started, computed=not out["cached"], details=details,
                      method=method)
