"""Server pools: the jobs serving one registry namespace, and who uses them.

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
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import submitit
from filelock import FileLock

from launcher.executors import Backend
from server.registry import Registry
from server.runs import OwnerHeartbeat, Owners


def pool_namespace(run_name: str, sweep_dir: str, server_hash: str) -> str:
    sweep = hashlib.sha256(str(Path(sweep_dir).resolve()).encode()).hexdigest()[:8]
    return f"{run_name}-pool-{sweep}-{server_hash[:8]}"


def pool_lock(registry: Registry, namespace: str) -> FileLock:
    registry.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return FileLock(str(registry.root / f".{namespace}.lock"))


@dataclass
class Pool:
    """The server jobs of one namespace as this process sees them."""

    namespace: str
    registry: Registry
    backend: Backend
    jobs: list[submitit.Job]
    heartbeat: OwnerHeartbeat
    stop_grace_s: float
    orphan_grace_s: float

    @property
    def owners(self) -> Owners:
        return Owners(self.registry.root, self.namespace)

    def release(self, say: Callable[[str], None] = print) -> bool:
        """Let go of the pool; stop it if no other run uses it. Returns True if it was stopped."""
        with pool_lock(self.registry, self.namespace):
            self.heartbeat.stop()
            self.owners.remove(self.heartbeat.run_id)
            others = self.owners.alive(self.orphan_grace_s)
            if others:
                say(f"servers of {self.namespace} stay up for runs {others}")
                return False
            # Read before the entries disappear: what to kill if a job cannot stop its own processes.
            here = [e for e in self.registry.entries(self.namespace) if e.node == os.uname().nodename]
            stop_jobs(self.backend, self.jobs, self.stop_grace_s, say)
            for entry in here:
                _kill_when_alive(entry.pid, group=False)
                if entry.engine_pid:
                    _kill_when_alive(entry.engine_pid, group=True)
            self.registry.remove_namespace(self.namespace)
            return True


def stop_jobs(backend: Backend, jobs: list[submitit.Job], grace_s: float, say: Callable[[str], None]) -> None:
    """Ask ``jobs`` to stop (SIGTERM), wait up to ``grace_s`` (+15 s), then kill what is left."""
    for job in jobs:
        if not backend.finished(job):
            backend.cancel(job)
    deadline = time.monotonic() + grace_s + 15
    while any(not backend.finished(j) for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for job in jobs:
        if not backend.finished(job):
            say(f"job {job.job_id} did not stop in time; killing it")
            backend.force_cancel(job)


# Pools this process keeps up for the later points of a sequential sweep.
_KEPT: dict[str, Pool] = {}


def kept(namespace: str) -> Pool | None:
    return _KEPT.get(namespace)


def keep(pool: Pool) -> None:
    if not _KEPT:
        atexit.register(release_kept)
    _KEPT[pool.namespace] = pool


def release(pool: Pool, say: Callable[[str], None] = print) -> bool:
    """Let go of ``pool`` now, kept or not."""
    _KEPT.pop(pool.namespace, None)
    return pool.release(say)


def release_kept() -> None:
    while _KEPT:
        _, pool = _KEPT.popitem()
        pool.release()


def _kill_when_alive(pid: int, group: bool) -> None:
    """Last resort for a process whose job could not stop it: wait a little, then SIGKILL."""
    kill = os.killpg if group else os.kill
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)
    try:
        kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
