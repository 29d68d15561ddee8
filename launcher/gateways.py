"""The service's gateway as a run keeps it: one job, its URL, its successor.

The gateway (server/gateway.py) runs as a job of its own beside the replicas, with the
``gateway.*`` requests (no GPU). It publishes itself in the registry as service
``<service>@gateway``. The run waits for that entry (``healthy``: it serves, but clients are not
handed it yet) and for the gateway to route to every ready replica, then puts it through the same
readiness checks as a replica (through its URL: the checks reach a replica behind it), admits it
(``Registry.admit``: its entry turns ``ready``, as a replica's does) and only then hands its URL to
the job that uses the service. Every call the run makes to it but ``/health`` sends the key.

Its URL lives in the endpoint file (``<run folder>/<service>.url``), which NeMo Gym's vllm_model
re-reads, and in the registry, which the built-in collector re-reads. A gateway near its time limit
gets a successor as a replica does (``server.rollover_lead_s``, launcher/fleet.py's
``rollover_lead``): once the successor passed the checks the endpoint file names it and the old
job drains (SIGUSR2: its entry turns ``draining``, its requests in flight finish). A gateway whose
job ended otherwise (a crash, a lost node) is replaced at once, at most ``server.max_restarts``
times; only the run that launched the pool does either.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import submitit
from prometheus_client.parser import text_string_to_metric_families

from launcher.executors import Backend, Resources
from launcher.fleet import FleetSettings, ended_at_limit, rollover_lead
from launcher.readiness import ServerFailed
from server.gateway import GatewayJob, GatewayKeyError, gateway_key, run_job
from server.registry import Entry, JobRecord, Registry, gateway_service
from server.verify import CheckResult


# The gateway's counters a run's summary keeps (server/gateway.py Gateway._metrics).
_SUMMARY_COUNTERS = ("gateway_requests", "gateway_retries", "gateway_ejections", "gateway_session_moves",
                     "gateway_replica_requests", "gateway_replica_retries", "gateway_replica_failures")
# Of those, what each replica's job was sent (jobs.pool.ReplicaStats's counters, for the collector's
# own pool): per replica index in the summary (``per_replica``).
PER_REPLICA = ("requests", "retries", "failures")


@dataclass
class GatewayStatus:
    """One gateway job as the live view and the summary show it."""

    job: submitit.Job
    state: str = "SUBMITTED"
    entry: Entry | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None  # from submission to passing the checks
    admitted: bool = False  # this run's gate passed it (Registry.admit); its entry turns `ready` next
    # Kept across the gateway's jobs (ServiceGateway._carry).
    restarts: int = 0
    deaths: list[dict] = field(default_factory=list)
    rollovers: list[dict] = field(default_factory=list)


class ServiceGateway:
    def __init__(self, job: GatewayJob, backend: Backend, resources: Resources, settings: FleetSettings,
                 endpoint_file: Path, checks: Callable[[Entry], list[CheckResult]], say: Callable[[str], None]) -> None:
        self.job, self.backend, self.resources, self.settings = job, backend, resources, settings
        self.registry: Registry = job.registry
        self.endpoint_file, self._checks, self._say = endpoint_file, checks, say
        self.status: GatewayStatus | None = None
        self.successor: GatewayStatus | None = None  # near the time limit, until it takes over
        self._draining: list[submitit.Job] = []  # handed over, until they ended
        self._ends_at: float | None = None  # when the current job's limit ends it (monotonic), as last seen
        self.counts: dict[str, dict] = {}  # its /metrics counters, summed over its jobs (``scrape``)

    @property
    def url(self) -> str | None:
        """The gateway's base URL (``http://host:port/v1``) once it passed the checks."""
        s = self.status
        return s.entry.base_url if s and s.entry and s.ready_after_s is not None else None

    @property
    def jobs(self) -> list[submitit.Job]:
        """Every gateway job running or about to (what to stop at the end)."""
        return [s.job for s in (self.status, self.successor) if s] + self._draining

    # ------------------------------------------------------------ its jobs

    def submit(self) -> GatewayStatus:
        """A new gateway job, recorded with the namespace's jobs (``launcher.down``, joining runs)."""
        job = self.backend.submit(run_job, self.job, self.resources)
        record = self.registry.recorded_jobs(self.job.namespace)
        if record is not None:
            record.gateway_job_ids.append(str(job.job_id))
            self.registry.record_jobs(self.job.namespace, record)
        status = GatewayStatus(job=job)
        if self.status is None:
            self.status = status
        return status

    def adopt(self, record: JobRecord | None) -> bool:
        """The gateway of a pool this run joined (a sweep's, or the run it resumes), if it still runs."""
        ids = record.gateway_job_ids[-1:] if record else []
        if not ids or not self.backend.alive_ids(ids):
            return False
        self.status = GatewayStatus(job=self.backend.jobs_from_ids(ids)[0])
        return True

    # ------------------------------------------------------------ ready, in use

    def wait_ready(self, on_update: Callable[[], None], poll_s: float = 0.2) -> None:
        """Until the gateway passed the readiness checks (the replicas are ready by then)."""
        while not self._step_current():
            on_update()
            time.sleep(poll_s)

    def watch(self) -> None:
        """One look while the run uses the service: a successor near the time limit, a replacement
        for a job that ended, the drained ones reaped."""
        if self._step_current() and self.settings.replaces:
            self._roll_over_if_due()
        if self.successor is not None:
            self._step_successor()
        self._draining = [job for job in self._draining if not self.backend.finished(job)]
        self.look()

    def look(self) -> None:
        """The state of each gateway job as it is now: its entry's (the job's while it has none). The
        readiness steps set it only while the run waits for the gateway; the live view and the run's
        events show it in every phase (an adopted gateway's entry is `ready` from the start; one in
        use may turn `draining`)."""
        for s in (self.status, self.successor):
            if s is not None and not self.backend.finished(s.job):
                s.state = self._state_now(s)

    def _state_now(self, s: GatewayStatus) -> str:
        entry = self.registry.entry(self.job.namespace, gateway_service(self.job.service), 0, str(s.job.job_id))
        if entry is not None:
            return entry.state
        state = self.backend.state(s.job)
        reason = self.backend.pending_reason(s.job) if state == "PENDING" else None
        return f"{state} ({reason})" if reason else state

    def _step_current(self) -> bool:
        """Whether the current job's gateway passed its checks; a job that ended is replaced."""
        s = self.status
        if self.backend.finished(s.job):
            self._ended(s)
            return False
        if s.ready_after_s is not None or self._step(s):
            return True
        if s.state == "draining" and self.settings.replaces:
            # Slurm's time-limit warning reached it before it was ever checked (the warning comes up
            # to 60 s early: with a short limit, right after the start). A draining gateway takes no
            # one: its successor starts now, not when this job ends.
            if self.successor is None:
                self.successor = self.submit()
                self._say(f"gateway of {self.settings.service}: job {s.job.job_id} drains before it was ready "
                          f"(its time-limit warning); successor job {self.successor.job.job_id} submitted")
            self._step_successor()
        return self.status.ready_after_s is not None

    def _step(self, s: GatewayStatus) -> bool:
        """One look at a starting gateway job: True once it passed the checks."""
        state = self.backend.state(s.job)
        if state == "PENDING" and s is self.status and (why := self.backend.never_starts(s.job)):
            raise ServerFailed(f"gateway job {s.job.job_id}: {why}")
        entry = self.registry.entry(self.job.namespace, gateway_service(self.job.service), 0, str(s.job.job_id))
        s.state = entry.state if entry else state
        overdue = state == "RUNNING" and time.monotonic() - s.submitted_at > self.settings.startup_timeout_s
        def not_serving() -> ServerFailed:
            return ServerFailed(f"gateway job {s.job.job_id} not serving after {self.settings.startup_timeout_s:g}s "
                                f"(server.startup_timeout_s)\n{self.backend.log_tail(s.job)}")

        # `healthy`: it serves, and waits for this gate (server.job.wait_admitted) before it turns
        # `ready`, the state clients are handed it in; `ready` already: a joined pool's.
        if entry is None or entry.state not in ("healthy", "ready") or not self._sees_every_replica(entry):
            if overdue:
                raise not_serving()
            return False
        if not s.admitted:
            routed = self._ready_replicas()
            failed = [c for c in self._checks(entry) if not c.ok]
            if failed and not overdue and not routed <= self._ready_replicas():
                # A replica it routed to left while the checks ran (a rollover, a death): what failed may be
                # that, not the gateway. Checked again once it sees every ready replica anew.
                return False
            if failed:
                # The replicas passed the same checks directly: the gateway is what fails them.
                raise ServerFailed(f"gateway {entry.base_url} (job {s.job.job_id}) fails the readiness checks: "
                                   + "; ".join(f"{c.name}: {c.detail}" for c in failed))
            # Only now may clients use it: its job turns the entry `ready` (server/gateway.py run_job).
            self.registry.admit(entry.namespace, entry.service, entry.replica, entry.job_id)
            s.admitted = True
        if entry.state != "ready":
            # Within a poll or two: the endpoint file and the registry then name it together.
            if overdue:
                raise not_serving()
            return False
        s.entry, s.state, s.ready_after_s = entry, "ready", time.monotonic() - s.submitted_at
        self._write_endpoint_file(entry.base_url)
        return True

    def _ready_replicas(self) -> set[tuple[int, str]]:
        return {(e.replica, e.job_id) for e in self.registry.ready(self.job.service, self.job.namespace)}

    def _sees_every_replica(self, entry: Entry) -> bool:
        """The gateway routes to every replica the registry holds ready, and there is one: it
        re-reads the registry every ``refresh_s``, and a job started at once would otherwise send
        all its first sessions to the replicas it saw first."""
        ready = len(self.registry.ready(self.job.service, self.job.namespace))
        if not ready:  # every replica between jobs (time limits, restarts): nothing to check it through yet
            return False
        try:
            health = httpx.get(f"{entry.root_url}/health", timeout=5.0, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return False
        return health.get("usable_replicas", 0) >= ready

    # ------------------------------------------------------------ time limits, deaths

    def _roll_over_if_due(self) -> None:
        s, cfg = self.status, self.settings
        left = self.backend.time_left(s.job)
        if left is None:
            return
        self._ends_at = time.monotonic() + left
        lead = rollover_lead(cfg.rollover_lead_s, cfg.signal_delay_s, cfg.time_limit_s, s.ready_after_s)
        if self.successor is None and 0 < lead and left <= lead:
            self.successor = self.submit()
            self._say(f"gateway of {cfg.service}: job {s.job.job_id} near its time limit ({left:.0f}s left), "
                      f"successor job {self.successor.job.job_id} submitted")

    def _step_successor(self) -> None:
        successor = self.successor
        if self.backend.finished(successor.job):  # the current one still serves: try again later
            self.successor = None
            self._record_death(successor.job, "starting")
            self._check_restarts()
            self.status.restarts += 1
            return
        if self.backend.state(successor.job) == "PENDING" or not self._step(successor):
            return
        old, self.successor = self.status, None
        self._take_over(successor, "near its time limit")
        self.backend.drain(old.job)  # SIGUSR2: its entry turns draining, its requests in flight finish
        self._draining.append(old.job)
        self._say(f"gateway of {self.settings.service}: successor job {successor.job.job_id} ready at "
                  f"{successor.entry.base_url}; draining job {old.job.job_id}")

    def _ended(self, s: GatewayStatus) -> None:
        """The current job ended: at its time limit (expected; its successor, or a new one, takes
        over), or it died (a replacement, bounded)."""
        cfg = self.settings
        state = self.backend.state(s.job)
        # It could not remove its entry if it was killed: clients must not be sent there.
        self.registry.remove(self.job.namespace, gateway_service(self.job.service), 0, str(s.job.job_id))
        at_limit = ended_at_limit(state, time.monotonic(), self._ends_at, cfg.signal_delay_s)
        if not at_limit:
            self._record_death(s.job, f"in use ({state})")
            if not cfg.replaces:
                raise ServerFailed(f"gateway job {s.job.job_id} of {cfg.service} ended ({state})")
            self._check_restarts()
            s.restarts += 1
        successor, self.successor = self.successor or self.submit(), None
        self._take_over(successor, "ended at its time limit" if at_limit else None)
        self._say(f"gateway of {cfg.service}: job {s.job.job_id} ended ({state}); job {successor.job.job_id} "
                  "takes over once ready")

    def _take_over(self, new: GatewayStatus, rollover_why: str | None) -> None:
        old = self.status
        new.restarts, new.deaths, new.rollovers = old.restarts, old.deaths, old.rollovers
        if rollover_why:
            new.rollovers.append({"job_id": str(old.job.job_id), "successor": str(new.job.job_id),
                                  "why": rollover_why, "at": time.time()})
        self.status, self._ends_at = new, None

    def _record_death(self, job: submitit.Job, when: str) -> None:
        self.status.deaths.append({"job_id": str(job.job_id), "reason": f"job ended {when}", "at": time.time()})

    def _check_restarts(self) -> None:
        if self.status.restarts >= self.settings.max_restarts:
            job = self.status.deaths[-1]["job_id"]
            raise ServerFailed(f"gateway of {self.settings.service}: job {job} ended; restarts used up "
                               f"(server.max_restarts={self.settings.max_restarts})")

    def scrape(self) -> None:
        """Before the gateways stop (teardown): their counters (requests by status, retries,
        ejections and session moves by replica job) into the summary, summed over the gateway's
        jobs that still answer."""
        counts: dict[str, dict] = {}
        for s in (self.status, self.successor):
            if s is None or s.entry is None:
                continue
            try:
                text = httpx.get(f"{s.entry.root_url}/metrics", headers=self._auth(), timeout=5.0,
                                 trust_env=False).raise_for_status().text
            except (httpx.HTTPError, GatewayKeyError):
                continue
            for family in text_string_to_metric_families(text):
                if family.name not in _SUMMARY_COUNTERS:
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = sample.labels.get("replica") or sample.labels.get("status") or "all"
                        into = counts.setdefault(family.name.removeprefix("gateway_"), {})
                        into[key] = into.get(key, 0) + int(sample.value)
        self.counts = counts

    def per_replica(self) -> dict[int, dict[str, int]] | None:
        """Replica index -> the requests, retries and failures the gateway counted for it (``scrape``),
        summed over the replica's jobs (a replacement, a successor: ``<replica>-<job id>``); None when
        no gateway job answered the scrape (no count is not a count of 0)."""
        if not self.counts:
            return None
        figures: dict[int, dict[str, int]] = {}
        for name in PER_REPLICA:
            for key, n in self.counts.get(f"replica_{name}", {}).items():
                replica = figures.setdefault(int(key.partition("-")[0]), dict.fromkeys(PER_REPLICA, 0))
                replica[name] += n
        return figures

    def _auth(self) -> dict[str, str]:
        """The key the gateway takes (every route but its health route needs it)."""
        key = gateway_key(self.job.api_key_file)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _write_endpoint_file(self, url: str) -> None:
        # Replaced whole (a reader never sees half a URL): write beside, then rename.
        tmp = self.endpoint_file.with_name(f".{self.endpoint_file.name}.tmp")
        tmp.write_text(url + "\n")
        tmp.replace(self.endpoint_file)

    def summary(self) -> dict | None:
        s = self.status
        if s is None:
            return None
        return {"job_id": str(s.job.job_id), "base_url": s.entry.base_url if s.entry else None,
                "ready_after_s": None if s.ready_after_s is None else round(s.ready_after_s, 2),
                "restarts": s.restarts, "deaths": s.deaths, "rollovers": s.rollovers,
                "endpoint_file": str(self.endpoint_file), "counts": self.counts}
