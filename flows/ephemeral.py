"""The ephemeral Prefect API dies with the process that started it.

Without a server, Prefect starts its API as a child process (uvicorn) and stops it
at interpreter exit. A ``kill -9`` of ``fusechat`` skips the exit, and the API ran
on forever. Prefect may start it from any thread (an events worker, a task's thread),
so ``PR_SET_PDEATHSIG`` (which fires when the *thread* that forked ends) would kill it
too early. Instead the child watches its parent: ``guard_ephemeral_server()`` makes
Prefect start uvicorn through this module, which polls its parent process id and,
when the parent is gone, stops uvicorn (SIGTERM: it closes the database cleanly),
then exits for certain.

    python -m flows.ephemeral PARENT_PID uvicorn-arguments...
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from typing import Any

POLL_S = 0.2  # how soon a dead parent is noticed
GRACE_S = 5.0  # how long uvicorn may take to stop before the process exits anyway


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown
    time.sleep(GRACE_S)
    os._exit(1)


def guard_ephemeral_server() -> None:
    """Make Prefect start its ephemeral API under this module's parent watch (idempotent).

    Nothing to guard where an API is configured (a server, Prefect Cloud): Prefect starts no
    ephemeral one then, and importing its server module costs about 4 s of CPU per start."""
    import subprocess

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    if getattr(server.subprocess, "fusechat_guarded", False):
        return

    def popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
        if list(args[1:3]) == ["-m", "uvicorn"]:
            args = [args[0], "-m", __name__, str(os.getpid()), *args[3:]]
        return subprocess.Popen(args, **kwargs)

    # Only the server module sees this Popen; the rest of the process keeps the real one.
    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    shim.Popen = popen
    shim.fusechat_guarded = True
    server.subprocess = shim


def main(argv: list[str]) -> None:
    parent, args = int(argv[0]), argv[1:]
    if os.getppid() != parent:  # the parent died before this process got here
        sys.exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    import runpy

    sys.argv = ["uvicorn", *args]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
