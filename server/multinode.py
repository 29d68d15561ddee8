"""The nodes of a replica that spans several (``server.nodes_per_replica`` > 1).

One Slurm job of N nodes, one task per node (srun), runs ``server.job.run`` on every node. Rank 0
is the head: it starts its engine, waits until the engine's distributed port takes connections,
and only then do the workers start theirs, headless, pointed at the head's address. Only the head
publishes a registry entry and serves HTTP.

The nodes watch each other through beats on the shared filesystem (``Registry.publish_node``):
a head whose tensor- or pipeline-parallel peer died keeps answering /health and hangs every
request (measured with vLLM's CPU build), so the head cannot tell from its own engine; it reads
its workers' beats instead, and a worker that dies says so in its beat before it exits.

Addresses: a worker must reach the head at an address both share. ``cluster.advertise_interface``
names the interface whose IPv4 address each node uses; unset, a node uses the address Slurm
itself reaches it at (``NodeAddr`` of ``scontrol show node``), never a loopback or link-local
one (a hostname resolving to 127.0.1.1 or an IPv6 link-local address breaks other launchers).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from server import process
from server.engines import NodeRole
from server.registry import NodeBeat, Registry, hiccup_tolerated

# A node rewrites its beat this often; a beat older than STALE_S is a node lost (its process,
# or the node, gone without a word). Both well under the 5 s in which a broken replica must be
# declared dead, with room for a node busy loading weights on few cores.
BEAT_S = 1.0
STALE_S = 4.0
POLL_S = 0.5
# How long a worker tries to open a TCP connection to the head's distributed port before it
# declares the head unreachable (the head already listens when workers try).
REACH_S = 5.0
_SIOCGIFADDR = 0x8915

log = logging.getLogger(__name__)


class NodeProblem(RuntimeError):
    """A node of the group cannot work; the message says which node, what and which setting."""


@dataclass
class NodeGroup:
    """This node's place in its replica's group, and its view of the others."""

    registry: Registry
    namespace: str
    service: str
    replica: int
    job_id: str
    rank: int
    nnodes: int
    addr: str
    beat: NodeBeat
    _said: float = 0.0  # monotonic time of the last beat

    @classmethod
    def join(cls, registry: Registry, namespace: str, service: str, replica: int, job_id: str, nnodes: int,
             interface: str | None, log_of: Callable[[int], str]) -> "NodeGroup":
        """This node's place (rank = srun's node index), beating ``starting``; ``log_of(rank)``: its engine log."""
        rank = int(os.environ.get("SLURM_NODEID", "0"))
        addr = node_address(interface)
        beat = NodeBeat(rank=rank, host=socket.gethostname(), addr=addr, pid=os.getpid(), state="starting",
                        heartbeat_at=time.time(), log=log_of(rank))
        group = cls(registry, namespace, service, replica, job_id, rank, nnodes, addr, beat)
        group.say()
        return group

    def say(self, **changes) -> None:
        """Publish this node's beat again, with ``changes`` applied."""
        for key, value in changes.items():
            setattr(self.beat, key, value)
        self.registry.publish_node(self.namespace, self.service, self.replica, self.job_id, self.beat)
        self._said = time.monotonic()

    def keep_alive(self) -> None:
        """Beat again if BEAT_S passed since the last word (callers look more often than that). A
        beat lost to a shared-filesystem hiccup is tried again at the next look: the others judge a
        node by STALE_S of silence, not by one missed beat."""
        if time.monotonic() - self._said >= BEAT_S:
            with hiccup_tolerated(f"node {self.rank}'s beat"):
                self.say()

    def leave(self) -> None:
        self.registry.remove_node(self.namespace, self.service, self.replica, self.job_id, self.rank)

    def others(self) -> dict[int, NodeBeat]:
        beats = self.registry.nodes(self.namespace, self.service, self.replica, self.job_id)
        beats.pop(self.rank, None)
        return beats

    def role(self, head: NodeBeat, backend: str = "mp") -> NodeRole:
        return NodeRole(rank=self.rank, nnodes=self.nnodes, head_addr=head.addr, dist_port=head.dist_port,
                        own_addr=self.addr, backend=backend)

    # ---------------------------------------------------------------- the head's view

    def broken_worker(self, all_started: bool) -> str | None:
        """Why the group is broken, from the workers' beats: one dead, one silent for STALE_S, or
        (``all_started``: the head's engine is up, so every worker joined) one missing."""
        beats = self.others()
        now = time.time()
        for rank in range(1, self.nnodes):
            beat = beats.get(rank)
            if beat is None:
                if all_started:
                    return f"node {rank} of {self.nnodes} has no beat (its task is gone)"
                continue
            if beat.state == "dead":
                return f"node {rank} ({beat.host}, {beat.addr}): {beat.reason}"
            if not beat.is_fresh(STALE_S, now):
                return (f"node {rank} ({beat.host}, {beat.addr}) silent for {now - beat.heartbeat_at:.1f} s "
                        f"(lost, or its server job killed)")
        return None

    # ---------------------------------------------------------------- a worker's view

    def head(self) -> NodeBeat | None:
        return self.others().get(0)

    def head_gone(self) -> str | None:
        head = self.head()
        if head is None:
            return "the head's beat is gone (it stopped)"
        if head.state == "dead":
            return f"the head died: {head.reason}"
        if not head.is_fresh(STALE_S):
            return f"the head ({head.host}) silent for {time.time() - head.heartbeat_at:.1f} s"
        return None

    def check_reach(self, head: NodeBeat, interface: str | None) -> None:
        """A TCP connection to the head's distributed port opens, or NodeProblem naming the address
        and the setting that chose it (a timeout deep inside the engine says neither)."""
        deadline = time.monotonic() + REACH_S
        while True:
            try:
                with socket.create_connection((head.addr, head.dist_port), timeout=min(2.0, REACH_S)):
                    return
            except OSError as e:
                if time.monotonic() >= deadline:
                    chosen = (f"the address of interface {interface!r} on the head (cluster.advertise_interface)"
                              if interface else "the address Slurm reaches the head at (its NodeAddr)")
                    raise NodeProblem(
                        f"node {self.rank} ({self.beat.host}, {self.addr}) cannot reach the head "
                        f"{head.host} at {head.addr}:{head.dist_port}, {chosen}: {e}; set "
                        f"cluster.advertise_interface to an interface every node of the partition shares "
                        f"(null: Slurm's NodeAddr)") from None
                time.sleep(0.2)


def log_tails(beats: dict[int, NodeBeat], lines: int = 20) -> str:
    """Every node's engine log tail, head first: the report of a broken group."""
    return "\n".join(f"--- node {rank} ({b.host}) {b.log}:\n{process.log_tail(b.log, lines)}"
                     for rank, b in sorted(beats.items()) if b.log)


def advertised_host(advertise_host: str | None, interface: str | None) -> str:
    """The host a job writes into its registry URL: ``cluster.advertise_host``, else the address of
    ``cluster.advertise_interface`` (where node names do not resolve), else the node's hostname."""
    return advertise_host or (node_address(interface) if interface else socket.gethostname())


def listen_address(advertised: str) -> str:
    """Where a job listens when ``cluster.bind_host`` is null: the address its advertised host (the
    one in its registry URL) has on this node (a name: its IPv4 address, as ``node_address``), so
    that it serves there and on no other interface.
    A name resolving here only to a loopback address (Debian's ``127.0.1.1 <hostname>`` line, or a
    cluster that is one machine) cannot tell where other nodes reach it: then every interface, with
    a warning naming the settings that would say (an explicit loopback address is kept)."""
    try:
        return str(ipaddress.ip_address(advertised))
    except ValueError:
        pass
    try:
        address = socket.getaddrinfo(advertised, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise NodeProblem(f"the advertised host {advertised!r} does not resolve on {socket.gethostname()} ({e}); "
                          f"set cluster.advertise_host, cluster.advertise_interface or cluster.bind_host") from None
    if ipaddress.ip_address(address).is_loopback and advertised != "localhost":
        log.warning("the advertised host %s resolves to %s here, which other nodes cannot reach: listening on "
                    "every interface; set cluster.advertise_interface (or cluster.bind_host) to listen on one",
                    advertised, address)
        return "0.0.0.0"
    return address


def node_address(interface: str | None) -> str:
    """The IPv4 address other nodes reach this one at (module docstring), or NodeProblem naming the
    setting to change."""
    if interface:
        return _interface_address(interface)
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    where = f"NodeAddr of Slurm node {name}"
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
        node_addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), None)
    except (OSError, subprocess.SubprocessError):
        node_addr = None
    if not node_addr:
        node_addr, where = name, f"hostname {name} (no NodeAddr from scontrol)"
    try:
        infos = socket.getaddrinfo(node_addr, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as e:
        raise NodeProblem(f"{where} is {node_addr!r}, which does not resolve to an IPv4 address ({e}); "
                          f"set cluster.advertise_interface to the interface the nodes share") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not (address.is_loopback or address.is_link_local):
            return str(address)
    raise NodeProblem(f"{where} {node_addr!r} resolves only to loopback or link-local addresses "
                      f"({', '.join(sorted({i[4][0] for i in infos}))}), which other nodes cannot reach; "
                      f"set cluster.advertise_interface to the interface the nodes share")


def _interface_address(interface: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
        except OSError as e:
            names = ", ".join(name for _, name in socket.if_nameindex())
            raise NodeProblem(f"cluster.advertise_interface: {interface!r} has no IPv4 address on "
                              f"{socket.gethostname()} ({e.strerror}); this node has {names}") from None
    address = ipaddress.ip_address(socket.inet_ntoa(packed[20:24]))
    if address.is_loopback or address.is_link_local:
        raise NodeProblem(f"cluster.advertise_interface: {interface!r} has {address} on {socket.gethostname()}, "
                          f"which other nodes cannot reach; name the interface the nodes share")
    return str(address)
