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
import threading

_STOP = threading.Event()
_REASON: list[str] = []
# Child processes that must outlive a stop: the ephemeral Prefect API (the flow reports
# its final state there after the stop). Matched against a child's command line.
_SPARED = ("prefect.server",)


class Stopped(BaseException):
    """The run was told to stop (a termination signal); raised by the loop that noticed."""


def stopping() -> bool:
    return _STOP.is_set()


def check() -> None:
    """Raise :class:`Stopped` if the run was told to stop; call it once per unit of work."""
    if _STOP.is_set():
        raise Stopped(f"stopped: {_REASON[0] if _REASON else 'stop requested'}")


def request_stop(reason: str, *, grace: float = 5.0) -> None:
    """Set the stop event and terminate this process's children (SIGTERM, then SIGKILL after ``grace``)."""
    if not _STOP.is_set():
        _REASON.append(reason)
        _STOP.set()
    terminate_children(grace=grace)


def terminate_children(grace: float = 5.0) -> None:
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    doomed = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any(s in " ".join(child.cmdline()) for s in _SPARED):
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
def stop_on_termination():
    """Around a flow's body, in its main thread: a termination (Prefect's ``TerminationSignal``
    on SIGTERM, ``KeyboardInterrupt``, ``SystemExit``) stops the whole run, not just the
    main thread's wait, before it propagates; an ordinary error does not."""
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        if not isinstance(exc, (Stopped, GeneratorExit)):
            request_stop(type(exc).__name__)
        raise
