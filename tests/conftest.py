"""Test session set-up: nothing touches the user's home, nothing reaches a hub.

Prefect gets its own PREFECT_HOME; tokenizers and tiny models are built once
per session into a temporary cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="fusechat-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect-home")
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ.setdefault("FUSECHAT_CACHE", str(_SESSION_TMP / "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf-home")
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker has a core of its own: one compute thread per worker and per process it
    # starts (torch's default is one per core, so two workers ran four, and OpenMP's idle
    # threads spin). Stages pin their own count anyway (fusechat_core/determinism.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tiny_models(session_tmp: Path) -> dict[str, Path]:
    """Three tiny random models of the paper's architectures, three real tokenizers.

    pivot: Mistral + Mistral v1 SentencePiece (32,000); mixtral: Mixtral MoE +
    Mistral v3 (32,768); llama: Llama + tekken byte-level BPE (131,072).
    """
    from fusechat_core.tiny import build_tiny_model

    root = session_tmp / "tiny-models"
    specs = {"pivot": ("mistral", "builtin:mistral-v1", 0),
             "mixtral": ("mixtral", "builtin:mistral-v3", 1),
             "llama": ("llama", "builtin:tekken", 2)}
    out = {}
    for name, (arch, tok, seed) in specs.items():
        folder = root / name
        if not (folder / "config.json").exists():
            build_tiny_model(arch, tok, folder, seed=seed)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def mt_bench_dir(session_tmp: Path) -> Path:
    """MT-Bench files in FastChat's formats, written by the tests (tests/corpus.py)."""
    from tests.corpus import write_mt_bench

    return write_mt_bench(session_tmp / "mt_bench")


@pytest.fixture(scope="session")
def s3_server(session_tmp: Path):
    """SeaweedFS serving S3 on 127.0.0.1 for the whole session; stopped at the end."""
    from tests.s3server import SeaweedS3

    server = SeaweedS3(session_tmp / "seaweedfs").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_server(session_tmp: Path):
    """`prefect server start` on 127.0.0.1, shared by the session's tests; stopped at the end.

    Under xdist it is the controller's (pytest_configure), shared by every worker."""
    from tests.prefect_server import PrefectServer

    shared = os.environ.get(_SHARED_API)
    if shared:
        yield PrefectServer.attach(shared, session_tmp / "prefect-server").wait()
        return
    server = PrefectServer(session_tmp / "prefect-server").start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _shared_prefect_api_answers(request):
    """In-process runs talk to the shared server: it must answer before the worker's first test."""
    if os.environ.get(_SHARED_API):
        request.getfixturevalue("prefect_server")


@pytest.fixture
def gc_collections(monkeypatch) -> list[int]:
    """Every explicit full garbage collection in this process during the test, counted (and run)."""
    import gc

    calls: list[int] = []
    real = gc.collect

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gc, "collect", counted)
    return calls


@pytest.fixture(scope="session")
def deployed_run(session_tmp: Path, prefect_server, s3_server):
    """The pipeline run by a deployment on a process worker into S3, once per session
    (tests/deployed_run.py): test_deployment checks it, test_preemption compares with it."""
    from tests.deployed_run import run_deployment

    return run_deployment(session_tmp / "deployed-run", prefect_server, s3_server)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint of the test server, in the environment only (as in production)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


# One Prefect server for the whole session, started by the xdist controller while the workers
# start and collect: each server costs ~19 CPU-s to start and ~2.5 CPU-s a minute idle, and a
# worker that ran a flow in-process kept an ephemeral API of its own besides. Its address
# reaches the workers (and every process they start) through the environment.
_SHARED_API = "FUSECHAT_TEST_PREFECT_API"


def pytest_configure(config):
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", default=None) \
            or os.environ.get(_SHARED_API):
        return
    from tests.prefect_server import PrefectServer

    server = PrefectServer(_SESSION_TMP / "prefect-server").launch()
    config.stash[_SERVER_KEY] = server
    os.environ.update({_SHARED_API: server.api, "PREFECT_API_URL": server.api,
                       "FUSECHAT_TEST_PREFECT_LOG": str(server.log)})


_SERVER_KEY = pytest.StashKey()


def pytest_unconfigure(config):
    # Prefect stops its ephemeral server at interpreter exit and logs it to a
    # stream pytest has already closed; that message is not worth a traceback.
    import logging

    logging.raiseExceptions = False
    server = config.stash.get(_SERVER_KEY, None)
    if server is not None:
        server.stop()


# Scheduling: `make test` hands whole files to two xdist workers in collection order
# (--no-loadscope-reorder), so the longest files go first and the short ones fill in around
# them (longest-processing-time-first). Approximate seconds on the 2-core CI machine; a file
# not listed is short and keeps its place after these.
_HEAVY_FILES = {
    "test_demo.py": 120, "test_chaos.py": 100, "test_dask.py": 130, "test_train.py": 80,
    "test_gpu_benchmark.py": 80, "test_run_errors.py": 55, "test_incremental.py": 30, "test_merge.py": 25,
    "test_dataset_stage.py": 20, "test_evaluate_generation.py": 18, "test_determinism.py": 15, "test_ablation.py": 14,
    "test_represent.py": 12,
}
# Files that change server-wide objects of the shared Prefect server (the work pool a worker
# polls, the deployments, the crash automation, the GPU tag's limit): one unit of work, so they
# run one after another on one xdist worker and never under each other's feet.
_SERVER_WIDE = {"test_deployment.py": 65, "test_preemption.py": 65, "test_heartbeat.py": 20}
_HEAVY_FILES.update(dict.fromkeys(_SERVER_WIDE, sum(_SERVER_WIDE.values())))


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -_HEAVY_FILES.get(item.path.name, 0))  # stable: a file's own order is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ServerWideTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "server-wide Prefect objects" if Path(scope).name in _SERVER_WIDE else scope

    return ServerWideTogether(config, log)


def pytest_collection_finish(session):
    # A worker's heap holds torch, transformers, Prefect and every test module: each full
    # collection walks all of it (0.3-0.5 s), and imports alone trigger dozens as the heap
    # grows. Import them now and freeze what exists, so later collections walk only what
    # the tests themselves create.
    import gc

    from fusechat_core.models import collection_paused

    with collection_paused():
        import prefect  # noqa: F401
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401

    gc.collect()
    gc.freeze()
