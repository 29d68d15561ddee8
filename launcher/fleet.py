"""A service's replicas for the whole run: watched, and replaced when they die.

A replica whose job ends while the run goes on (engine crash, OOM, node
failure, ``scancel``, preemption, time limit) is not the end of the run: the
other replicas keep serving (clients fail over), and the fleet submits a
replacement for the same replica index in the same namespace, which the
collector's pool takes up once it passed the same readiness gate. Bounded:
``server.max_restarts`` per replica, with backoff; a replica that dies twice
while starting for the same reason (bad weights, a wrong flag) is not retried
in a loop. The run fails when a replica used up its restarts, or when no
replica has been ready for ``server.no_replica_grace_s``.

Only the run that launched a pool replaces its replicas: a run that joined a
sweep's pool watches them and fails fast as before, so two runs never both
replace the same replica.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

import submitit

from launcher.executors import Backend, Resources
from launcher.readiness import ReplicaStatus, ServerFailed, death_report, step
from server.job import ServerJob, run as run_server
from server.registry import Entry, JobRecord, Registry
from server.verify import CheckResult

_POLL_S = 0.2
_MAX_BACKOFF_S = 30.0
_GATES_AT_ONCE = 64  # gates side by side: each a few requests (~6 sockets) waiting on its own replica
# Slurm states that say why a job ended better than any log line.
_SCHEDULER_ENDS = {"CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclasses.dataclass
class FleetSettings:
    service: str
    namespace: str
    startup_timeout_s: float
    max_restarts: int
    no_replica_grace_s: float
    replaces: bool  # False for a joined pool: its launcher replaces


class Fleet:
    def __init__(
        self,
        settings: FleetSettings,
        backend: Backend,
        registry: Registry,
        jobs: list[submitit.Job],
        server_job: Callable[[int], ServerJob],
        resources: Resources,
        checks: Callable[[Entry], list[CheckResult]],
        engine_log: Callable[[int], str],
        say: Callable[[str], None],
        before_death: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings, self.backend, self.registry = settings, backend, registry
        self.replicas = [ReplicaStatus(replica=i, job=j) for i, j in enumerate(jobs)]
        self._server_job, self._resources = server_job, dataclasses.replace(resources, count=1)
        self._gates, self._engine_log, self._say = _Gates(checks), engine_log, say
        # Raises when the end of a job is the run being stopped (launcher.down), not a death.
        self._before_death = before_death
        self._retry_at: dict[int, float] = {}  # replica -> when its replacement may be submitted
        self._down_since: dict[int, float] = {}
        self._none_ready_since: float | None = None

    @property
    def jobs(self) -> list[submitit.Job]:
        """The current job of each replica (what to stop at the end)."""
        return [r.job for r in self.replicas]

    # ------------------------------------------------------------ starting

    def wait_ready(self, on_update: Callable[[], None]) -> None:
        """Return once every replica passed the gate; replicas that die while starting are replaced."""
        while not all(r.state == "ready" for r in self.replicas):
            self._poll()
            on_update()
            self._gates.wait(_POLL_S)  # a gate that finishes is seen at once, not at the next tick

    # ------------------------------------------------------------ in use

    def watch(self) -> None:
        """One look while the run uses the service: replace the dead, gate the new, fail when none is left."""
        self._poll()
        ready = [r for r in self.replicas if r.state == "ready"]
        now = time.monotonic()
        if ready:
            self._none_ready_since = None
        elif self._none_ready_since is None:
            self._none_ready_since = now
        elif now - self._none_ready_since > self.settings.no_replica_grace_s:
            raise ServerFailed(
                f"no replica of {self.settings.service} has been ready for {self.settings.no_replica_grace_s:g}s "
                f"(server.no_replica_grace_s); deaths: {self._deaths_line()}"
            )

    def summary(self) -> list[dict]:
        return [
            {"replica": r.replica, "restarts": r.restarts, "deaths": r.deaths, "down_s": round(r.down_s, 2)}
            for r in self.replicas
        ]

    # ------------------------------------------------------------ the loop

    def _poll(self) -> None:
        s = self.settings
        for r in self.replicas:
            if r.replica in self._retry_at:
                if time.monotonic() >= self._retry_at[r.replica]:
                    self._replace(r)
                continue
            if r.state == "ready":
                if not self.backend.finished(r.job):
                    continue
                self._died(r, "in use")
                continue
            outcome = step(self.backend, r, self.registry, s.namespace, s.service, s.startup_timeout_s,
                           self._gates, self._engine_log)
            if outcome == "ended":  # before it was ready: whatever the run is doing, it died starting
                self._died(r, "starting")
            elif outcome == "ready" and r.replica in self._down_since:
                r.down_s += time.monotonic() - self._down_since.pop(r.replica)
                self._say(f"replica {s.service}/{r.replica} is back: job {r.job.job_id} ready at "
                          f"{r.entry.base_url} after {r.ready_after_s:.1f}s")

    def _died(self, r: ReplicaStatus, when: str) -> None:
        self._before_death()
        s = self.settings
        state = self.backend.state(r.job)
        reason = self._reason(r, state)
        report = death_report(self.backend, r, f"{state} ({reason})", self._engine_log, f"while {when}")
        r.deaths.append({"job_id": str(r.job.job_id), "reason": reason, "when": when, "at": time.time()})
        # A server job that was killed could not remove its entry: clients must not be sent there.
        self.registry.remove(s.namespace, s.service, r.replica)
        starting = [d["reason"] for d in r.deaths if d["when"] == "starting"]
        if not s.replaces:
            raise ServerFailed(report)
        if len(starting) >= 2 and starting[-1] == starting[-2]:
            raise ServerFailed(f"{report}\nreplica {s.service}/{r.replica} died twice while starting with the same "
                               f"reason ({reason}): not retried")
        if r.restarts >= s.max_restarts:
            raise ServerFailed(f"{report}\nreplica {s.service}/{r.replica} used up its restarts "
                               f"(server.max_restarts={s.max_restarts})")
        backoff = min(2.0 ** r.restarts, _MAX_BACKOFF_S)
        self._retry_at[r.replica] = time.monotonic() + backoff
        self._down_since.setdefault(r.replica, time.monotonic())
        r.state = f"died: {reason}"
        self._say(f"replica {s.service}/{r.replica} (job {r.job.job_id}) died {when}: {reason}; "
                  f"replacing it in {backoff:g}s (restart {r.restarts + 1} of {s.max_restarts})")

    def _replace(self, r: ReplicaStatus) -> None:
        del self._retry_at[r.replica]
        job = self.backend.submit(run_server, self._server_job(r.replica), self._resources)
        record = self.registry.recorded_jobs(self.settings.namespace)
        if record is not None:  # launcher.down and joining runs find the replacement too
            self.registry.record_jobs(self.settings.namespace, JobRecord(
                kind=record.kind, job_ids=[*record.job_ids, str(job.job_id)], server_hash=record.server_hash))
        r.job, r.restarts, r.state, r.entry, r.checks = job, r.restarts + 1, "SUBMITTED", None, []
        r.submitted_at, r.running_since, r.ready_after_s, r.gate_s = time.monotonic(), None, None, None
        self._say(f"replica {self.settings.service}/{r.replica}: replacement job {job.job_id} submitted")

    def _reason(self, r: ReplicaStatus, state: str) -> str:
        """Why the job ended, in a few words: the scheduler's state when it says more than a log line
        (NODE_FAIL, PREEMPTED, TIMEOUT, ...), else what the server job wrote (engine exit code or signal)."""
        base = state.split()[0] if state else "?"
        if base in _SCHEDULER_ENDS:
            return base
        # The server job names itself by the same id (server.job._job_id): Slurm array tasks as A_i.
        note = self.registry.death_note(self.settings.namespace, self.settings.service, r.replica, str(r.job.job_id))
        return note or f"job ended ({state})"

    def _deaths_line(self) -> str:
        return "; ".join(f"{self.settings.service}/{r.replica}: " + ", ".join(d["reason"] for d in r.deaths)
                         for r in self.replicas if r.deaths) or "none"


class _Gates:
    """The readiness gates of starting replicas, run side by side on threads: ``gates(entry)`` starts
    that entry's gate, or answers its results once it finished (None while it runs).

    One after another, each poll of the fleet waited for every gate it ran: 64 stand-in replicas
    whose gate takes 4 s got ready one every 4 s (4.5 min) although all answered /health within
    13 s. A gate waits on its own replica's engine, so many at once cost the launcher little.
    """

    def __init__(self, checks: Callable[[Entry], list[CheckResult]]) -> None:
        self._checks = checks
        self._pool = ThreadPoolExecutor(max_workers=_GATES_AT_ONCE, thread_name_prefix="gate")
        self._running: dict[tuple[int, str, int], Future] = {}

    def __call__(self, entry: Entry) -> list[CheckResult] | None:
        key = (entry.replica, entry.job_id, entry.port)  # a replacement's entry is another gate
        if key not in self._running:
            self._running[key] = self._pool.submit(self._checks, entry)
        if not self._running[key].done():
            return None
        return self._running.pop(key).result()  # a failed gate runs again at the next look

    def wait(self, timeout_s: float) -> None:
        """Until a running gate finishes, at most ``timeout_s``."""
        # Not the finished ones: a gate whose replica died meanwhile is never collected.
        running = [f for f in self._running.values() if not f.done()]
        if running:
            wait(running, timeout=timeout_s, return_when=FIRST_COMPLETED)
        else:
            time.sleep(timeout_s)
