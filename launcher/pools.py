"""Server pools: the jobs serving one registry namespace, and which runs use them.

Not to be confused with ``jobs.pool.EndpointPool``, the client side that picks a
replica of a service for each request.

A single run owns its pool. The points of a sweep whose server configuration
is identical share one (``pool_namespace``): the first launches it, the others
join it, and it is stopped when the last run using it lets go. Launch-or-join
and let-go hold a file lock per pool, so runs starting or ending at the same
moment cannot both launch, or stop a pool another has just joined.

A sweep run by Hydra's basic launcher runs its points one after the other in
one process: there a pool is kept (``keep``) until the process exits, so the
next point finds it up instead of starting another.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import submitit

from launcher.executors import Backend
from server.process import kill_when_alive
from server.registry import OwnerHeartbeat, Registry


def pool_namespace(run_name: str, sweep_dir: str, server_hash: str) -> str:
    sweep = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:8]
    return f"{run_name}-pool-{sweep}-{server_hash[:8]}"


@dataclass
class ServerPool:
    """The server jobs of one namespace as this process sees them, and this run's owner heartbeat."""

    namespace: str
    registry: Registry
    backend: Backend
    jobs: list[submitit.Job]  # the replicas'
    heartbeat: OwnerHeartbeat
    stop_grace_s: float
    shared: bool = False  # a sweep's pool: other runs may join it, so letting go takes the pool lock
    gateways: list[submitit.Job] = field(default_factory=list)  # the service's gateway jobs, stopped with the replicas

    def release(self, say: Callable[[str], None] = print) -> bool:
        """Let go of the pool; stop it if no other run uses it. Returns True if it was stopped."""
        with self.registry.pool_lock(self.namespace) if self.shared else nullcontext():
            self.heartbeat.stop()
            # Not this run's own file, should a hiccup have kept it from going.
            others = [o for o in self.registry.live_owners(self.namespace) if o != self.heartbeat.run_id]
            if others:
                say(f"servers of {self.namespace} stay up for runs {others}")
                return False
            # Read before the entries disappear: what to kill if a job cannot stop its own processes.
            here = [e for e in self.registry.entries(self.namespace) if e.node == os.uname().nodename]
            what = "server jobs" + (" and gateway" if self.gateways else "")
            self.backend.stop([*self.jobs, *self.gateways], self.stop_grace_s, say, what)
            for entry in here:
                kill_when_alive(entry.pid, group=False)
                if entry.engine_pid:
                    kill_when_alive(entry.engine_pid, group=True)
            self.registry.remove_namespace(self.namespace)
            if self.shared:
                say(f"servers of {self.namespace} stopped: no run of the sweep uses them any more")
            return True


# Pools this process keeps up for the later points of a sequential sweep.
_KEPT: dict[str, ServerPool] = {}


def kept(namespace: str) -> ServerPool | None:
    return _KEPT.get(namespace)


def keep(pool: ServerPool) -> None:
    if not _KEPT:
        atexit.register(release_kept)
    _KEPT[pool.namespace] = pool


def release(pool: ServerPool, say: Callable[[str], None] = print) -> bool:
    """Let go of ``pool`` now, kept or not."""
    _KEPT.pop(pool.namespace, None)
    return pool.release(say)


def release_kept() -> None:
    while _KEPT:
        _, pool = _KEPT.popitem()
        pool.release()
