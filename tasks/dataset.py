from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fusechat_core.config import RunConfig
from fusechat_core.data import build_dataset_artifact, stats_markdown
from fusechat_core.store import ArtifactStore
from tasks._stage import STAGE_TASK_OPTIONS, stage_ref


@task(name="dataset", task_run_name="dataset", retries=2, retry_delay_seconds=10, **STAGE_TASK_OPTIONS)
def build_dataset(config: dict, address: str, store: str) -> dict:
    """Build the FuseChat-Mixture dataset artifact."""
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    st = ArtifactStore(store)
    if not st.is_complete(address):
        stats = build_dataset_artifact(cfg, st, address, progress=logger.info)
        create_markdown_artifact(stats_markdown(address, stats), key="dataset-stats",
                                 description="FuseChat-Mixture: rows kept and skipped per source")
    return stage_ref(st, address)
