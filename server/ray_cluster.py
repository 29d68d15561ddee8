"""A Ray cluster per replica (``server.multinode_backend: ray``).

Every node of the replica's job runs a Ray node (``ray start --block``) as its long-running child,
through ``server.process`` like any engine: the head the cluster's head, the workers one each that
join it. The engine runs on the head alone, as a Ray driver (vLLM ``--distributed-executor-backend
ray``), and Ray places its ranks on the nodes. The order is mp's (server/multinode.py): the head's
GCS port takes connections, then the workers check they reach it and start theirs; the head starts
the engine once Ray counts every node alive.

Ports: every port a Ray node opens is given, none left to Ray's defaults (6379, 8265, 10001, the
autoscaler's 44217, ...) nor to its random picks, and each comes from ``server.job.free_port``,
which remembers picks per node: two replicas' Ray nodes on one shared node never collide. Workers'
ports are an explicit list. (``--include-dashboard=false`` still starts a minimal dashboard: its
port is given too.)
Each node has its own ``--temp-dir``, short: Ray's Unix sockets live under it, and a socket path
longer than 107 bytes cannot be bound.

Stopping: ``ray stop`` stops every Ray process of the user on the node, another replica's too, so
it is never used. ``ray start --block`` keeps the GCS, the raylet, their agents and monitors in its
own process group, which ``process.stop`` signals (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``:
it then stops them at once instead of draining for 30 s); the raylet's workers (``ray::IDLE``, an
engine's actors) have process groups of their own and die with the raylet (Ray's fate sharing).
Whatever is left anyway carries this node's marker in its environment and is killed by it (after
a raylet killed with SIGKILL, one of its workers outlived the group: measured).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from server import process, programs
from server.engines import RAY_ENV, EngineLaunch, host_port
from server.multinode import NodeProblem

# In every Ray process of a node (the raylet hands its environment down to its workers): how the
# sweep after stopping finds them, whatever their command line says (workers rename theirs).
MARKER = "GYMLAUNCH_RAY_NODE"
# Worker processes a node may run at once, beyond one per CPU and GPU (Ray's prestarted workers, an
# engine's actors): each takes a port of the list.
_SPARE_WORKER_PORTS = 8
# The longest temp dir whose sockets (<dir>/session_<date>_<time>_<pid>/sockets/plasma_store, 63
# bytes more) still fit in a Unix socket's 107 bytes.
_TEMP_DIR_MAX = 44
_HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")
_NODE_PORTS = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
               "dashboard-agent-listen-port", "runtime-env-agent-port")


def find_ray(env: Mapping[str, str], setup: Sequence[str] = ()) -> programs.Found:
    """The ``ray`` program a server job starts: the one beside its Python first (the Ray its engine
    imports: a cluster and its driver must be the same version), else on ``PATH``."""
    return programs.find("ray", env=env, shell_setup=setup, path_first=str(Path(sys.executable).parent))


def program(env: Mapping[str, str]) -> str:
    """``find_ray``'s path on this node (its setup lines already ran: this is the job), or NodeProblem."""
    found = find_ray(env)
    if not found.path:
        raise NodeProblem(f"server.multinode_backend: ray, but this node cannot start a Ray node: "
                          f"{programs.why_not('ray', found, cwd=None, cwd_key='', setup_key=None)}")
    return found.path


def missing(env: Mapping[str, str], setup: Sequence[str], setup_key: str | None) -> str | None:
    """Why a server job could not run a Ray node here, or None. Its supervisor imports ``ray`` too
    (to count the cluster's nodes), with this Python."""
    found = find_ray(env, setup)
    if not found.path:
        return programs.why_not("ray", found, cwd=None, cwd_key="", setup_key=setup_key)
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"{sys.executable} cannot import ray ({e})"
    return None


@dataclass
class RayNode:
    """How this node starts its Ray node, and where it keeps its files."""

    argv: list[str]
    env: dict[str, str]
    temp_dir: Path
    gcs_port: int  # the head's: the cluster's address is head_addr:gcs_port

    @classmethod
    def plan(cls, program: str, addr: str, job_key: str, rank: int, pick: Callable[[str], int],
             head: tuple[str, int] | None = None) -> "RayNode":
        """The head's node (``head`` None) or a worker's joining ``head`` (address, GCS port).
        ``pick(addr)`` gives a free port of this node; ``job_key`` names the job, for the temp dir."""
        cpus, gpus = resources()
        names = _NODE_PORTS + (_HEAD_PORTS if head is None else ())
        ports = {name: pick(addr) for name in names}
        workers = [pick(addr) for _ in range(cpus + gpus + _SPARE_WORKER_PORTS)]
        temp_dir = temp_dir_for(job_key, rank)
        argv = [program, "start", "--block", "--node-ip-address", addr, "--temp-dir", str(temp_dir),
                "--num-cpus", str(cpus), "--num-gpus", str(gpus), "--disable-usage-stats",
                "--worker-port-list", ",".join(map(str, workers))]
        if head is None:
            argv += ["--head", "--include-dashboard=false"]
        else:
            argv += ["--address", host_port(*head)]
        for name, port in ports.items():
            argv += [f"--{name}", str(port)]
        env = {**RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", MARKER: str(temp_dir)}
        if head is None:  # the head's autoscaler monitor serves metrics on a port no flag sets (44217)
            env["AUTOSCALER_METRIC_PORT"] = str(pick(addr))
        return cls(argv, env, temp_dir, ports.get("port") or head[1])

    def launch(self) -> EngineLaunch:
        """Started as an engine is (``server.process``): the Ray node is this node's long-running child."""
        return EngineLaunch(self.argv, self.env)

    def stop(self, proc: subprocess.Popen, grace_s: float) -> None:
        """Stop this node's Ray processes, and only them (module docstring); remove its temp dir."""
        process.stop(proc, grace_s)
        process.kill_marked(MARKER, str(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def resources() -> tuple[int, int]:
    """The CPUs and GPUs this job has on this node: its CPU affinity (Slurm binds a job to its
    cores), and the GPUs Slurm made visible to it; Ray's own detection would count the node's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return len(os.sched_getaffinity(0)), len([d for d in visible.split(",") if d.strip()])


def temp_dir_for(job_key: str, rank: int) -> Path:
    """This node's Ray temp dir: the job's temp folder if its path is short enough, else /tmp."""
    name = f"gl-ray-{os.getuid()}-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_key)}-{rank}"
    path = Path(tempfile.gettempdir()) / name
    return path if len(str(path)) <= _TEMP_DIR_MAX else Path("/tmp") / name


def alive_nodes(address: str, timeout_s: float = 5.0) -> int:
    """How many nodes the Ray cluster at ``address`` (its GCS) counts alive. Asked of the GCS
    directly: ``ray.nodes()`` would first connect a driver (seconds, and a job in the cluster's
    books), ``ray status`` needs its autoscaler's report (empty for the first seconds)."""
    from ray._raylet import GcsClient
    from ray.core.generated.gcs_pb2 import GcsNodeInfo
    from ray.exceptions import RpcError

    try:
        infos = GcsClient(address=address).get_all_node_info(timeout=timeout_s)
    except RpcError:  # the GCS is busy starting: none counted yet (its own process is watched)
        return 0
    return sum(info.state == GcsNodeInfo.ALIVE for info in infos.values())
