"""Stopping a run at once (SIGTERM, preemption, a drain): one process-wide stop event.

Python runs signal handlers in the main thread only, and a run's work happens in other
threads (a task runner's workers) or processes (``accelerate launch``, Dask workers).
So the flow's main thread, when a termination reaches it, calls :func:`request_stop`:
the event is set and the processes this one started are terminated. Every long loop
(optimizer steps, representation batches, merged tensors, generated answers, demo
pre-training) calls :func:`check` and leaves with :class:`Stopped`, and no artifact is
committed once the event is set (``ArtifactStore`` checks it before every write and
before the manifest), so nothing is half-committed: what is finished is kept, the rest
reads as missing and a retry resumes from it.

``Stopped`` is a ``BaseException``, like the signal that caused it: no ``except
Exception`` swallows it, and Prefect marks the task Crashed rather than retrying it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

_STOP = threading.Event()
_REASON: list[str] = []
# Child processes that must outlive a stop: this process's own ephemeral Prefect API (the
# flow reports its final state there after the stop). Matched against the command line of
# a direct child only: the API a Dask worker process started for itself goes with the
# worker, or it would run on, orphaned, once the worker is gone.
_SPARED = ("prefect.server",)


class Stopped(BaseException):
    """The run was told to stop (a termination signal); raised by the loop that noticed."""


def stopping() -> bool:
    return _STOP.is_set()


def check() -> None:
    """Raise :class:`Stopped` if the run was told to stop; call it once per unit of work."""
    if _STOP.is_set():
        raise Stopped(f"stopped: {_REASON[0] if _REASON else 'stop requested'}")


def request_stop(reason: str, *, grace: float = 5.0, exit_code: int | None = None) -> None:
    """Set the stop event and terminate this process's children (SIGTERM, then SIGKILL after ``grace``).

    ``exit_code``: also end this process with that code if it is still alive
    ``FUSECHAT_STOP_DEADLINE_S`` seconds (default 8) from now, or ``AFTER_MAIN_S`` after its
    main thread has finished (the flow reported its state): a stage stuck in a long library
    call that checks nothing (a tokenizer conversion, loading a model) cannot keep a stopped
    run alive, and the interpreter's exit, which joins every thread, does not wait for it.
    (Prefect's supervisor polls its flow-run process every 3 s: every second counts against a
    10 s drain.) Its artifacts are safe: a manifest is written last.
    """
    if not _STOP.is_set():
        _REASON.append(reason)
        _STOP.set()
        if exit_code is not None:
            _exit_after(float(os.environ.get("FUSECHAT_STOP_DEADLINE_S", "8")), exit_code)
            with contextlib.suppress(AttributeError, RuntimeError):  # RuntimeError: already exiting
                # run by the main thread's exit before it joins the others (threading's own hook,
                # as concurrent.futures and Prefect's services use; these run after this one)
                threading._register_atexit(_exit_after, AFTER_MAIN_S, exit_code)  # type: ignore[attr-defined]
    terminate_children(grace=grace)


AFTER_MAIN_S = 1.5  # what a stopped process's exit may take once its main thread is done


def _exit_after(seconds: float, code: int) -> None:
    timer = threading.Timer(seconds, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def terminate_children(grace: float = 5.0) -> None:
    import psutil

    me = os.getpid()
    try:
        children = psutil.Process(me).children(recursive=True)
    except psutil.Error:
        return
    doomed = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.ppid() == me and any(s in " ".join(child.cmdline()) for s in _SPARED):
                continue
            child.terminate()
            doomed.append(child)
    _, alive = psutil.wait_procs(doomed, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def reset() -> None:
    """Forget a stop (tests that stop a run and go on in the same process)."""
    _STOP.clear()
    _REASON.clear()


@contextlib.contextmanager
def stop_on_termination(on_stop: Callable[[], None] | None = None):
    """Around a flow's body, in its main thread: a termination (Prefect's ``TerminationSignal``
    on SIGTERM, ``KeyboardInterrupt``, ``SystemExit``) stops the whole run, not just the
    main thread's wait, before it propagates; an ordinary error does not. ``on_stop``: what
    else to do, first (the flow lets go of its task threads, so it does not wait for them,
    and tells a local Dask cluster's nannies not to restart the workers about to be
    terminated)."""
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        if not isinstance(exc, (Stopped, GeneratorExit)):
            code = 130 if isinstance(exc, KeyboardInterrupt) else 128 + 15
            try:
                if on_stop is not None:
                    on_stop()
            finally:
                request_stop(type(exc).__name__, grace=2.0, exit_code=code)
        raise


@contextlib.contextmanager
def holding(lock: threading.Lock):
    """``with lock:`` for a lock a stage may wait minutes for (one training per process):
    the wait ends with :class:`Stopped` as soon as the run is told to stop."""
    while not lock.acquire(timeout=0.2):
        check()
    try:
        check()
        yield
    finally:
        lock.release()
