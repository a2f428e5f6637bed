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

A process that serves many runs (a Dask worker of a cluster the run did not start) must not
stop as a whole when one run stops: there a task runs in a :func:`scope`, stopped with
:meth:`StopScope.stop` by whoever learns of its run's stop (``tasks._stage``). :func:`check`
and :func:`stopping` then answer for the process *and* the calling task's scope, and a
scope's stop terminates only the processes registered with it (:func:`owned`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator

_STOP = threading.Event()
_REASON: list[str] = []
# Child processes that must outlive a stop: this process's own ephemeral Prefect API (the
# flow reports its final state there after the stop). Matched against the command line of
# a direct child only: the API a Dask worker process started for itself goes with the
# worker, or it would run on, orphaned, once the worker is gone.
_SPARED = ("prefect.server",)


class Stopped(BaseException):
    """The run was told to stop (a termination signal); raised by the loop that noticed."""


class StopScope:
    """The stop of one task in a process that outlives it (see the module's docstring)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self._lock = threading.Lock()
        self._children: list[int] = []

    def stopped(self) -> bool:
        return self._event.is_set()

    def stop(self, reason: str, *, grace: float = 2.0) -> None:
        """Stop the scope's task at its next :func:`check` and terminate the processes it
        registered (with everything under them); from any thread."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            pids = list(self._children)
        _terminate_trees(pids, grace)

    def _own(self, pid: int) -> None:
        with self._lock:
            self._children.append(pid)
        if self._event.is_set():  # stopped while the process was starting
            _terminate_trees([pid], 2.0)

    def _disown(self, pid: int) -> None:
        with self._lock:
            self._children.remove(pid)


_SCOPE: contextvars.ContextVar[StopScope | None] = contextvars.ContextVar("fusechat_stop_scope", default=None)


@contextlib.contextmanager
def scope() -> Iterator[StopScope]:
    """Run the body (one task, in this thread) under a stop of its own."""
    sc = StopScope()
    token = _SCOPE.set(sc)
    try:
        yield sc
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def owned(proc: object) -> Iterator[None]:
    """A child process (a ``Popen``) that stops with the calling task's scope, if it has one
    (a process-wide stop terminates every child anyway)."""
    sc, pid = _SCOPE.get(), getattr(proc, "pid", None)
    if sc is None or pid is None:
        yield
        return
    sc._own(pid)
    try:
        yield
    finally:
        sc._disown(pid)


def stopping() -> bool:
    sc = _SCOPE.get()
    return _STOP.is_set() or (sc is not None and sc.stopped())


def check() -> None:
    """Raise :class:`Stopped` if the run was told to stop; call it once per unit of work."""
    if _STOP.is_set():
        raise Stopped(f"stopped: {_REASON[0] if _REASON else 'stop requested'}")
    sc = _SCOPE.get()
    if sc is not None and sc.stopped():
        raise Stopped(f"stopped: {sc.reason}")


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
            if not (child.ppid() == me and any(s in " ".join(child.cmdline()) for s in _SPARED)):
                doomed.append(child)
    _terminate(doomed, grace)


def _terminate_trees(pids: list[int], grace: float) -> None:
    """Each process and everything under it."""
    import psutil

    doomed = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            doomed += [*root.children(recursive=True), root]
    _terminate(doomed, grace)


def _terminate(procs: list, grace: float) -> None:
    """SIGTERM each process, SIGKILL those still alive ``grace`` seconds later."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


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
