from __future__ import annotations

import time

from prefect import get_run_logger

from tasks._stage import open_store, run_name, stage_done, stage_task


# A source that fails its checks (DataError) fails once: stage tasks retry only transient errors.
@stage_task(name="dataset", task_run_name=run_name("dataset"), retries=2, retry_delay_seconds=10)
def build_dataset(config: dict, address: str, store: str) -> dict:
    """Build the FuseChat-Mixture dataset artifact."""
    from fusechat_core.config import RunConfig
    from fusechat_core.data import build_dataset_artifact, stats_markdown
    from fusechat_core.data.build import STATS_FILE

    started = time.monotonic()
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        build_dataset_artifact(cfg, st, address, progress=logger.info)
    # rows kept and skipped per source, with the reasons
    details = stats_markdown(address, st.read_json(address, STATS_FILE))
    return stage_done(st, address, "Dataset (FuseChat-Mixture)", started, computed=computed, details=details)
