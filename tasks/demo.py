from __future__ import annotations

from prefect import get_run_logger, task

from fusechat_core.config import RunConfig
from fusechat_core.demo import build_demo_model_artifact
from fusechat_core.store import ArtifactStore
from tasks._stage import STAGE_TASK_OPTIONS, stage_ref


@task(name="demo_model", task_run_name="demo_model[{model}]", retries=1, retry_delay_seconds=5,
      **STAGE_TASK_OPTIONS)
def build_demo_model(config: dict, model: str, address: str, store: str) -> dict:
    """Build and pre-train one of the demo's tiny models (a pivot or a source)."""
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    spec = next(m for m in cfg.models if m.name == model)
    st = ArtifactStore(store)
    if not st.is_complete(address):
        summary = build_demo_model_artifact(cfg, spec, st, address, progress=logger.info)
        logger.info("demo model %s: %s parameters, final loss %.3f", model, f"{summary['params']:,}",
                    summary["final_loss"])
    return stage_ref(st, address)
