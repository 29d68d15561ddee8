"""Fixtures every test module may use, and the ``integration`` marker: every test under
tests/integration/ gets it here, so ``pytest -m "not integration"`` runs the quick tests only."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.standin import Faults, StandIn
from tests.gym import provision
from tests.support import MODEL, ROOT

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


# --- real NeMo Gym (tests/gym/provision.py) -------------------------------------------------------

# The fixture for each Gym line the suite runs, and the release it installs.
GYM_VERSIONS = {"nemo_gym": "0.4.0", "nemo_gym_07": "0.7.0"}


@dataclass
class NemoGym:
    version: str
    bin: Path  # ng_run, ng_collect_rollouts
    ng_run_args: list[str]  # the provisioned server venvs and uv cache
    env: dict[str, str]  # more environment for Gym's programs (job.env)
    waited_s: float  # how long the test that first needed it waited


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provisioning starts as soon as a selected test needs Gym, in the background: a cold install
    (minutes) overlaps the tests that run before it; the ``nemo_gym*`` fixtures wait for it. The
    versions one after the other (one process): on 2 cores two installs at once would only slow
    the tests running meanwhile."""
    if session.config.option.collectonly:
        return
    needed = [version for fixture, version in GYM_VERSIONS.items()
              if any(fixture in getattr(item, "fixturenames", ()) for item in session.items)]
    if needed:
        log = tempfile.TemporaryFile("w+")  # its progress and timings, read back by the fixtures
        # Niced: the tests running meanwhile (a replica replaced while a collection lasts) keep the cores.
        session.config.stash[_GYM_KEY] = (subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-m", "tests.gym.provision", *needed], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=log, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        ), log, time.monotonic())


_GYM_KEY = pytest.StashKey[tuple]()


def _gym(pytestconfig, version: str) -> NemoGym:
    """NeMo Gym ``version`` installed and cached (tests/gym/provision.py); fails, with the
    provisioning's log, when it cannot be."""
    provisioning, log, started = pytestconfig.stash[_GYM_KEY]
    t0 = time.monotonic()
    provisioning.wait()
    waited_s = time.monotonic() - t0
    log.seek(0)
    told = log.read()
    assert provisioning.returncode == 0, f"provisioning NeMo Gym failed:\n{told}"
    print(f"\n[gym] {told.strip()}; provisioning took {time.monotonic() - started:.1f} s from session start, "
          f"this test waited {waited_s:.1f} s for it", file=sys.stderr)
    return NemoGym(version, provision.current(version) / "venv" / "bin", provision.ng_run_overrides(version),
                   provision.gym_env(version), waited_s)


@pytest.fixture(scope="session")
def nemo_gym(pytestconfig) -> NemoGym:
    return _gym(pytestconfig, GYM_VERSIONS["nemo_gym"])


@pytest.fixture(scope="session")
def nemo_gym_07(pytestconfig) -> NemoGym:
    return _gym(pytestconfig, GYM_VERSIONS["nemo_gym_07"])


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
