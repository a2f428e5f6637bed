"""``fusechat setup``: what a Prefect server needs once before it runs fusion jobs.

- A tag concurrency limit on the GPU tag, so a pool of N GPUs never gets N+1 jobs.
- An automation that marks a run of the pipeline Crashed when its heartbeats stop: a node
  that was SIGKILLed (preempted) cannot report its own death, and without this
  the dashboard would show the run as Running forever. Runs send heartbeats when
  ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set (the CLI sets 30 s by default).
- Every work pool the deployments in ``prefect.yaml`` use, so ``prefect deploy --all``
  works right after: ``fusechat-local`` (process) and ``fusechat-gpu`` (Kubernetes, with
  ``deployments/kubernetes-gpu.json`` as its base job template).

Every step is idempotent: running it again keeps the server's GPU limit and heartbeat timeout
unless given anew, and leaves existing work pools as they are.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

GPU_JOB_TEMPLATE = Path(__file__).resolve().parents[1] / "deployments" / "kubernetes-gpu.json"

ZOMBIE_AUTOMATION = "fusechat: crash flow runs whose heartbeats stopped"
PIPELINE_FLOW = "fusechat-pipeline"  # flows.pipeline's flow name: the runs the automation watches
# Prefect's least ``within`` for a proactive trigger. A real cluster wants several heartbeat periods
# (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, at least 30 s), or live runs are crashed between two heartbeats.
MIN_HEARTBEAT_TIMEOUT_S = 10


def zombie_automation(within_s: int) -> Any:
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        description="A flow run that sent a heartbeat and then neither another heartbeat nor a final "
                    f"state within {within_s} s died with its node: mark it Crashed so it can be retried.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            # A heartbeat, a final state, or a state that waits for another process: a run
            # rescheduled on SIGTERM (AwaitingRetry, as deployments/README.md advises) gets no
            # heartbeat until a new pod runs it, often minutes on Kubernetes, and must stay
            # Scheduled for a worker to pick it up: marked Crashed, it would never resume.
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed", "prefect.flow-run.AwaitingRetry",
                    "prefect.flow-run.Scheduled", "prefect.flow-run.Late", "prefect.flow-run.Pending",
                    "prefect.flow-run.Paused", "prefect.flow-run.Suspended", "prefect.flow-run.Cancelling"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # this pipeline's runs only: a shared server's other flows may send no heartbeats
            # at all, or at Prefect's own 180 s, and must not be marked Crashed by our window
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": PIPELINE_FLOW}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {within_s} s: the node running this flow run died "
                                            "(preempted?). Rerun or retry it: finished stages are skipped.")],
    )


DEFAULT_GPU_LIMIT = 1
DEFAULT_HEARTBEAT_TIMEOUT_S = 90  # three heartbeat periods of the CLI's 30 s


def setup_server(*, gpu_tag: str = "gpu", gpu_limit: int | None = None, heartbeat_timeout_s: int | None = None,
                 work_pool: str | None = "fusechat-local", gpu_work_pool: str | None = "fusechat-gpu") -> list[str]:
    """Apply the set-up to the Prefect API in ``PREFECT_API_URL``; returns what was done.

    ``gpu_limit``: the GPU tag's limit; None keeps the server's (a plain ``fusechat setup``
    after an upgrade must not turn a cluster's 8 slots into 1), or sets 1 where there is none.
    ``heartbeat_timeout_s`` is the automation's ``within``: how long after a heartbeat a flow run may
    stay silent (no heartbeat, no final state) before it is marked Crashed; None keeps the
    existing automation's, or 90 s. A work pool that exists is left as it is (an operator may
    have edited its job template).
    """
    if heartbeat_timeout_s is not None and heartbeat_timeout_s < MIN_HEARTBEAT_TIMEOUT_S:
        raise ValueError(f"heartbeat_timeout_s must be >= {MIN_HEARTBEAT_TIMEOUT_S} (Prefect's least `within`)")
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        try:
            current = client.read_concurrency_limit_by_tag(gpu_tag).concurrency_limit
        except ObjectNotFound:
            current = None
        if gpu_limit is None and current is not None:
            done.append(f"concurrency limit: tag {gpu_tag!r} at most {current} task runs "
                        "(kept; --gpu-limit changes it)")
        else:
            limit = gpu_limit if gpu_limit is not None else DEFAULT_GPU_LIMIT
            client.create_concurrency_limit(tag=gpu_tag, concurrency_limit=limit)
            was = "" if current is None or current == limit else f" (was {current})"
            done.append(f"concurrency limit: tag {gpu_tag!r} at most {limit} task runs{was}")
        pools = [(work_pool, "process", None)]
        if gpu_work_pool:
            # The server stores the pool as it is given; a Kubernetes worker (prefect-kubernetes)
            # is only needed where the pool's runs are executed.
            pools.append((gpu_work_pool, "kubernetes", json.loads(GPU_JOB_TEMPLATE.read_text())))
        for name, kind, template in pools:
            if not name:
                continue
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, **(
                    {"base_job_template": template} if template else {})))
                done.append(f"work pool {name!r} ({kind}) created")
            except ObjectAlreadyExists:
                done.append(f"work pool {name!r} exists")
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except (ObjectNotFound, ValueError):
        existing = None
    kept = ""
    if heartbeat_timeout_s is None:
        within = getattr(getattr(existing, "trigger", None), "within", None)
        heartbeat_timeout_s = int(within.total_seconds()) if within else DEFAULT_HEARTBEAT_TIMEOUT_S
        kept = " (kept; --heartbeat-timeout changes it)" if within else ""
    # made again even when kept: an older version's automation watched every flow of the server
    wanted = zombie_automation(heartbeat_timeout_s)
    if existing is not None:
        existing.delete()
    wanted.create()
    done.append(f"automation {ZOMBIE_AUTOMATION!r}: Crashed after {heartbeat_timeout_s} s without a heartbeat{kept}")
    return done
