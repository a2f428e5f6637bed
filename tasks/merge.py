"""The merge task: one merged model per merge method of the run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fusechat_core.merge import weights_markdown
from fusechat_core.merge.stage import merge_stage
from fusechat_core.store import ArtifactStore
from tasks._stage import STAGE_TASK_OPTIONS, run_config, stage_ref


@task(name="merge", task_run_name="merge-{method}", retries=1, retry_delay_seconds=30, **STAGE_TASK_OPTIONS)
def merge_targets(config: dict, method: str, targets: dict[str, str], address: str, store: str) -> dict:
    """Merge the targets (target name → ``plan.train`` address) into ``plan.merge(method)``."""
    logger = get_run_logger()
    cfg = run_config(config)
    st = ArtifactStore(store)
    out = merge_stage(cfg, st, address, method, targets, progress=logger.info)
    if out["table"] is not None and not out["cached"]:
        key = "".join(c if c.isalnum() else "-" for c in f"varm-weights-{cfg.name}".lower())[:64]
        create_markdown_artifact(weights_markdown(out["table"], max_rows=400), key=key,
                                 description=f"VaRM: which target dominates which matrix ({address})")
    return stage_ref(st, address, method=method)
