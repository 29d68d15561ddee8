"""Waiting for servers: job state + registry entry + real HTTP checks, failing fast."""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import submitit

from launcher.executors import Backend
from server.registry import Entry, Registry
from server.verify import CheckResult

log = logging.getLogger(__name__)



class ServerFailed(RuntimeError):
    """A server job died or did not get ready; the message says which and shows its logs."""


@dataclass
class ReplicaStatus:
    replica: int
    job: submitit.Job
    state: str = "SUBMITTED"  # the job's state, or the entry's once published
    submitted_at: float = field(default_factory=time.monotonic)
    running_since: float | None = None
    ready_after_s: float | None = None  # from submission to passing the checks
    gate_s: float | None = None  # from the engine answering /health (entry `healthy`) to passing the checks
    healthy_at: float | None = None  # when the launcher first saw the entry `healthy`
    gating: Future | None = None  # its readiness checks, running (Gate)
    entry: Entry | None = None
    checks: list[CheckResult] = field(default_factory=list)
    # Kept across the jobs of this replica (replacements, rollovers: launcher/fleet.py).
    restarts: int = 0
    deaths: list[dict] = field(default_factory=list)  # job_id, reason, when (starting | in use), at
    down_s: float = 0.0  # not ready after a death or its time limit: until its next job passed the gate, or the run ended
    # Time-limit rollovers: job_id (the one that ended), successor, why, at, successor_ready_s
    rollovers: list[dict] = field(default_factory=list)
    note: str = ""  # for the live view: a successor on its way


# What belongs to the replica's current job; the rest of ``ReplicaStatus`` is the replica's.
JOB_FIELDS = ("job", "state", "submitted_at", "running_since", "ready_after_s", "gate_s", "healthy_at", "gating",
              "entry", "checks")


class Gate:
    """The readiness checks of starting replicas, each run in a thread beside the launcher's poll:
    64 replicas are gated side by side, and a slow check never holds up the look at the others."""

    # Gates side by side: each a few requests (~6 sockets) waiting on its own replica's engine. One
    # after another, 64 stand-in replicas whose gate takes 4 s got ready one every 4 s (4.5 min)
    # although all answered /health within 13 s.
    def __init__(self, checks: Callable[[Entry], list[CheckResult]], workers: int = 64) -> None:
        self._checks = checks
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gate")

    def results(self, status: ReplicaStatus, entry: Entry) -> list[CheckResult] | None:
        """The replica's check results once they are in (then forgotten: a failed gate runs again at
        the next look); starts them when none are running."""
        if status.gating is None:
            status.gating = self._pool.submit(self._checks, entry)
            return None
        if not status.gating.done():
            return None
        done, status.gating = status.gating, None
        return done.result()

    def wait(self, replicas: list[ReplicaStatus], timeout_s: float) -> None:
        """Sleep up to ``timeout_s``, waking as soon as a replica's checks finish (the gate passes
        the moment they do, not at the next poll)."""
        # Not the finished ones: a replica that died meanwhile has its results never collected.
        running = [r.gating for r in replicas if r.gating is not None and not r.gating.done()]
        if running:
            wait(running, timeout=timeout_s, return_when=FIRST_COMPLETED)
        else:
            time.sleep(timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def step(
    backend: Backend,
    status: ReplicaStatus,
    registry: Registry,
    namespace: str,
    service: str,
    timeout_s: float,
    gate: Gate,
    engine_log: Callable[[int], str],
) -> str:
    """One look at a starting replica: ``"ready"`` (it passed the gate's checks), ``"ended"`` (its
    job is over) or ``"waiting"``; ``ServerFailed`` when it can never get ready (never starts, or
    not in time)."""
    job_state = backend.state(status.job)
    if backend.finished(status.job):
        return "ended"
    if status.running_since is None and job_state == "RUNNING":
        status.running_since = time.monotonic()
    entry = registry.entry(namespace, service, status.replica, str(status.job.job_id))
    status.entry = entry or status.entry
    if job_state == "PENDING" and (why := backend.never_starts(status.job)):
        raise ServerFailed(why)
    reason = backend.pending_reason(status.job) if job_state == "PENDING" else None
    status.state = entry.state if entry else (f"PENDING ({reason})" if reason else job_state)
    if entry is not None and entry.state in ("healthy", "ready"):
        # "checking", not the entry's state: the fleet takes "ready" for a passed gate, and a joined
        # pool's replica is `ready` in the registry before this run's gate passed it.
        status.state = "checking"
        status.healthy_at = status.healthy_at or time.monotonic()
        results = gate.results(status, entry)
        status.checks = results if results is not None else status.checks
        if results and all(c.ok for c in results):
            # Only now may clients use it: its server job turns the entry `ready` (server/job.py).
            try:
                registry.admit(namespace, service, status.replica, entry.job_id)
            except OSError as e:  # a hiccup of the shared filesystem: admitted at the next look
                log.warning("admitting job %s failed (%s); trying again", entry.job_id, e)
                return "waiting"
            status.ready_after_s = time.monotonic() - status.submitted_at
            status.gate_s = time.monotonic() - status.healthy_at
            status.state = "ready"
            return "ready"
    # The clock starts when the job runs: time queued is not the server's fault.
    if status.running_since is not None and time.monotonic() - status.running_since > timeout_s:
        failed = [c for c in status.checks if not c.ok]
        why = f"; last check: {failed[-1].detail}" if failed else ""
        raise ServerFailed(
            f"replica {service}/{status.replica} (job {status.job.job_id}) not ready after "
            f"{timeout_s:g}s of running (server.startup_timeout_s){why}\n"
            f"engine log:\n{engine_log(status.replica)}"
        )
    return "waiting"


def death_report(
    backend: Backend, status: ReplicaStatus, job_state: str, engine_log: Callable[[int], str], when: str
) -> str:
    """What a user needs when a server job ended: which, where, its state, and both log tails."""
    node = status.entry.node if status.entry else "?"
    return (
        f"server job {status.job.job_id} (replica {status.replica}, node {node}) ended {when}: "
        f"state {job_state}\n"
        f"--- job log tail ({status.job.paths.stderr}):\n{backend.log_tail(status.job)}\n"
        f"--- engine log tail:\n{engine_log(status.replica)}"
    )
