"""The service's gateway as a run keeps it: one job, its URL, its replacement when it ends.

The gateway (server/gateway.py) runs as a job of its own beside the replicas, with the
``gateway.*`` requests (no GPU). It publishes itself in the registry as service
``<service>@gateway``. The run waits for that entry, then puts the gateway through the same
readiness checks as a replica (through its URL: the checks reach a replica behind it), and only
then hands its URL to the job that uses the service. When the gateway's job ends (a crash, its
time limit, a lost node) a successor is submitted at once, at most ``server.max_restarts``
times; its new URL goes into the endpoint file (``<run folder>/<service>.url``), and clients that
read the registry (the built-in collector) follow it by themselves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import submitit

from launcher.executors import Backend, Resources
from launcher.readiness import ServerFailed
from server.gateway import GatewayJob, run_job
from server.registry import Entry, JobRecord, Registry, gateway_service
from server.verify import CheckResult


@dataclass
class GatewayStatus:
    """What the live view and the summary show of the gateway."""

    job: submitit.Job
    state: str = "SUBMITTED"
    entry: Entry | None = None
    ready_after_s: float | None = None
    submitted_at: float = 0.0
    restarts: int = 0
    deaths: list[dict] | None = None


class ServiceGateway:
    def __init__(self, job: GatewayJob, backend: Backend, resources: Resources, max_restarts: int,
                 startup_timeout_s: float, endpoint_file: Path, checks: Callable[[Entry], list[CheckResult]],
                 say: Callable[[str], None]) -> None:
        self.job, self.backend, self.resources = job, backend, resources
        self.registry: Registry = job.registry
        self.max_restarts, self.startup_timeout_s = max_restarts, startup_timeout_s
        self.endpoint_file, self._checks, self._say = endpoint_file, checks, say
        self.status: GatewayStatus | None = None
        self._deaths: list[dict] = []

    @property
    def url(self) -> str | None:
        """The gateway's base URL (``http://host:port/v1``) once it passed the checks."""
        s = self.status
        return s.entry.base_url if s and s.entry and s.ready_after_s is not None else None

    # ------------------------------------------------------------ its job

    def submit(self) -> submitit.Job:
        """A new gateway job, recorded with the namespace's jobs (``launcher.down``, joining runs)."""
        job = self.backend.submit(run_job, self.job, self.resources)
        record = self.registry.recorded_jobs(self.job.namespace)
        if record is not None:
            record.gateway_job_ids.append(str(job.job_id))
            self.registry.record_jobs(self.job.namespace, record)
        restarts = self.status.restarts + 1 if self.status else 0
        self.status = GatewayStatus(job=job, submitted_at=time.monotonic(), restarts=restarts, deaths=self._deaths)
        return job

    def adopt(self, record: JobRecord | None) -> bool:
        """The gateway of a pool this run joined (a sweep's, or the run it resumes), if it still runs."""
        ids = record.gateway_job_ids[-1:] if record else []
        if not ids or not self.backend.alive_ids(ids):
            return False
        self.status = GatewayStatus(job=self.backend.jobs_from_ids(ids)[0], submitted_at=time.monotonic(),
                                    deaths=self._deaths)
        return True

    # ------------------------------------------------------------ ready

    def wait_ready(self, on_update: Callable[[], None], poll_s: float = 0.2) -> None:
        """Until the gateway passed the readiness checks (the replicas are ready by then)."""
        while not self._step():
            on_update()
            time.sleep(poll_s)

    def watch(self) -> None:
        """One look while the run uses the service: a gateway whose job ended is replaced."""
        self._step()

    def _step(self) -> bool:
        """Whether the current job's gateway passed its checks; a job that ended is replaced."""
        s = self.status
        if self.backend.finished(s.job):
            self._replace(self.backend.state(s.job))
            return False
        if s.ready_after_s is not None:
            return True
        state = self.backend.state(s.job)
        if state == "PENDING" and (why := self.backend.never_starts(s.job)):
            raise ServerFailed(f"gateway job {s.job.job_id}: {why}")
        entry = self.registry.entry(self.job.namespace, gateway_service(self.job.service), 0, str(s.job.job_id))
        s.state = entry.state if entry else state
        if entry is None or entry.state != "ready" or not self._sees_every_replica(entry):
            if state == "RUNNING" and time.monotonic() - s.submitted_at > self.startup_timeout_s:
                raise ServerFailed(f"gateway job {s.job.job_id} not serving after {self.startup_timeout_s:g}s "
                                   f"(server.startup_timeout_s)\n{self.backend.log_tail(s.job)}")
            return False
        failed = [c for c in self._checks(entry) if not c.ok]
        if failed:
            # The replicas passed the same checks directly: the gateway is what fails them.
            raise ServerFailed(f"gateway {entry.base_url} (job {s.job.job_id}) fails the readiness checks: "
                               + "; ".join(f"{c.name}: {c.detail}" for c in failed))
        s.entry, s.state, s.ready_after_s = entry, "ready", time.monotonic() - s.submitted_at
        self._write_endpoint_file(entry.base_url)
        return True

    def _sees_every_replica(self, entry: Entry) -> bool:
        """The gateway routes to every replica the registry holds ready: it re-reads the registry
        every ``refresh_s``, and a job started at once would otherwise send all its first sessions
        to the replicas it saw first."""
        ready = len(self.registry.ready(self.job.service, self.job.namespace))
        try:
            health = httpx.get(f"{entry.root_url}/health", timeout=5.0, trust_env=False).json()
        except (httpx.HTTPError, ValueError):
            return False
        return health.get("usable_replicas", 0) >= ready

    def _replace(self, state: str) -> None:
        s = self.status
        reason = f"job {s.job.job_id} ended ({state})"
        self._deaths.append({"job_id": str(s.job.job_id), "reason": reason, "at": time.time()})
        # It could not remove its entry if it was killed: clients must not be sent there.
        self.registry.remove(self.job.namespace, gateway_service(self.job.service), 0, str(s.job.job_id))
        if s.restarts >= self.max_restarts:
            raise ServerFailed(f"gateway of {self.job.service}: {reason}; restarts used up "
                               f"(server.max_restarts={self.max_restarts})\n{self.backend.log_tail(s.job)}")
        self._say(f"gateway of {self.job.service}: {reason}; submitting a replacement")
        self.submit()

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
                "restarts": s.restarts, "deaths": self._deaths, "endpoint_file": str(self.endpoint_file)}
