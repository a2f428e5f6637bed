"""What every stage task shares: its decorator (``stage_task``: Prefect's ``@task`` with the
options below, stopping with its flow run even on a Dask worker), the cache policy, result
storage, the reference it returns, its run's name (``run_name``:
``represent[model=pivot, shard=1/2]``) and the summary it posts on the dashboard when done
(``stage_done``).

A stage task's cache key is its artifact address (SPEC §3), so a rerun in a
new flow run finds the finished stage and Prefect reports it Cached. Prefect's
cache record alone is not trusted: a hit counts only for an artifact whose files
match their manifest (``ArtifactStore.check``), else the record is dropped and
the stage runs again. The rule, cheap and honest: the manifest is well-formed and
names only files inside the artifact; each file is there with its size; and each
file's stat identity (size, mtime, ctime; on S3 size and ETag, from one listing)
is the one recorded in the artifact's verified marker when its bytes were last
hashed (by the writer, or by a re-hash), else it is re-hashed now. So a changed
byte is found before the hit; damage that leaves the identity alone (bit rot) is
found by the stage that reads the bytes, which hashes them, fails, and forgets
the marker, so the next run re-hashes, finds it and recomputes that artifact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from fusechat_core import stopping
from fusechat_core.store import ArtifactStore, Manifest, human_size

RECORDS_PREFIX = "_prefect-records"

# Third-party progress bars write carriage-return lines that fill a task's log (and the
# dashboard) with noise: stages report progress as progress artifacts instead.
_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1",       # huggingface_hub, and transformers, which follows it
          "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets
          "TQDM_DISABLE": "1",                       # any other tqdm bar left at its default
          "TRANSFORMERS_VERBOSITY": "warning"}


def quiet_progress_bars() -> None:
    """Turn third-party progress bars off in this process (and the processes it starts),
    unless the environment already says otherwise. Read when those libraries are first
    imported: every process that runs a stage imports this module before them."""
    for key, value in _QUIET.items():
        os.environ.setdefault(key, value)


quiet_progress_bars()


def record_key(address: str) -> str:
    return address.replace("/", "--")


def result_storage_for(store_url: str) -> Any:
    """Prefect result storage inside the artifact store, so the cache outlives any Prefect server."""
    from prefect.filesystems import RemoteFileSystem

    from fusechat_core.store import s3_storage_options

    store = open_store(store_url)
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


@dataclasses.dataclass
class StageAddressPolicy(CachePolicy):
    """Cache key = the ``address`` argument of the task; valid only while the artifact's files
    match their manifest (the rule in this module's docstring). ``also``: the task's other
    arguments naming artifacts it makes (None: not made); each must be complete too."""

    also: tuple[str, ...] = ()

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        address = inputs["address"]
        store = open_store(inputs["store"])
        key = record_key(address)
        made = [address, *(inputs[k] for k in self.also if inputs.get(k))]
        if not all(store.is_complete(a) for a in made):
            _drop_record(store, key)
        return key


STAGE_POLICY = StageAddressPolicy()


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry only what can succeed on retry (a network error,
    an S3 5xx, a judge's 429/5xx; ``fusechat_core.errors``). A config or data error fails once."""
    from fusechat_core.errors import is_transient

    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # a result that cannot be read back: it says why
            exc = err
    return isinstance(exc, BaseException) and is_transient(exc)


# Options every stage task shares: small JSON results, keyed by address; retries (each
# task's own count) only for transient failures.
STAGE_TASK_OPTIONS: dict[str, Any] = dict(
    cache_policy=STAGE_POLICY,
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=retry_transient,
)


def stage_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """Prefect's ``@task`` with the options every stage task shares, around a body that stops
    with its flow run even in a process that outlives the run (:func:`stops_with_its_flow_run`)."""
    from prefect import task

    def decorate(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            with stops_with_its_flow_run():
                return fn(*args, **kwargs)
        return task(**{**STAGE_TASK_OPTIONS, **options})(body)
    return decorate


def dask_stop_key() -> str | None:
    """The name of the Dask event that stops this flow run's attempt (its Running state: a
    rescheduled attempt of the same flow run is not stopped by the one before it)."""
    from prefect.context import FlowRunContext

    run = getattr(FlowRunContext.get(), "flow_run", None)
    if run is None or run.state is None:
        return None
    return f"fusechat-stop-{run.id}-{run.state.id}"


def _dask_worker_client() -> Any:
    """The Dask client of the worker running this task, or None outside a Dask worker."""
    if "distributed" not in sys.modules:  # nothing imported it: not a Dask worker
        return None
    import distributed

    try:
        distributed.get_worker()
    except ValueError:
        return None
    return distributed.get_client()


@contextlib.contextmanager
def stops_with_its_flow_run() -> Any:
    """On a Dask worker, run the task under a stop of its own that the flow's stop sets.

    A Dask worker of a cluster the run did not start (``runner.dask_address``) is no child of
    the flow's process: a SIGTERM to the flow reaches neither it nor the task it runs, and
    Dask cannot interrupt a running task (cancelling only drops its result). So the flow,
    when it stops, sets a Dask event named for its attempt (:func:`tell_dask_tasks_to_stop`);
    here a thread waits on it, and stops the task's scope (its loops leave at their next
    check, nothing is committed after, the processes it started are terminated) without
    stopping the worker or the other runs' tasks it serves."""
    client = _dask_worker_client()
    key = dask_stop_key() if client is not None else None
    if key is None:
        yield
        return
    from distributed import Event

    with stopping.scope() as sc:
        finished = threading.Event()

        def watch() -> None:
            event = Event(key, client=client)
            while not finished.is_set():
                try:
                    if event.wait(timeout=2.0):
                        sc.stop("its flow run stopped")
                        return
                except Exception as exc:  # the scheduler is gone: so is the worker, soon
                    if not finished.is_set():
                        logging.getLogger(__name__).warning(
                            "no longer watching for the flow run's stop (%s): %s", key, exc)
                    return

        threading.Thread(target=watch, name="fusechat-stop-watch", daemon=True).start()
        try:
            yield
        finally:
            finished.set()


def tell_dask_tasks_to_stop(client: Any, timeout: float = 3.0) -> None:
    """Set this attempt's stop event on the Dask scheduler (see :func:`stops_with_its_flow_run`);
    a scheduler that does not answer within ``timeout`` is not waited for."""
    from distributed import Event

    key = dask_stop_key()
    if key is None:
        return
    errors: list[BaseException] = []

    def tell() -> None:
        try:
            Event(key, client=client).set()
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=tell, name="fusechat-stop-tell", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or errors:
        why = errors[0] if errors else f"no answer in {timeout:.0f} s"
        logging.getLogger(__name__).warning("could not tell the Dask tasks to stop (%s): %s", key, why)


def open_store(url: str) -> ArtifactStore:
    """The store at ``url``, one object per process while the working folder and the S3
    settings in the environment stay as they are: a run's cache checks (one per task) share
    one client instead of opening one each."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "FUSECHAT_S3"))))
    return _open_store(url, os.getcwd(), env)


@functools.lru_cache(maxsize=16)
def _open_store(url: str, cwd: str, env: tuple) -> ArtifactStore:
    return ArtifactStore(url)


def unwalked(value: Any) -> Any:
    """``value`` as a task argument Prefect does not walk looking for futures (it holds none).

    The run's config goes to every task, and walking it costs each task run ~10 ms before
    it even checks its cache. Only under the thread runner: Dask takes Prefect's ``quote``
    wrapper (a tuple) apart, so there the value goes as it is.
    """
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.utilities.annotations import quote

    ctx = FlowRunContext.get()
    return quote(value) if ctx is not None and isinstance(ctx.task_runner, ThreadPoolTaskRunner) else value


def stage_ref(store: ArtifactStore, address: str, man: Manifest | None = None, **extra: Any) -> dict[str, Any]:
    """The small reference a stage task returns (never the data itself)."""
    man = store.require(address) if man is None else man
    return {"address": address, "store": store.url, "digest": man.digest, "size": man.size, **extra}


def artifact_key(text: str) -> str:
    """A Prefect artifact key from any text: lowercase ASCII letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dashboard_key(store_url: str, address: str, what: str = "") -> str:
    """The dashboard key of what a stage posts about ``address`` (``what``: ``metrics``...):
    the address, readable, then a short hash of the store's URL and the address, so the same
    address in two stores (two teams, one Prefect server) never shares a key."""
    tag = hashlib.sha256(f"{store_url}\n{address}".encode()).hexdigest()[:10]
    return artifact_key(f"{address}-{what}-{tag}" if what else f"{address}-{tag}")


# Progress artifact updates are API calls (and server work): a few a minute is plenty for a
# bar, and a demo stage that takes a step per 50 ms would otherwise post one per step.
PROGRESS_EVERY_S = 5.0


def progress_due(pct: float, last_pct: float, last_at: float, finished: bool) -> bool:
    """Whether a progress bar's update is worth an API call: at the end, or once it has moved a
    whole percent and the last update is ``PROGRESS_EVERY_S`` old."""
    return finished or (pct - last_pct >= 1.0 and time.monotonic() - last_at >= PROGRESS_EVERY_S)


class ProgressArtifact:
    """A progress artifact on the dashboard (``done`` of ``total``), updated as
    ``progress_due`` says. Outside a Prefect task run it does nothing."""

    def __init__(self, description: str):
        self.description = description
        self.id: Any = None
        self.last = -1.0
        self.at = 0.0

    def __call__(self, done: int, total: int) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if total <= 0 or TaskRunContext.get() is None:
            return
        pct = min(100.0, 100.0 * done / total)
        if self.id is None:
            self.id = create_progress_artifact(progress=pct, description=self.description)
        elif progress_due(pct, self.last, self.at, done >= total):
            update_progress_artifact(self.id, progress=pct, description=f"{self.description}: {done} of {total}")
        else:
            return
        self.last, self.at = pct, time.monotonic()


def run_name(stage: str, param: str | None = None, *, label: str | None = None,
             shard: str | None = None) -> Callable[..., str]:
    """A ``task_run_name`` that says which instance a run is, e.g. ``represent[model=pivot, shard=1/2]``.

    ``param``: the task parameter that tells the instances apart, shown as ``label=value``
    (``label`` defaults to the parameter's name; ``""`` shows the bare value). ``shard``: the
    0-based shard parameter, shown 1-based out of the run's shard count.
    """
    def name(parameters: dict[str, Any]) -> str:
        parts = []
        if param is not None:
            key = param if label is None else label
            parts.append(f"{key}={parameters[param]}" if key else str(parameters[param]))
        if shard is not None:
            parts.append(f"shard={parameters[shard] + 1}/{parameters['config']['represent']['shards']}")
        return f"{stage}[{', '.join(parts)}]" if parts else stage

    return name


_HASH_LIKE = ("sha256", "digest", "fingerprint")


def _figures(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar figures of a manifest's meta (one level of nesting flattened), digests left out."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return {k: v for k, v in out.items() if k != "stage" and not any(h in k for h in _HASH_LIKE)
            and isinstance(v, (int, float, str, bool)) and len(str(v)) <= 120}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v).replace("|", "\\|")


def stage_done(store: ArtifactStore, address: str, title: str, started: float, *, computed: bool = True,
               figures: Mapping[str, Any] | None = None, details: str = "", **extra: Any) -> dict[str, Any]:
    """A stage's reference, and its summary on the dashboard: a markdown artifact saying what it
    made, where, how long it took, and its key figures (the manifest's, then ``figures``), then
    ``details`` (markdown; a leading title line is dropped).

    The key is the address's in this store (``dashboard_key``): the same artifact made again
    (after its store was wiped) adds a version under the same key, a changed one has a key of
    its own, and the same address in another store another key. ``started``:
    ``time.monotonic()`` when the task began; ``computed``: whether this run made the
    artifact (else it found it complete in the store). Outside a Prefect run
    (``task.fn(...)``) nothing is posted.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import TaskRunContext

    man = store.require(address)
    if TaskRunContext.get() is not None:
        took = f"{time.monotonic() - started:.1f} s" + ("" if computed else " (found complete in the store)")
        rows = {"address": f"`{address}`", "location": f"`{store.uri(address)}`",
                "files": f"{len(man.files)} ({human_size(man.size)})", "digest": f"`{man.digest[:16]}`", "took": took}
        rows.update({k: _cell(v) for k, v in {**_figures(man.meta), **_figures(figures or {})}.items()
                     if k not in rows})
        table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
        details = details.strip()
        if details.startswith("# "):  # the summary has its own title
            details = details.partition("\n")[2].strip()
        markdown = f"# {title}\n\n| | |\n|---|---|\n{table}\n" + (f"\n{details}\n" if details else "")
        create_markdown_artifact(markdown, key=dashboard_key(store.url, address), description=f"{title}: {address}")
    return stage_ref(store, address, man, **extra)


def run_config(config: dict) -> Any:
    """The run's config inside a task, with the run's built (demo) models made loadable."""
    from fusechat_core.config import RunConfig
    from fusechat_core.demo import materialise
    from fusechat_core.plan import RunPlan

    cfg = RunConfig.model_validate(config)
    materialise(RunPlan(cfg), open_store(cfg.store))
    return cfg


def ensure_gpu_limit(tag: str, limit: int) -> list[str]:
    """Make the GPU tag's concurrency limit exist; returns the tags.

    Tasks that hold a model carry the tag, so a pool of N GPUs never runs N+1 of them.
    A limit the tag already has on a Prefect server is the server's (``fusechat setup
    --gpu-limit``, or an operator's ``prefect concurrency-limit create``), shared by every
    run on it: a run does not change it, and says so when its ``runner.gpu_concurrency``
    differs. Without a server the run's setting is the limit.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        try:
            current = client.read_concurrency_limit_by_tag(tag).concurrency_limit
        except ObjectNotFound:
            current = None
        if current is None or (current != limit and not PREFECT_API_URL.value()):
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)
        elif current != limit:
            logging.getLogger("fusechat").warning(
                "the server limits tag %r to %d task runs at once; runner.gpu_concurrency %d is not applied "
                "(the limit is the server's, shared by its runs: fusechat setup --gpu-limit changes it)",
                tag, current, limit)
        _release_dead_slots(client, tag)
    return [tag]


# This process's mark as a live run on the local ephemeral API: a file of its own under
# PREFECT_HOME, exclusively locked for the process's lifetime (the lock goes with the process,
# SIGKILL included). One lock per run, never converted: flock turns a shared lock exclusive by
# dropping it first, and a run probing twice opened a window where another run saw none.
_LIVE_RUNS_LOCK: Any = None


def _no_other_live_run() -> bool:
    """Whether no other run shares this machine's local API (see ``_LIVE_RUNS_LOCK``); from
    the first call on, this process counts as a live run itself."""
    import fcntl

    from prefect.settings import PREFECT_HOME

    global _LIVE_RUNS_LOCK
    runs = Path(PREFECT_HOME.value()).expanduser() / "fusechat-live-runs"
    if _LIVE_RUNS_LOCK is None:
        runs.mkdir(parents=True, exist_ok=True)
        # locked before it is linked in: a mark anyone can see is already held
        fd, tmp = tempfile.mkstemp(dir=runs, prefix=".new-")
        fcntl.flock(fd, fcntl.LOCK_EX)
        mine = runs / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        os.link(tmp, mine)
        os.unlink(tmp)
        _LIVE_RUNS_LOCK = (os.fdopen(fd, "r+b"), mine)  # the process's lifetime
    alone = True
    for mark in runs.glob("*.lock"):
        if mark == _LIVE_RUNS_LOCK[1]:
            continue
        try:
            fd = os.open(mark, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            alone = False  # its run is alive
        else:
            with contextlib.suppress(FileNotFoundError):
                mark.unlink()  # a dead run's: taken while locked, so no live run loses it
        finally:
            os.close(fd)
    return alone


def _release_dead_slots(client: Any, tag: str) -> None:
    """Free GPU slots that a killed run (SIGKILL, preemption) took with it.

    Prefect 3 backs a tag limit with a global limit (``tag:<tag>``) whose slots are
    leases. A Prefect server revokes a lease its holder stops renewing (the task engine
    takes 60-second leases; the server's repossessor looks every 15 s, so a killed run's
    slot is back within about 75 s);
    the ephemeral API has no such service, so a slot held when a run was killed
    would hang every later run (SPEC §5). Runs on one machine share that API's database:
    the slots are freed only when no other run is alive (``_no_other_live_run``), else
    they may be a live run's, and a dead run's slot waits for the next run started alone.
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # a server's lease repossessor frees dead holders' slots
    if not _no_other_live_run():
        return
    try:
        held = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
    except ObjectNotFound:
        return
    if held.active_slots:
        client.update_global_concurrency_limit(f"tag:{tag}", GlobalConcurrencyLimitUpdate(active_slots=0))
