"""Fixtures every test module may use, and the ``integration`` marker: every test under
tests/integration/ gets it here, so ``pytest -m "not integration"`` runs the quick tests only."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.standin import Faults, StandIn
from tests.support import MODEL

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def standins():
    """``start(count, api_key=None, **faults)``: that many stand-in servers (server/standin.py)
    on threads, serving MODEL, each with its own ``Faults(**faults)``; all stopped at the end."""
    started: list[StandIn] = []

    def start(count: int = 1, api_key: str | None = None, **faults) -> list[StandIn]:
        servers = [StandIn(model=MODEL, api_key=api_key, faults=Faults(**faults)).start() for _ in range(count)]
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop()
