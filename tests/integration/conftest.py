"""Integration fixtures: a real vLLM (CPU build) serving the embedded SmolLM2, started as
the launcher starts it (a submitit local job running ``server.job.run``)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launcher.executors import LocalBackend, Resources
from launcher.spec import ClusterSpec
from server.job import ServerJob, run
from server.registry import Entry, Registry
from tests.support import SLURM_SCRIPTS, cpu_engine, queued

DEFAULT_SLURM_DIR = Path(os.environ.get("GYMLAUNCH_SLURM_DIR", "/tmp/gymlaunch-slurm"))


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    os.environ["GYMLAUNCH_REGISTRY_ROOT"] = str(root)  # for launcher subprocesses too
    return root


@pytest.fixture(scope="session")
def policy_server(tmp_path_factory, registry_root) -> Entry:
    """One shared replica for the tests that only talk to an endpoint."""
    folder = tmp_path_factory.mktemp("policy-server")
    key_file = Registry(registry_root).create_api_key("itest")  # as every launcher run does by default
    job_spec = ServerJob(
        namespace="itest", service="policy", replica=0, engine=cpu_engine(),
        registry=Registry(registry_root, heartbeat_s=1.0, orphan_grace_s=None),
        log_dir=str(folder / "logs"), embedded_model="smollm2_135m", startup_timeout_s=600,
        api_key_file=str(key_file),
    )
    backend = LocalBackend(ClusterSpec(kind="local"), folder / "submitit")
    job = backend.submit(run, job_spec, Resources(name="itest-policy", timeout_min=60))
    registry = Registry(registry_root, ttl_s=10)
    deadline = time.monotonic() + 600
    try:
        while not registry.ready("policy", "itest"):
            if job.done():
                pytest.fail(f"shared server job died:\n{backend.log_tail(job)}\n{job_spec.engine_log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "shared server not ready in 600 s"
            time.sleep(0.5)
        yield registry.ready("policy", "itest")[0]
    finally:
        backend.cancel(job)
        deadline = time.monotonic() + 60
        while not backend.finished(job) and time.monotonic() < deadline:
            time.sleep(0.2)


# --- the Slurm cluster (tests/slurm/start.sh) ---------------------------------------------


@dataclass
class SlurmCluster:
    env: dict[str, str]  # what callers need in the environment (SLURM_CONF, ...)
    started_here: bool  # this session started it (and stops it at the end)
    start_s: float | None  # how long start.sh took, when it ran
    job_ids: set[str] = field(default_factory=set)  # every job this session submitted


def _answers(env: dict[str, str]) -> bool:
    """A cluster answers: sinfo lists a node and sacct (accounting) replies."""
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
        if nodes.returncode or not nodes.stdout.strip():
            return False
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minute"], env=env, capture_output=True, timeout=15)
        return acct.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _exports(stdout: str) -> dict[str, str]:
    """The `export K=V` lines start.sh prints last."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            found[key] = shlex.split(value)[0] if value else ""
    return found


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster with accounting and 4 gres GPUs: the one that answers already (the
    caller's SLURM_CONF, or one start.sh left running in the default folder), else one
    started here with tests/slurm/start.sh and stopped at the end with tests/slurm/stop.sh."""
    own_conf = DEFAULT_SLURM_DIR / "etc" / "slurm.conf"
    candidates = []
    if os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists():
        candidates.append({})
    if own_conf.exists():
        candidates.append({"SLURM_CONF": str(own_conf), "GYMLAUNCH_SLURM_DIR": str(DEFAULT_SLURM_DIR)})
    with pytest.MonkeyPatch.context() as mp:
        for extra in candidates:
            env = {**os.environ, **extra}
            if _answers(env):
                if env.get("SLURM_CONF") == str(own_conf):
                    # start.sh's own cluster, maybe started by an older start.sh: it applies a changed
                    # configuration (restarts the daemons), else returns in under a second.
                    started = subprocess.run([str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True,
                                             timeout=900, env=env)
                    if started.returncode:
                        pytest.fail(f"tests/slurm/start.sh failed ({started.returncode}):\n{started.stderr[-6000:]}")
                for key, value in extra.items():
                    mp.setenv(key, value)
                yield SlurmCluster(env=extra, started_here=False, start_s=None)
                return
        t0 = time.monotonic()
        started = subprocess.run([str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=900)
        start_s = time.monotonic() - t0
        if started.returncode:
            pytest.fail(f"tests/slurm/start.sh failed ({started.returncode}):\n{started.stderr[-6000:]}")
        env = _exports(started.stdout)
        assert "SLURM_CONF" in env, started.stdout
        for key, value in env.items():
            mp.setenv(key, value)
        print(f"\n[slurm] start.sh took {start_s:.1f} s", file=sys.stderr)
        cluster = SlurmCluster(env=env, started_here=True, start_s=start_s)
        try:
            yield cluster
        finally:
            foreign = [j for j in queued() if j.split("_")[0] not in cluster.job_ids]
            if foreign:  # someone else is using the cluster meanwhile: do not pull it from under them
                print(f"\n[slurm] left running: jobs {foreign} are not this session's; stop it with "
                      f"tests/slurm/stop.sh", file=sys.stderr)
            else:
                stopped = subprocess.run([str(SLURM_SCRIPTS / "stop.sh")], capture_output=True, text=True, timeout=300)
                assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(autouse=True)
def _no_slurm_job_outlives_its_test(request):
    """A Slurm test whose launcher was killed by a failed assertion leaves its jobs queued; they
    would hold the test node's CPUs until their time limit and stall every later test (CI saw a
    10-minute wait). Jobs that appeared during the test and are still queued a little after it are
    cancelled here, and named, so the leak is visible rather than silent."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("slurm_cluster")
    before = {j.split("_")[0] for j in queued()}
    yield
    deadline = time.monotonic() + 20  # a normal teardown's scancel takes a moment to empty the queue
    while (left := [j for j in queued() if j.split("_")[0] not in before]) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        cluster.job_ids.update(j.split("_")[0] for j in left)
        subprocess.run(["scancel", *sorted({j.split("_")[0] for j in left})], capture_output=True)
        print(f"\n[slurm] cancelled jobs {left} that outlived {request.node.name}", file=sys.stderr)
