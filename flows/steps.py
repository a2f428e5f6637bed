"""Deployment steps of our own, for ``prefect.yaml``.

``enter_repo_dir`` is the ``pull`` step: it reads ``FUSECHAT_REPO_DIR`` from the
environment of the process that runs the flow, when it runs. Prefect's own
``set_working_directory`` with ``{{ $FUSECHAT_REPO_DIR }}`` would template the
variable once, at ``prefect deploy`` time, freezing the deploying machine's path
into the deployment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "FUSECHAT_REPO_DIR"


def enter_repo_dir(env: str = ENV) -> dict[str, str]:
    """Change into the fusechat checkout named by ``$env`` on this worker; returns it as
    ``directory`` (as ``set_working_directory`` does)."""
    value = os.environ.get(env)
    if not value:
        raise ValueError(f"{env} is not set on this worker: set it to the fusechat checkout's folder")
    repo = Path(value).expanduser().resolve()
    if not (repo / "flows" / "pipeline.py").is_file():
        raise ValueError(f"{env}={value}: no fusechat checkout there (no flows/pipeline.py)")
    os.chdir(repo)
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    return {"directory": str(repo)}
