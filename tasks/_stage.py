"""What every stage task shares: the cache policy, result storage, the reference it returns.

A stage task's cache key is its artifact address (SPEC §3), so a rerun in a
new flow run finds the finished stage and Prefect reports it Cached. Prefect's
cache record alone is not trusted: when the artifact's manifest is missing or
fails its check, the record is dropped and the stage runs again.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import RemoteFileSystem

from fusechat_core.store import ArtifactStore, s3_storage_options

RECORDS_PREFIX = "_prefect-records"


def record_key(address: str) -> str:
    return address.replace("/", "--")


def result_storage_for(store_url: str) -> Any:
    """Prefect result storage inside the artifact store, so the cache outlives any Prefect server."""
    store = ArtifactStore(store_url)
    if store.scheme == "file":
        return Path(store.root) / RECORDS_PREFIX
    # Only the endpoint goes into the block: credentials stay in the environment. Prefect
    # needs a remote block saved before tasks use it; it is saved again at every start,
    # so a wiped server database costs nothing (the records themselves are in the store).
    block = RemoteFileSystem(basepath=f"s3://{store.root}/{RECORDS_PREFIX}", settings=s3_storage_options())
    name = "fusechat-records-" + hashlib.sha256(store.url.encode()).hexdigest()[:16]
    block.save(name, overwrite=True)
    return block


def _drop_record(store: ArtifactStore, key: str) -> None:
    path = f"{store.root}/{RECORDS_PREFIX}/{key}"
    with contextlib.suppress(FileNotFoundError):
        if store.fs.exists(path):
            store.fs.rm(path)


class StageAddressPolicy(CachePolicy):
    """Cache key = the ``address`` argument of the task; valid only while the artifact is complete."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        address = inputs["address"]
        store = ArtifactStore(inputs["store"])
        key = record_key(address)
        if not store.is_complete(address):
            _drop_record(store, key)
        return key


STAGE_POLICY = StageAddressPolicy()

# Options every stage task shares: small JSON results, keyed by address.
STAGE_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=STAGE_POLICY,
    persist_result=True,
    result_serializer="json",
)


def stage_ref(store: ArtifactStore, address: str, **extra: Any) -> dict[str, Any]:
    """The small reference a stage task returns (never the data itself)."""
    man = store.require(address)
    return {"address": address, "store": store.url, "digest": man.digest, "size": man.size, **extra}


def run_config(config: dict) -> Any:
    """The run's config inside a task, with the run's built (demo) models made loadable."""
    from fusechat_core.config import RunConfig
    from fusechat_core.demo import materialise
    from fusechat_core.plan import RunPlan

    cfg = RunConfig.model_validate(config)
    materialise(RunPlan(cfg), ArtifactStore(cfg.store))
    return cfg


def ensure_gpu_limit(tag: str, limit: int) -> list[str]:
    """Make the GPU tag's concurrency limit exist with the configured size; returns the tags.

    Tasks that hold a model carry the tag, so a pool of N GPUs never runs N+1 of them.
    An operator's own limit on the tag (set with ``prefect concurrency-limit create``)
    is respected when it is smaller.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            current = client.read_concurrency_limit_by_tag(tag).concurrency_limit
        except ObjectNotFound:
            current = None
        if current is None or current > limit:
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
        _release_dead_slots(client, tag)
    return [tag]


def _release_dead_slots(client: Any, tag: str) -> None:
    """Free GPU slots that a killed run (SIGKILL, preemption) took with it.

    Prefect 3 backs a tag limit with a global limit (``tag:<tag>``) whose slots are
    leases. A Prefect server revokes a lease its holder stops renewing (5 minutes);
    the ephemeral API has no such service, so a slot held when a run was killed
    would hang every later run (SPEC §5). Without a server no other process holds
    slots when a flow starts, so every held slot there is a dead run's.
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # a server's lease repossessor frees dead holders' slots
    try:
        held = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    except ObjectNotFound:
        return
    if held.active_slots:
        client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=0))