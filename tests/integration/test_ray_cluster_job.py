"""A replica on a Ray cluster of two nodes, through the real server-job code: two ``server.job.run``
processes (rank = ``SLURM_NODEID``, as srun gives it), each starting a real Ray node on this
machine, the head's engine the stand-in (vLLM's CPU build refuses Ray: "current platform cpu does
not support ray"). No Slurm: the nodes find each other through the registry folder, as on a cluster.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.engines import EngineSpec
from server.job import ServerJob, run
from server.multinode import NodeProblem, _interface_address
from server.process import log_tail
from server.ray_cluster import MARKER
from server.registry import Registry

NAMESPACE, SERVICE = "itest-ray", "standin"
# The head's engine: a Ray driver placing a rank on every node, then the stand-in (tests/ray_driver_standin.py).
COMMAND = "{python} -m tests.ray_driver_standin {nnodes} --host {host} --port {port} --model {served_name}"
START_S = 120


def shared_interface() -> str:
    """An interface whose address other nodes could reach (loopback is refused, as on a cluster)."""
    for _, name in socket.if_nameindex():
        try:
            _interface_address(name)
            return name
        except NodeProblem:
            continue
    pytest.skip("no interface with a routable IPv4 address on this machine")


def run_node(job: ServerJob, rank: int, job_id: str) -> None:
    os.environ.update(SLURM_NODEID=str(rank), SLURM_JOB_ID=job_id)
    run(job)


class RayReplica:
    def __init__(self, tmp_path: Path) -> None:
        self.job_id = f"ray{os.getpid()}{time.monotonic_ns() % 100000}"
        self.registry = Registry(tmp_path / "registry", heartbeat_s=0.5, orphan_grace_s=None)
        self.job = ServerJob(
            namespace=NAMESPACE, service=SERVICE, replica=0, registry=self.registry,
            engine=EngineSpec(served_name="m", engine="openai_command", command=COMMAND),
            log_dir=str(tmp_path / "logs"), model_path="unused", startup_timeout_s=START_S, stop_grace_s=10,
            nodes=2, advertise_interface=shared_interface(), multinode_backend="ray", advertise_host="127.0.0.1",
        )
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, as under submitit
        self.nodes = [context.Process(target=run_node, args=(self.job, rank, self.job_id), name=f"node{rank}")
                      for rank in range(2)]

    def beats(self) -> dict:
        return self.registry.nodes(NAMESPACE, SERVICE, 0, self.job_id)

    def log(self, rank: int) -> str:
        return log_tail(self.job.node_log(rank), 60)

    def start_until_ready(self) -> list[tuple[str, str]]:
        """Both nodes started, until the head's entry is ready; returns the (head, worker) states seen."""
        for node in self.nodes:
            node.start()
        seen = []
        deadline = time.monotonic() + START_S
        while True:
            beats = self.beats()
            states = (beats[0].state if 0 in beats else "-", beats[1].state if 1 in beats else "-")
            if not seen or seen[-1] != states:
                seen.append(states)
            if [e for e in self.registry.entries(NAMESPACE, SERVICE) if e.state == "ready"]:
                return seen
            for node in self.nodes:
                assert node.is_alive(), f"{node.name} exited with {node.exitcode}:\n{self.log(0)}\n{self.log(1)}"
            assert time.monotonic() < deadline, f"not ready in {START_S} s:\n{self.log(0)}\n{self.log(1)}"
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            if node.is_alive():
                node.terminate()
        for node in self.nodes:
            node.join(30)
            if node.is_alive():
                node.kill()


def ray_processes(job_id: str) -> dict[int, str]:
    """This test's Ray processes (pid: command), whatever their name: by the marker in their environment."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = environ.read_bytes().split(b"\0")
            if any(v.startswith(f"{MARKER}=".encode()) and f"-{job_id}-".encode() in v for v in env):
                cmd = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found[int(environ.parent.name)] = cmd[:80]
        except OSError:
            continue
    return found


def no_ray_left(job_id: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while left := ray_processes(job_id):
        assert time.monotonic() < deadline, f"Ray processes left: {left}"
        time.sleep(0.2)


@pytest.fixture
def replica(tmp_path):
    r = RayReplica(tmp_path)
    yield r
    r.stop()
    no_ray_left(r.job_id)
    for left in Path("/tmp").glob(f"gl-ray-*-{r.job_id}-*"):  # a node killed without cleanup leaves its own
        shutil.rmtree(left, ignore_errors=True)


def test_a_ray_replica_serves_once_both_nodes_joined_and_dies_with_a_worker_ray_node(replica):
    t0 = time.monotonic()
    seen = replica.start_until_ready()
    print(f"two-node Ray replica ready in {time.monotonic() - t0:.1f} s; node states seen: {seen}")
    # Start order: the worker started its Ray node only once the head's GCS listened.
    assert all(head in ("listening", "running") for head, worker in seen if worker == "running"), seen
    assert seen[-1] == ("running", "running"), seen
    head_log = replica.job.node_log(0).read_text()
    assert "ray nodes alive at engine start: 2" in head_log and "ranks placed on 2 distinct nodes" in head_log, \
        replica.log(0)
    assert head_log.index("ray start --block") < head_log.index("tests.ray_driver_standin")
    (entry,) = replica.registry.entries(NAMESPACE, SERVICE)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{entry.base_url}/chat/completions", json=body, timeout=10).status_code == 200

    processes = ray_processes(replica.job_id)
    print(f"{len(processes)} Ray processes of the replica: {sorted(set(c.split()[0] for c in processes.values()))}")
    # Every port a Ray process listens on is one the job picked (and free_port recorded for the node).
    pinned = set()
    for pid in processes:
        args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        if "start" in args and "--block" in args:
            pinned |= {int(args[i + 1]) for i, a in enumerate(args) if a.endswith("-port")}
            pinned |= {int(p) for p in args[args.index("--worker-port-list") + 1].split(",")}
            env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            pinned |= {int(env[k]) for k in ("AUTOSCALER_METRIC_PORT",) if k in env}
    listening = {pid: {c.laddr.port for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"}
                 for pid in processes if psutil.pid_exists(pid)}
    unpinned = {pid: (ports - pinned, Path(f"/proc/{pid}/cmdline").read_text()[:400]) for pid, ports in listening.items()
                if ports - pinned}
    assert not unpinned, unpinned
    print(f"Ray listens on {len(set().union(*listening.values()))} ports, all among the {len(pinned)} pinned")
    worker_dir = f"-{replica.job_id}-1"
    (raylet,) = [pid for pid, cmd in processes.items() if "raylet" in cmd.split()[0] and worker_dir in
                 Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(raylet, signal.SIGKILL)
    killed_at = time.monotonic()
    while replica.registry.entries(NAMESPACE, SERVICE):
        assert time.monotonic() - killed_at < 30, replica.log(1)
        time.sleep(0.05)
    dead_after = time.monotonic() - killed_at
    head = replica.nodes[0]
    head.join(30)
    print(f"worker's raylet SIGKILLed -> replica dead (entry gone) in {dead_after:.2f} s, "
          f"head's job ended (its engine and Ray node stopped) in {time.monotonic() - killed_at:.2f} s")
    assert head.exitcode not in (0, None), replica.log(0)
    assert dead_after <= 5.0  # the head does not keep the run waiting
    death = replica.registry.death_note(NAMESPACE, SERVICE, 0, replica.job_id)
    print(f"recorded death: {death}")
    assert "node 1" in death and "Ray node" in death
    replica.nodes[1].join(30)
    assert replica.nodes[1].exitcode not in (0, None)
    t1 = time.monotonic()
    no_ray_left(replica.job_id)
    print(f"no Ray process left {time.monotonic() - t1:.1f} s after both nodes ended")


def test_stopping_a_ray_replica_leaves_no_ray_process(replica):
    replica.start_until_ready()
    assert len({cmd.split()[0] for cmd in ray_processes(replica.job_id).values()}) > 3
    t0 = time.monotonic()
    for node in replica.nodes:  # as Slurm's scancel signals every task
        node.terminate()
    for node in replica.nodes:
        node.join(60)
        assert node.exitcode == 0, f"{node.name}: {node.exitcode}\n{replica.log(node.name == 'node1')}"
    print(f"stopped in {time.monotonic() - t0:.1f} s")
    no_ray_left(replica.job_id, timeout_s=1)
    assert not list(Path("/tmp").glob(f"gl-ray-*-{replica.job_id}-*"))


def test_a_worker_job_killed_takes_its_ray_node_along_and_fails_the_replica(replica):
    """The worker's server job SIGKILLed (no cleanup): the kernel stops its Ray node (parent-death
    signal), Ray's own fate sharing the rest, and the head fails the replica for the silence."""
    replica.start_until_ready()
    worker = replica.nodes[1]
    os.kill(worker.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while replica.registry.entries(NAMESPACE, SERVICE):
        assert time.monotonic() - killed_at < 30, replica.log(0)
        time.sleep(0.05)
    dead_after = time.monotonic() - killed_at
    print(f"worker's server job SIGKILLed -> replica dead in {dead_after:.2f} s: "
          f"{replica.registry.death_note(NAMESPACE, SERVICE, 0, replica.job_id)}")
    assert dead_after <= 5.0
    t0 = time.monotonic()
    deadline = t0 + 10
    while any(f"-{replica.job_id}-1" in Path(f"/proc/{pid}/environ").read_text(errors="replace")
              for pid in ray_processes(replica.job_id) if Path(f"/proc/{pid}").exists()):
        assert time.monotonic() < deadline, ray_processes(replica.job_id)
        time.sleep(0.1)
    print(f"the worker's Ray processes gone {time.monotonic() - killed_at:.1f} s after its job was killed")
