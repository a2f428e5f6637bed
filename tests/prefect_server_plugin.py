"""The session's Prefect server as a fixture (``pytest_plugins = ["tests.prefect_server_plugin"]``).

A plugin of its own, not conftest.py, so only the tests that need a server start one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer


@pytest.fixture(scope="session")
def prefect_server(session_tmp: Path):
    """`prefect server start` on 127.0.0.1 for the whole session; stopped at the end."""
    server = PrefectServer(session_tmp / "prefect-server").start()
    yield server
    server.stop()
