from __future__ import annotations

import time

from prefect import get_run_logger

from tasks._stage import ProgressArtifact, open_store, run_name, stage_done, stage_task


@stage_task(name="demo_model", task_run_name=run_name("demo_model", "model", label=""), retries=1,
            retry_delay_seconds=5)
def build_demo_model(config: dict, model: str, address: str, store: str) -> dict:
    """Build and pre-train one of the demo's tiny models (a pivot or a source)."""
    from fusechat_core.config import RunConfig
    from fusechat_core.demo import build_demo_model_artifact

    started = time.monotonic()
    logger = get_run_logger()
    cfg = RunConfig.model_validate(config)
    spec = next(m for m in cfg.models if m.name == model)
    st = open_store(store)
    computed = not st.is_complete(address)
    if computed:
        summary = build_demo_model_artifact(cfg, spec, st, address, progress=logger.info,
                                            on_step=ProgressArtifact(f"Demo model {model}: pre-training steps"))
        logger.info("demo model %s: %s parameters, final loss %.3f", model, f"{summary['params']:,}",
                    summary["final_loss"])
    return stage_done(st, address, f"Demo model `{model}`", started, computed=computed)
