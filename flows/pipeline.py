"""The FuseChat DAG: dataset → representations → alignment → training → merge → evaluation.

Every stage is a task keyed by its artifact address (``fusechat_core.plan``),
so running the flow again skips what is finished and resumes what is not.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fusechat_core.config import RunConfig, load_config
from fusechat_core.plan import RunPlan
from tasks._stage import result_storage_for
from tasks.dataset import build_dataset
from tasks.demo import build_demo_model

STAGES = ("demo_models", "dataset")


@flow(name="fusechat-pipeline", flow_run_name="fusechat-{until}", validate_parameters=True)
def fusechat_pipeline(config: dict[str, Any] | None = None, config_path: str | None = None,
                      until: str = STAGES[-1]) -> dict[str, Any]:
    """Run (or resume) a fusion run. Give the config itself, or the path/URL of its YAML file."""
    if (config is None) == (config_path is None):
        raise ValueError("give exactly one of config and config_path")
    cfg = load_config(config_path) if config_path else RunConfig.model_validate(config)
    plan = RunPlan(cfg)
    storage = result_storage_for(cfg.store)
    config = cfg.model_dump(mode="json")
    results: dict[str, Any] = {}

    def run(stage: str, task: Any, *args: Any) -> Any:
        state = task.with_options(result_storage=storage)(*args, return_state=True)
        ref = state.result()  # raises if the task failed
        results[stage] = {**ref, "state": state.name}
        return ref

    demo = {m.name: build_demo_model.with_options(result_storage=storage).submit(
        config, m.name, plan.demo_model(m), cfg.store) for m in plan.demo_specs()}
    for name, fut in demo.items():
        results[f"demo_models[{name}]"] = {**fut.result(), "state": fut.state.name}
    if until == "demo_models":
        return results

    run("dataset", build_dataset, config, plan.dataset, cfg.store)
    if until == "dataset":
        return results
    return results
