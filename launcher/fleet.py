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

A replica's time limit is not a death either. When its job has
``server.rollover_lead_s`` left (the backend's one queue call says how long every
job has), the fleet submits a successor for the same replica index, gates it like
any replacement, and once it passed asks the old job to drain (SIGUSR2, Slurm's
own warning): the old job's entry turns ``draining``, its requests finish, it
ends. Both have entries of their own meanwhile, so clients never lack the
replica. A job that reaches its limit before its successor is ready (Slurm's
warning drained it, or rollovers are off) ends as expected too: its successor
takes over (or is submitted then), with no restart counted. Rollovers are listed
per replica in the summary.

Only the run that launched a pool replaces its replicas: a run that joined a
sweep's pool watches them and fails fast as before, so two runs never both
replace the same replica.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import submitit

from launcher.executors import Backend, Resources
from launcher.readiness import JOB_FIELDS, Gate, ReplicaStatus, ServerFailed, death_report, step
from server.job import ServerJob, run as run_server
from server.registry import Entry, JobRecord, Registry, hiccup_tolerated
from server.verify import CheckResult

log = logging.getLogger(__name__)

_POLL_S = 0.2
_MAX_BACKOFF_S = 30.0
# The automatic rollover lead assumes a replica takes this long from submission to passing the gate
# until one did; then the slowest seen counts.
_DEFAULT_START_S = 60.0
# Slurm sends the --signal warning up to this much early (sbatch(1): its time-limit checks run every
# 30 s); on this test cluster it came 30 s early.
_WARNING_EARLY_S = 60.0
# How far off a job's end time, as last seen in the queue, may be.
_LIMIT_SLACK_S = 5.0
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
    time_limit_s: float  # each server job's (cluster.timeout_min)
    signal_delay_s: float  # the scheduler's warning (SIGUSR2) comes this long before it
    rollover_lead_s: float | None  # server.rollover_lead_s: None automatic, 0 off


def rollover_lead(configured: float | None, signal_delay_s: float, time_limit_s: float,
                  slowest_start_s: float | None) -> float:
    """How long before its time limit a replica's successor is submitted.

    ``server.rollover_lead_s`` when set (0: never). Automatic: the scheduler's warning (which may
    come a minute early) plus three times the slowest start seen (submission to passing the gate,
    queueing included), so that the successor is ready before the warning drains the old job; at
    most half the limit, so that a replica serves at least half of its time.
    """
    if configured is not None:
        return configured
    start_s = _DEFAULT_START_S if slowest_start_s is None else slowest_start_s
    return min(signal_delay_s + _WARNING_EARLY_S + 3 * start_s, time_limit_s / 2)


def ended_at_limit(state: str, now: float, ends_at: float | None, signal_delay_s: float) -> bool:
    """Whether a job that ended did so at its time limit: Slurm says TIMEOUT, or it ended once the
    warning before its limit (which drains a server) may have come. ``ends_at``: when its limit was
    to end it, as last seen (same clock as ``now``); None: never seen running with a limit."""
    if state.split()[0:1] == ["TIMEOUT"]:
        return True
    return ends_at is not None and now >= ends_at - signal_delay_s - _WARNING_EARLY_S - _LIMIT_SLACK_S


def job_history(r: ReplicaStatus) -> list[dict]:
    """Each job the replica had, oldest first: whether it served (passed the gate) and how it ended
    (None: still the replica's job when the run ended, in ``state``)."""
    ended = [{"job_id": d["job_id"], "served": d["when"] == "in use", "ended": f"died {d['when']}: {d['reason']}",
              "at": d["at"]} for d in r.deaths]
    ended += [{"job_id": x["job_id"], "served": True, "ended": f"handed over: {x['why']}", "at": x["at"]}
              for x in r.rollovers]
    ended.sort(key=lambda job: job.pop("at"))
    current = {"job_id": str(r.job.job_id), "served": r.ready_after_s is not None, "ended": None, "state": r.state}
    return [*ended, current]


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
        self._gate, self._engine_log, self._say = Gate(checks), engine_log, say
        # Raises when the end of a job is the run being stopped (launcher.down), not a death.
        self._before_death = before_death
        self._retry_at: dict[int, float] = {}  # replica -> when its replacement may be submitted
        self._down_since: dict[int, float] = {}
        self._none_ready_since: float | None = None
        self._last_report = ""  # the last death's report, for the failure that may follow
        self._successors: dict[int, ReplicaStatus] = {}  # replica -> its successor, while it starts
        self._successor_after: dict[int, float] = {}  # replica -> no successor before (a successor died)
        self._ends_at: dict[str, float] = {}  # job id -> when its time limit ends it (monotonic), as last seen
        self._draining: list[tuple[int, submitit.Job]] = []  # (replica, job) handed over, until it ended

    @property
    def jobs(self) -> list[submitit.Job]:
        """Every job serving or about to (what to stop at the end): each replica's, successors, and
        jobs still draining after a rollover."""
        return [r.job for r in self.replicas] + [r.job for r in self._successors.values()] + \
            [job for _, job in self._draining]

    @property
    def successors(self) -> list[ReplicaStatus]:
        """The successors on their way (a rollover's, or a death's already submitted), each with its replica."""
        return list(self._successors.values())

    # ------------------------------------------------------------ starting

    def wait_ready(self, on_update: Callable[[], None]) -> None:
        """Return once every replica passed the gate; replicas that die while starting are replaced."""
        while not all(r.state == "ready" for r in self.replicas):
            self._poll()
            on_update()
            self._gate.wait(self.replicas, _POLL_S)

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

    def close(self) -> None:
        """The run is over: checks still running are not waited for; a replica still down (its
        replacement not ready, or not yet submitted) was down until now."""
        self._gate.close()
        now = time.monotonic()
        for replica, since in self._down_since.items():
            self.replicas[replica].down_s += now - since
        self._down_since.clear()

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
                    self._roll_over_if_due(r)
                elif s.replaces and ended_at_limit(self.backend.state(r.job), time.monotonic(),
                                                   self._ends_at.get(str(r.job.job_id)), s.signal_delay_s):
                    self._ended_at_limit(r)
                else:
                    self._died(r, "in use")
            else:
                outcome = step(self.backend, r, self.registry, s.namespace, s.service, s.startup_timeout_s,
                               self._gate, self._engine_log)
                if outcome == "ended":  # before it was ready: whatever the run is doing, it died starting
                    self._died(r, "starting")
                elif outcome == "ready" and r.replica in self._down_since:
                    r.down_s += time.monotonic() - self._down_since.pop(r.replica)
                    self._say(f"replica {s.service}/{r.replica} is back: job {r.job.job_id} ready at "
                              f"{r.entry.base_url} after {r.ready_after_s:.1f}s")
            if r.replica in self._successors:
                self._step_successor(r, self._successors[r.replica])
        self._reap_drained()

    # ------------------------------------------------------------ time limits

    def _roll_over_if_due(self, r: ReplicaStatus) -> None:
        """A ready replica near its time limit gets its successor submitted."""
        s = self.settings
        left = self.backend.time_left(r.job)
        if left is None:
            return
        self._ends_at[str(r.job.job_id)] = time.monotonic() + left
        if not s.replaces or r.replica in self._successors or \
                time.monotonic() < self._successor_after.get(r.replica, 0.0):
            return
        started = [x.ready_after_s for x in self.replicas if x.ready_after_s is not None]
        lead = rollover_lead(s.rollover_lead_s, s.signal_delay_s, s.time_limit_s, max(started, default=None))
        if lead <= 0 or left > lead:
            return
        successor = ReplicaStatus(replica=r.replica, job=self._submit(r.replica))
        self._successors[r.replica] = successor
        r.note = f"(successor job {successor.job.job_id} submitted)"
        self._say(f"replica {s.service}/{r.replica}: job {r.job.job_id} near its time limit ({left:.0f}s left, "
                  f"rollover lead {lead:.0f}s), successor job {successor.job.job_id} submitted")

    def _step_successor(self, r: ReplicaStatus, successor: ReplicaStatus) -> None:
        """One look at a starting successor: once it passed the gate it takes over and the old job drains."""
        s = self.settings
        if self.backend.state(successor.job) == "PENDING":
            # Never judged "never starts": what it waits for may be what the old job holds until its limit.
            reason = self.backend.pending_reason(successor.job)
            r.note = f"(successor job {successor.job.job_id} PENDING" + (f": {reason})" if reason else ")")
            return
        outcome = step(self.backend, successor, self.registry, s.namespace, s.service, s.startup_timeout_s,
                       self._gate, self._engine_log)
        if outcome == "waiting":
            r.note = f"(successor job {successor.job.job_id}: {successor.state})"
            return
        del self._successors[r.replica]
        r.note = ""
        if outcome == "ended":  # the old job still serves: another successor after a backoff
            reason = self._record_death(successor, "starting")
            backoff = self._check_restarts(r, reason)
            r.restarts += 1
            self._successor_after[r.replica] = time.monotonic() + backoff
            self._say(f"replica {s.service}/{r.replica}: successor job {successor.job.job_id} died starting: "
                      f"{reason}; another in {backoff:g}s (restart {r.restarts} of {s.max_restarts})")
            return
        old = r.job
        self._take_over(r, successor)
        self.backend.drain(old)
        self._draining.append((r.replica, old))
        r.rollovers.append({"job_id": str(old.job_id), "successor": str(r.job.job_id), "why": "near its time limit",
                            "at": time.time()})
        self._say(f"replica {s.service}/{r.replica}: successor job {r.job.job_id} ready at {r.entry.base_url} "
                  f"after {r.ready_after_s:.1f}s; draining job {old.job_id}")

    def _ended_at_limit(self, r: ReplicaStatus) -> None:
        """The job ended at its time limit (Slurm's warning drained it first): expected, not a death.
        Its successor takes over, or is submitted now; no restart is counted."""
        s = self.settings
        old = r.job
        state = self.backend.state(old)
        self._remove_entry(r.replica, old)  # a killed job leaves it
        successor = self._successors.pop(r.replica, None) or ReplicaStatus(replica=r.replica,
                                                                           job=self._submit(r.replica))
        self._take_over(r, successor)
        self._down_since.setdefault(r.replica, time.monotonic())
        r.rollovers.append({"job_id": str(old.job_id), "successor": str(r.job.job_id), "why": "ended at its time limit",
                            "at": time.time()})
        self._say(f"replica {s.service}/{r.replica}: job {old.job_id} ended at its time limit ({state}); "
                  f"successor job {r.job.job_id} takes over once ready")

    def _reap_drained(self) -> None:
        """Jobs that handed over: gone once ended (a job killed while draining could not remove its entry)."""
        for replica, job in list(self._draining):
            if self.backend.finished(job):
                self._remove_entry(replica, job)
                self._draining.remove((replica, job))

    def _died(self, r: ReplicaStatus, when: str) -> None:
        s = self.settings
        reason = self._record_death(r, when)
        successor = self._successors.pop(r.replica, None)
        if successor is not None:  # already on its way: it takes over, no other job is needed
            self._take_over(r, successor)
            self._down_since.setdefault(r.replica, time.monotonic())
            self._say(f"replica {s.service}/{r.replica} died {when}: {reason}; its successor job "
                      f"{r.job.job_id} takes over once ready")
            return
        backoff = self._check_restarts(r, reason)
        self._retry_at[r.replica] = time.monotonic() + backoff
        self._down_since.setdefault(r.replica, time.monotonic())
        r.state = f"died: {reason}"
        self._say(f"replica {s.service}/{r.replica} (job {r.job.job_id}) died {when}: {reason}; "
                  f"replacing it in {backoff:g}s (restart {r.restarts + 1} of {s.max_restarts})")

    def _record_death(self, dead: ReplicaStatus, when: str) -> str:
        """Note why ``dead``'s job ended (in the replica's deaths) and remove its entry; returns the reason.
        Raises for a joined pool (its launcher replaces) and when the run is being stopped."""
        self._before_death()
        s = self.settings
        state = self.backend.state(dead.job)
        reason = self._reason(dead, state)
        self._last_report = death_report(self.backend, dead, f"{state} ({reason})", self._engine_log, f"while {when}")
        log.info("%s", self._last_report)  # the whole report in the run's log, even when replaced
        replica = self.replicas[dead.replica]
        replica.deaths.append({"job_id": str(dead.job.job_id), "reason": reason, "when": when, "at": time.time()})
        self._remove_entry(dead.replica, dead.job)
        if not s.replaces:
            raise ServerFailed(self._last_report)
        return reason

    def _check_restarts(self, r: ReplicaStatus, reason: str) -> float:
        """Raise when ``r`` may not get another job (the same death twice while starting, restarts used
        up); else the backoff before it."""
        s = self.settings
        starting = [d["reason"] for d in r.deaths if d["when"] == "starting"]
        if len(starting) >= 2 and starting[-1] == starting[-2]:
            raise ServerFailed(f"{self._last_report}\nreplica {s.service}/{r.replica} died twice while starting "
                               f"with the same reason ({reason}): not retried")
        if r.restarts >= s.max_restarts:
            raise ServerFailed(f"{self._last_report}\nreplica {s.service}/{r.replica} used up its restarts "
                               f"(server.max_restarts={s.max_restarts})")
        return min(2.0 ** r.restarts, _MAX_BACKOFF_S)

    def _replace(self, r: ReplicaStatus) -> None:
        del self._retry_at[r.replica]
        self._take_over(r, ReplicaStatus(replica=r.replica, job=self._submit(r.replica)))
        r.restarts += 1
        self._say(f"replica {self.settings.service}/{r.replica}: replacement job {r.job.job_id} submitted")

    def _submit(self, replica: int) -> submitit.Job:
        job = self.backend.submit(run_server, self._server_job(replica), self._resources)
        record = self.registry.recorded_jobs(self.settings.namespace)
        if record is not None:  # launcher.down and joining runs find the new job too
            with hiccup_tolerated(f"recording job {job.job_id}"):  # this run stops it all the same
                self.registry.record_jobs(self.settings.namespace, JobRecord(
                    kind=record.kind, job_ids=[*record.job_ids, str(job.job_id)], server_hash=record.server_hash))
        return job

    def _remove_entry(self, replica: int, job: submitit.Job) -> None:
        """The entry of a job that ended: a killed server job could not remove its own, and clients
        must not be sent there. A hiccup of the registry must not end the run: the entry then goes
        stale (clients skip it) and goes with the namespace at the end."""
        with hiccup_tolerated(f"removing the entry of job {job.job_id}"):
            self.registry.remove(self.settings.namespace, self.settings.service, replica, str(job.job_id))

    @staticmethod
    def _take_over(r: ReplicaStatus, new: ReplicaStatus) -> None:
        """``r`` is served by ``new``'s job from now on; what ``r`` keeps across jobs stays."""
        for name in JOB_FIELDS:
            setattr(r, name, getattr(new, name))
        r.note = ""

    def _reason(self, r: ReplicaStatus, state: str) -> str:
        """Why the job ended, in a few words: the scheduler's state when it says more than a log line
        (NODE_FAIL, PREEMPTED, TIMEOUT, ...), else what the server job wrote (engine exit code or signal)."""
        base = state.split()[0] if state else "?"
        if base in _SCHEDULER_ENDS:
            return base
        # The server job names itself by the same id (server.job.current_job_id): Slurm array tasks as A_i.
        note = self.registry.death_note(self.settings.namespace, self.settings.service, r.replica, str(r.job.job_id))
        return note or f"job ended ({state})"

    def _deaths_line(self) -> str:
        return "; ".join(f"{self.settings.service}/{r.replica}: " + ", ".join(d["reason"] for d in r.deaths)
                         for r in self.replicas if r.deaths) or "none"

