"""``fusechat setup``: what a Prefect server needs once before it runs fusion jobs.

- A tag concurrency limit on the GPU tag, so a pool of N GPUs never gets N+1 jobs.
- An automation that marks a flow run Crashed when its heartbeats stop: a node
  that was SIGKILLed (preempted) cannot report its own death, and without this
  the dashboard would show the run as Running forever. Runs send heartbeats when
  ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set (the CLI sets 30 s by default).
- Every work pool the deployments in ``prefect.yaml`` use, so ``prefect deploy --all``
  works right after: ``fusechat-local`` (process) and ``fusechat-gpu`` (Kubernetes, with
  ``deployments/kubernetes-gpu.json`` as its base job template).

Every step is idempotent: running it again updates what exists.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

GPU_JOB_TEMPLATE = Path(__file__).resolve().parents[1] / "deployments" / "kubernetes-gpu.json"

ZOMBIE_AUTOMATION = "fusechat: crash flow runs whose heartbeats stopped"
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
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {within_s} s: the node running this flow run died "
                                            "(preempted?). Rerun or retry it: finished stages are skipped.")],
    )


def setup_server(*, gpu_tag: str = "gpu", gpu_limit: int = 1, heartbeat_timeout_s: int = 90,
                 work_pool: str | None = "fusechat-local", gpu_work_pool: str | None = "fusechat-gpu") -> list[str]:
    """Apply the set-up to the Prefect API in ``PREFECT_API_URL``; returns what was done.

    ``heartbeat_timeout_s`` is the automation's ``within``: how long after a heartbeat a flow run may
    stay silent (no heartbeat, no final state) before it is marked Crashed. The default, 90 s, is
    three heartbeat periods of the CLI's 30 s.
    """
    if heartbeat_timeout_s < MIN_HEARTBEAT_TIMEOUT_S:
        raise ValueError(f"heartbeat_timeout_s must be >= {MIN_HEARTBEAT_TIMEOUT_S} (Prefect's least `within`)")
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=gpu_tag, concurrency_limit=gpu_limit)
        done.append(f"concurrency limit: tag {gpu_tag!r} at most {gpu_limit} task runs")
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
    wanted = zombie_automation(heartbeat_timeout_s)
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except (ObjectNotFound, ValueError):
        existing = None
    if existing is not None:
        existing.delete()
    wanted.create()
    done.append(f"automation {ZOMBIE_AUTOMATION!r}: Crashed after {heartbeat_timeout_s} s without a heartbeat")
    return done
