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
from typing import Iterator

import pytest

from launcher.executors import LocalBackend, Resources
from launcher.spec import ClusterSpec
from server.job import ServerJob, run
from server.registry import Entry, Registry
from tests.support import SLURM_SCRIPTS, cpu_engine, queued

DEFAULT_SLURM_DIR = Path(os.environ.get("GYMLAUNCH_SLURM_DIR", "/tmp/gymlaunch-slurm"))
DEFAULT_MULTI_DIR = Path(os.environ.get("GYMLAUNCH_SLURM_MULTI_DIR", "/tmp/gymlaunch-slurm-multi"))


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    os.environ["GYMLAUNCH_REGISTRY_ROOT"] = str(root)  # for launcher subprocesses too
    return root


@pytest.fixture(scope="session")
def policy_server(tmp_path_factory, registry_root) -> Entry:
    """One shared replica for the tests that only talk to an endpoint."""
    yield from _replica(tmp_path_factory, registry_root, "itest", "policy", cpu_engine())


@pytest.fixture(scope="module")
def dev_mode_server(tmp_path_factory, registry_root) -> Entry:
    """A replica whose vLLM serves its dev and RL routes too (``VLLM_SERVER_DEV_MODE=1``: /pause,
    /collective_rpc, /sleep, /update_weights, ...), as weight updates in place need."""
    yield from _replica(tmp_path_factory, registry_root, "itest-dev", "policy",
                        cpu_engine(env={"VLLM_SERVER_DEV_MODE": "1"}))


def _replica(tmp_path_factory, registry_root: Path, namespace: str, service: str, engine) -> Iterator[Entry]:
    """A replica started as the launcher starts it, with a key for its namespace (as every run has)."""
    folder = tmp_path_factory.mktemp(f"{namespace}-server")
    key_file = Registry(registry_root).create_api_key(namespace)
    job_spec = ServerJob(
        namespace=namespace, service=service, replica=0, engine=engine,
        registry=Registry(registry_root, heartbeat_s=1.0, orphan_grace_s=None),
        log_dir=str(folder / "logs"), embedded_model="smollm2_135m", startup_timeout_s=600,
        api_key_file=str(key_file),
    )
    backend = LocalBackend(ClusterSpec(kind="local"), folder / "submitit")
    job = backend.submit(run, job_spec, Resources(name=f"{namespace}-{service}", timeout_min=60))
    registry = Registry(registry_root, ttl_s=10)
    deadline = time.monotonic() + 600
    try:
        while not registry.ready(service, namespace):
            if job.done():
                pytest.fail(f"{namespace} server job died:\n{backend.log_tail(job)}\n"
                            f"{job_spec.engine_log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"{namespace} server not ready in 600 s"
            time.sleep(0.5)
        yield registry.ready(service, namespace)[0]
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


def _start(script: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], float]:
    """Runs tests/slurm/<script>, a start script (idempotent: it applies a changed configuration to a
    running cluster, else returns in under a second): the `export` lines it printed, and its time."""
    t0 = time.monotonic()
    started = subprocess.run([str(SLURM_SCRIPTS / script)], capture_output=True, text=True, timeout=900, env=env)
    took = time.monotonic() - t0
    if started.returncode:
        pytest.fail(f"tests/slurm/{script} failed ({started.returncode}):\n{started.stderr[-6000:]}")
    exports = _exports(started.stdout)
    assert "SLURM_CONF" in exports, started.stdout
    return exports, took


def _stop_unless_shared(cluster: SlurmCluster, script: str) -> None:
    """The end of the session that started ``cluster``: tests/slurm/<script> stops it, unless someone
    else's jobs run on it meanwhile (then it is not pulled from under them)."""
    env = {**os.environ, **cluster.env}
    foreign = [j for j in queued(env) if j.split("_")[0] not in cluster.job_ids]
    if foreign:
        print(f"\n[slurm] left running: jobs {foreign} are not this session's; stop it with "
              f"tests/slurm/{script}", file=sys.stderr)
    else:
        stopped = subprocess.run([str(SLURM_SCRIPTS / script)], capture_output=True, text=True, timeout=300, env=env)
        assert stopped.returncode == 0, stopped.stderr


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
                    _start("start.sh", env)
                for key, value in extra.items():
                    mp.setenv(key, value)
                yield SlurmCluster(env=extra, started_here=False, start_s=None)
                return
        env, start_s = _start("start.sh")
        for key, value in env.items():
            mp.setenv(key, value)
        print(f"\n[slurm] start.sh took {start_s:.1f} s", file=sys.stderr)
        cluster = SlurmCluster(env=env, started_here=True, start_s=start_s)
        try:
            yield cluster
        finally:
            _stop_unless_shared(cluster, "stop.sh")


# --- the multi-node Slurm cluster (tests/slurm/start-multinode.sh) ----------------------------
#
# It runs beside the single-node cluster, and the session fixture leaves os.environ alone: the
# single-node cluster's tests (submitit, the launcher in-process, squeue in helpers) read SLURM_CONF
# from os.environ, and tests of both kinds run in one session in any order. A multi-node test either
# passes ``slurm_multinode.environ`` to the subprocesses it starts, or asks for ``on_slurm_multinode``,
# which points os.environ at this cluster for that one test (pytest runs tests one at a time).


@dataclass
class SlurmNode:
    name: str  # Slurm's NodeName, and the hostname jobs on it see: n1, n2, ...
    address: str  # on the bridge (Slurm's NodeAddr): the host and every node reach it
    unreachable_address: str  # on the node's gldummy0: reachable on that node only (a wrong interface)
    netns: str  # its network namespace: `nsenter --net=/var/run/netns/<netns> CMD` runs CMD on its network


@dataclass
class SlurmMultinode(SlurmCluster):
    nodes: list[SlurmNode] = field(default_factory=list)  # n1 first
    partition: str = ""  # the partition of all nodes (the default)
    cpus_per_node: int = 0
    gpus_per_node: int = 0  # fake GPUs (gres gpu), CUDA_VISIBLE_DEVICES set as on a GPU cluster
    host_address: str = ""  # this machine on the bridge (slurmctld's address); nodes see the host from it

    @property
    def environ(self) -> dict[str, str]:
        """os.environ with this cluster's SLURM_CONF: for subprocesses that talk to it."""
        return {**os.environ, **self.env}


def _read_layout(folder: Path) -> tuple[dict[str, str], list[SlurmNode]]:
    """What start-multinode.sh built, as it recorded it: etc/layout (KEY=VALUE) and etc/nodes."""
    layout = {}
    for line in (folder / "etc" / "layout").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            layout[key] = value
    nodes = [SlurmNode(*line.split()) for line in (folder / "etc" / "nodes").read_text().splitlines() if line]
    return layout, nodes


@pytest.fixture(scope="session")
def slurm_multinode():
    """The multi-node cluster (n1, n2: one network namespace, hostname and address each; 4 CPUs and
    2 gres GPUs per node; partition `multi`): the one start-multinode.sh left running in its folder,
    else started here and stopped at the end (pass or fail) with stop-multinode.sh."""
    own = {"SLURM_CONF": str(DEFAULT_MULTI_DIR / "etc" / "slurm.conf"),
           "GYMLAUNCH_SLURM_MULTI_DIR": str(DEFAULT_MULTI_DIR)}
    running = Path(own["SLURM_CONF"]).exists() and _answers({**os.environ, **own})
    env, start_s = _start("start-multinode.sh", {**os.environ, **own})  # running: applies a changed configuration
    if not running:
        print(f"\n[slurm multi] start-multinode.sh took {start_s:.1f} s", file=sys.stderr)
    layout, nodes = _read_layout(Path(env["GYMLAUNCH_SLURM_MULTI_DIR"]))
    cluster = SlurmMultinode(env=env, started_here=not running, start_s=None if running else start_s, nodes=nodes,
                             partition=layout["PARTITION"], host_address=layout["HOST_ADDRESS"],
                             cpus_per_node=int(layout["CPUS_PER_NODE"]), gpus_per_node=int(layout["GPUS_PER_NODE"]))
    try:
        yield cluster
    finally:
        if cluster.started_here:
            _stop_unless_shared(cluster, "stop-multinode.sh")


@pytest.fixture
def on_slurm_multinode(slurm_multinode, monkeypatch):
    """``slurm_multinode``, with os.environ pointing at it for this test only (submitit and the
    launcher run in-process read SLURM_CONF there); restored after it."""
    for key, value in slurm_multinode.env.items():
        monkeypatch.setenv(key, value)
    return slurm_multinode


@pytest.fixture(autouse=True)
def _no_slurm_job_outlives_its_test(request):
    """A Slurm test whose launcher was killed by a failed assertion leaves its jobs queued; they
    would hold the test node's CPUs until their time limit and stall every later test (CI saw a
    10-minute wait). Jobs that appeared during the test and are still queued a little after it are
    cancelled here, and named, so the leak is visible rather than silent. On each cluster the test
    used (single-node, multi-node)."""
    clusters = [request.getfixturevalue(name) for name in ("slurm_cluster", "slurm_multinode")
                if name in request.fixturenames]
    before = {id(c): {j.split("_")[0] for j in queued(c.env)} for c in clusters}
    yield
    for cluster in clusters:
        deadline = time.monotonic() + 20  # a normal teardown's scancel takes a moment to empty the queue
        while (left := [j for j in queued(cluster.env) if j.split("_")[0] not in before[id(cluster)]]) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            cluster.job_ids.update(j.split("_")[0] for j in left)
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in left})], capture_output=True,
                           env={**os.environ, **cluster.env})
            print(f"\n[slurm] cancelled jobs {left} that outlived {request.node.name}", file=sys.stderr)
