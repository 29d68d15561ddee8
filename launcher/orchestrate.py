"""One run: start the servers, wait until they answer, run the job, tear down, summarise."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from jobs.command import Endpoints, GymConfig, gym_prefix_contiguity, run as run_command
from jobs.requeue import Requeueable
from jobs.rollouts import FAILURES_FILE, ROLLOUTS_FILE, collect
from launcher import console as views
from launcher import events
from launcher import exit_codes
from launcher import pools
from launcher import report
from launcher import resume
from launcher.events import RunEvents, Seen
from launcher.executors import ClusterRefused, Resources, SubmissionRefused, make_backend
from launcher.pools import ServerPool, pool_namespace
from launcher.fleet import Fleet, FleetSettings, job_history
from launcher.gateways import PER_REPLICA, ServiceGateway
from launcher.readiness import ReplicaStatus, ServerFailed
from launcher.spec import GENERATE_KEY, CommandJob, NoJob, RolloutsJob, RunSpec
from server.gateway import GatewayJob
from server.job import ServerJob, ServerSettings, engine_log, run as run_server
from server.process import log_tail
from server.registry import Entry, JobRecord, OwnerHeartbeat, gateway_service
from server.verify import CheckResult, readiness_checks

log = logging.getLogger(__name__)

_POLL_S = 0.2  # the job loop's look at the service and the job: cheap (cached sacct, a few stats)


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM reached the launcher, or ``launcher.down`` stopped its run from another shell.

    A BaseException, as KeyboardInterrupt: the signal handler raises it wherever the main thread is,
    and library code there may catch every Exception (submitit's sacct poll does, and logged
    "Bypassing sacct error SIGINT" while the run went on serving: a Ctrl-C lost)."""

    def __init__(self, why: str, from_another_shell: bool = False) -> None:
        super().__init__(why)
        self.from_another_shell = from_another_shell


class JobFailed(RuntimeError):
    pass


class Run:
    """One run. With ``sweep_dir`` (a Hydra multirun) its servers are a pool shared by every point
    of the sweep with the same server configuration."""

    def __init__(
        self, spec: RunSpec, run_dir: Path, console: Console | None = None, sweep_dir: str | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        self.spec = spec
        self.overrides = overrides or []  # the command line's (a sweep point's own values included), for summary.json
        self.run_dir = Path(run_dir)
        self.console = console or Console()
        self.run_id = f"{spec.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.started = time.time()  # this attempt's (summary.json attempts)
        self.sweep_dir = sweep_dir
        self.namespace = pool_namespace(spec.run.name, sweep_dir, spec.server_hash()) if sweep_dir else self.run_id
        self.registry = spec.registry
        self.backend = make_backend(spec.cluster, self.run_dir / "submitit")
        self.pool: ServerPool | None = None
        self.fleet: Fleet | None = None
        self.gateway: ServiceGateway | None = None  # gateway.enabled: the service's one URL
        self.joined = False
        self.released = False  # the teardown stopped the servers: their namespace must go
        self.took_over = False  # joined the servers of the run this one resumes: they are this run's now
        self.resumed_from: dict | None = None  # run.resume: the interrupted run's id and the rows it left
        self.log_dir = self.run_dir / "logs"
        self.replicas: list[ReplicaStatus] = []
        self.phases: dict[str, float] = {}
        self.collection: dict | None = None
        self.job_result: dict | None = None  # job=command/gym: what ran, for how long, its logs
        self.other_jobs: list = []  # submitted jobs besides the servers, still to cancel
        self.api_key_file: str | None = None
        # Each state change, recorded in events.jsonl; printed as a line when no terminal shows the live view.
        self.events = RunEvents(self.run_dir, None if self.console.is_terminal else self._print_plain)
        self.job_seen: Seen | None = None  # the job that uses the service, as last seen

    # ------------------------------------------------------------ phases

    def execute(self) -> int:
        """Run every phase; always tear down. Returns the process exit code."""
        status, error, interrupted_by_down = "succeeded", None, False
        try:
            self._preflight()
        except ClusterRefused as e:
            # Nothing exists yet (no job, no registry namespace): refused like a config error.
            self.console.print(f"[red bold]refused:[/] {escape(str(e))}")
            return exit_codes.REFUSED
        try:
            with _signals_raise_interrupted():
                if self.spec.run.resume is not None:
                    with self._phase("take over"):
                        self._take_over()
                self._record()
                log.info("should this launcher die without a word, resume with: %s", resume.command(self.run_dir))
                with self._phase("servers start"):
                    self._start_servers()
                with self._phase("servers ready"):
                    self._wait_ready()
                if self.gateway is not None:
                    with self._phase("gateway ready"):
                        self._wait_gateway()
                job = self.spec.job
                if isinstance(job, RolloutsJob):
                    with self._phase("rollouts"):
                        self._run_rollouts(job)
                elif isinstance(job, CommandJob):
                    with self._phase(job.kind):
                        self._run_command(job)
                else:
                    self._serve_until_interrupted()
        except Interrupted as e:
            # For job=none an interrupt is the normal way to end the run.
            status = "stopped" if isinstance(self.spec.job, NoJob) or e.from_another_shell else "interrupted"
            error = str(e) if e.from_another_shell else None
            self._say(f"{status}" + (f" from another shell ({escape(str(e))})" if e.from_another_shell else "")
                      + ": tearing down", "yellow")
            interrupted_by_down = e.from_another_shell
        except (ServerFailed, JobFailed, SubmissionRefused) as e:
            status, error = "failed", str(e)
            self._say(f"[red bold]failed:[/] {escape(str(e))}")
        except Exception as e:  # noqa: BLE001 - whatever it was, the run is torn down and summarised
            log.exception("the run failed unexpectedly")
            status, error = "failed", f"{type(e).__name__}: {e}"
            self._say(f"[red bold]failed:[/] {escape(error)} (traceback in {escape(str(self.run_dir))}/launcher.log)")
        finally:
            with _signals_ignored(), self._phase("teardown"):
                try:
                    self._teardown(status)
                except Exception as e:  # noqa: BLE001 - the summary is written all the same
                    log.exception("teardown failed")
                    status, error = "failed", error or f"teardown failed: {type(e).__name__}: {e}"
                    self._say(f"[red bold]teardown failed:[/] {escape(str(e))}")
                self._remove_namespace_left()
            self.backend.tidy()
        self.events.end(status)
        summary = self._write_summary(status, error)
        self.console.print(views.summary_table(summary))
        try:
            self._say(f"report: {escape(str(report.write(self.run_dir)))}")
        except Exception:  # noqa: BLE001 - a report that cannot be drawn must not change the run's outcome
            log.exception("report.html could not be written")
        self._say(f"run folder: {escape(str(self.run_dir))}")
        # Stopped from another shell is an interrupt, whatever the job; a serve-only run's Ctrl-C is its normal end.
        code = exit_codes.INTERRUPTED if interrupted_by_down else exit_codes.for_status(status)
        if code in (exit_codes.FAILED, exit_codes.INTERRUPTED) and not isinstance(self.spec.job, NoJob):
            self._say_command("to resume: " + resume.command(self.run_dir))
        return code

    def _start_servers(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.took_over:
            pass  # the interrupted run's pool, joined by _take_over
        elif self.sweep_dir is None:
            self._launch_pool()
        else:
            with self.registry.pool_lock(self.namespace):
                self._join_pool() or self._launch_pool()
        s = self.spec.server
        settings = FleetSettings(
            service=s.service, namespace=self.namespace, startup_timeout_s=s.startup_timeout_s,
            max_restarts=s.max_restarts, no_replica_grace_s=s.no_replica_grace_s,
            replaces=self.took_over or not self.joined, time_limit_s=self.spec.cluster.timeout_min * 60,
            signal_delay_s=self.spec.cluster.signal_delay_s, rollover_lead_s=s.rollover_lead_s,
        )
        self.fleet = Fleet(
            settings, self.backend, self.registry, self.pool.jobs, self._server_job, server_resources(self.spec, self.run_id),
            self._checks, self._engine_log, say=lambda text: self._say(escape(text), "yellow"),
            before_death=self._check_stop_request,
        )
        self.replicas = self.fleet.replicas
        verb = "joined" if self.joined else "submitted"
        for r in self.replicas:
            self._say(escape(f"{verb} {self.spec.server.service}/{r.replica}: job {r.job.job_id}"))
        if self.spec.gateway.enabled:
            self._start_gateway(settings)
        if not self.joined:  # a joined pool's jobs were submitted before: their first state is the first look's
            self._observe()

    def _start_gateway(self, settings: FleetSettings) -> None:
        """The service's gateway: the joined pool's when it still runs, else a new job."""
        s, c, g = self.spec.server, self.spec.cluster, self.spec.gateway
        entries = self.registry.entries(self.namespace, s.service)
        job = GatewayJob(
            namespace=self.namespace, service=s.service, model=s.served_name, registry=self.registry,
            settings=g.settings(), advertise_host=c.advertise_host, advertise_interface=c.advertise_interface,
            cluster=self.backend.kind,
            api_key_file=self.api_key_file or next((e.api_key_file for e in entries if e.api_key_file), None),
        )
        resources = gateway_resources(self.spec, self.run_id)
        self.gateway = ServiceGateway(
            job, self.backend, resources, dataclasses.replace(settings, time_limit_s=resources.timeout_min * 60),
            self.run_dir / f"{s.service}.url", self._checks, say=lambda text: self._say(escape(text), "yellow"),
        )
        if self.joined and self.gateway.adopt(self.registry.recorded_jobs(self.namespace)):
            self._say(escape(f"joined {gateway_service(s.service)}: job {self.gateway.status.job.job_id}"))
            return
        submitted = self.gateway.submit()
        self._say(escape(f"submitted {gateway_service(s.service)}: job {submitted.job.job_id}"))

    def _join_pool(self) -> bool:
        """Use the sweep's live pool for this server configuration, if there is one."""
        pool = pools.kept(self.namespace)
        if pool is None:
            record = self.registry.recorded_jobs(self.namespace)
            # Joined only through the backend that recorded the jobs: another cluster's ids mean nothing here.
            if not (record and record.kind == self.backend.kind and self.backend.alive_ids(record.job_ids)
                    and self.registry.live_owners(self.namespace)):
                self.registry.remove_namespace(self.namespace)  # whatever a dead pool left
                return False
            heartbeat = self._owner_heartbeat()
            pool = self._pool(self.backend.jobs_from_ids(record.job_ids), heartbeat)
        self.pool, self.joined = pool, True
        return True

    def _pool(self, jobs: list, heartbeat: OwnerHeartbeat) -> ServerPool:
        return ServerPool(self.namespace, self.registry, self.backend, jobs, heartbeat, self.spec.server.stop_grace_s,
                          shared=self.sweep_dir is not None)

    def _owner_heartbeat(self) -> OwnerHeartbeat:
        return self.registry.owner_heartbeat(self.namespace, self.run_id, str(self.run_dir.resolve())).start()

    def _launch_pool(self) -> None:
        spec = self.spec
        if spec.server.api_key == GENERATE_KEY:
            self.api_key_file = str(self.registry.create_api_key(self.namespace))
        elif spec.server.api_key is not None:
            self.api_key_file = str(Path(spec.server.api_key).expanduser().resolve())
        # Heartbeat first: server jobs that find no live owner stop themselves.
        heartbeat = self._owner_heartbeat()
        jobs = [self._server_job(i) for i in range(spec.server.replicas)]
        try:
            submitted = self.backend.submit_many(run_server, jobs, server_resources(self.spec, self.run_id))
        except BaseException:
            # Nothing was queued: leave nothing behind either (key, owner file, the folder).
            heartbeat.stop()
            self.registry.remove_namespace(self.namespace)
            raise
        self.registry.record_jobs(self.namespace, JobRecord(
            kind=self.backend.kind, job_ids=[str(j.job_id) for j in submitted], server_hash=spec.server_hash(),
        ))
        self.pool = self._pool(submitted, heartbeat)

    def _server_job(self, replica: int) -> ServerJob:
        s, m, c = self.spec.server, self.spec.model, self.spec.cluster
        settings = {f.name: getattr(s, f.name) for f in dataclasses.fields(ServerSettings)}
        return ServerJob(
            **settings, namespace=self.namespace, service=s.service, replica=replica, engine=s.engine_spec(),
            registry=self.registry, log_dir=str(self.log_dir), cluster=self.backend.kind, model_path=m.path,
            embedded_model=m.embedded, model_cache_dir=m.cache_dir, bind_host=c.bind_host,
            advertise_host=c.advertise_host, api_key_file=self.api_key_file, config_hash=self.spec.server_hash(),
            nodes=s.nodes_per_replica, advertise_interface=c.advertise_interface, multinode_backend=s.multinode_backend,
            gated=True,  # clients see a replica (a replacement too) only once the readiness gate passed it
        )

    def _wait_ready(self) -> None:
        service = self.spec.server.service
        with self._live_servers() as update:
            self.fleet.wait_ready(update)
        self._observe()
        if self.gateway is None:
            self.console.print(self._servers_table())
        for r in self.replicas:
            log.info("replica %s/%d ready at %s after %.1fs", service, r.replica, r.entry.base_url, r.ready_after_s)

    def _wait_gateway(self) -> None:
        """The replicas are ready: the gateway's turn, through the same checks, the replicas watched meanwhile."""
        with self._live_servers() as update:
            def on_update() -> None:
                self.fleet.watch()
                update()

            self.gateway.wait_ready(on_update)
        self._observe()
        self.console.print(self._servers_table())
        log.info("gateway of %s ready at %s", self.spec.server.service, self.gateway.url)

    @contextmanager
    def _live_servers(self) -> Iterator[Callable[[], None]]:
        """A live table of the replicas (and the gateway); yields what refreshes it."""
        with Live(self._servers_table(live=True), console=self.console, transient=True) as live:
            def update() -> None:
                self._check_stop_request()
                if self.gateway is not None:  # submitted with the replicas: its state from then on
                    self.gateway.look()
                self._observe()
                live.update(self._servers_table(live=True))

            yield update

    def _servers_table(self, live: bool = False):
        gateway = self.gateway.status if self.gateway else None
        return views.servers_table(self.spec.server.service, self.replicas, live=live, gateway=gateway)

    def _checks(self, entry: Entry) -> list[CheckResult]:
        """The gate follows the job: tool calling if its tasks offer tools, token ids/logprobs (and
        ``/tokenize``) if it records them (the built-in collector always does; Gym in its training
        variant)."""
        job = self.spec.job
        return readiness_checks(
            entry.base_url, entry.model, api_key=entry.read_api_key(),
            tools=isinstance(job, RolloutsJob) and job.uses_tools,
            logprobs=isinstance(job, RolloutsJob) or (isinstance(job, CommandJob) and job.records_token_ids),
        )

    def _run_rollouts(self, job: RolloutsJob) -> None:
        # Through the gateway: the collector finds it in the registry as it finds a replica, and follows
        # a replacement there; its requests name their conversation (X-Session-ID), so turns stick.
        service = gateway_service(job.collector.service) if self.gateway else job.collector.service
        collector = dataclasses.replace(
            job.collector, output_dir=str(self.run_dir), namespace=self.namespace, registry=self.registry,
            service=service,
        )
        total = job.num_rollouts
        submitted = self._submit(Requeueable(collect), collector, job, "rollouts")
        self._say(f"submitted rollouts: job {submitted.job_id}, {total} rollouts")
        rollouts, failures = GrowingLines(self.run_dir / "rollouts.jsonl"), GrowingLines(self.run_dir / "failures.jsonl")
        progress = views.rollout_progress(self.console)

        def show(state: str, final: bool = False) -> None:
            written, failed = rollouts(), failures()
            progress.update(bar, completed=written, failures=failed, state=state)
            self.events.progress(written, total, failed, final)

        with progress:
            bar = progress.add_task("rollouts", total=total, failures=0, state="")
            self._watch(submitted, show)
            show("", final=True)
        try:
            self.collection = submitted.result().to_json()
        except Exception as e:  # submitit re-raises the job's failure with its traceback
            if "CollectionStopped: " in str(e):  # its SIGTERM came from outside the run (scancel, preemption)
                self._job_ended("CANCELLED", _job_error(e))
                raise Interrupted(f"rollout job {submitted.job_id} {_job_error(e)}", from_another_shell=True) from None
            self._job_ended("FAILED", _job_error(e))
            raise JobFailed(f"rollout job {submitted.job_id} failed: {_job_error(e)}") from None
        self._job_ended("COMPLETED")
        self.other_jobs = []

    def _run_command(self, job: CommandJob) -> None:
        """Submit the program with the endpoints the readiness gate passed (the gateway's one URL, or
        the replicas'); its exit code is the run's."""
        entries = [r.entry for r in self.replicas if r.entry]
        endpoints = Endpoints(
            service=self.spec.server.service, namespace=self.namespace, registry=self.registry,
            base_urls=[self.gateway.url] if self.gateway else [e.base_url for e in entries], model=entries[0].model,
            api_key_file=entries[0].api_key_file,
            endpoint_file=str(self.gateway.endpoint_file) if self.gateway else None,
        )
        process = dataclasses.replace(job.process, run_dir=str(self.run_dir), endpoints=endpoints)
        submitted = self._submit(Requeueable(run_command), process, job, job.kind)
        self._say(f"submitted {job.kind}: job {submitted.job_id}, logs in {escape(str(process.log_dir))}")
        with self.console.status(f"{job.kind} running") as status:
            self._watch(submitted, lambda state: status.update(escape(f"{job.kind} running {state}")))
        try:
            result = submitted.result()
        except Exception as e:  # submitit's message is the job's traceback: its last exception is ours
            self._job_ended("FAILED", _job_error(e))
            raise JobFailed(f"{job.kind} job {submitted.job_id} failed: {_job_error(e)}") from None
        self._job_ended("COMPLETED")
        self.other_jobs = []
        self.job_result = result.to_json()
        if isinstance(process, GymConfig):
            output = Path(result.output)
            contiguous, checked = gym_prefix_contiguity(output)
            self.collection = {"rollouts_written": GrowingLines(output)(), "rollouts_path": str(output),
                               "prefix_contiguous": contiguous, "prefix_checked": checked}

    def _watch(self, submitted, show: Callable[[str], None]) -> None:
        """Until the job that uses the service ends: the service watched (and healed) every poll, the
        job's state shown (blank while it runs)."""
        state = None
        while not self.backend.finished(submitted):
            self._check_servers_alive()
            previous, state = state, self._job_state(submitted)
            # Running, then pending again: requeued at its time limit (jobs/requeue.py; Slurm only, a
            # local job's controller restarts it unseen).
            # Slurm holds a requeued job with reason BeginTime; accounting that lags behind the queue
            # may say PENDING for a job already running, which is no requeue.
            if previous == "" and state.startswith(("job PENDING (BeginTime", "job REQUEUED")):
                self._say(escape(f"job {submitted.job_id} requeued near its time limit; it resumes ({state})"),
                          "yellow")
            self._observe()
            show(state)
            time.sleep(_POLL_S)

    def _submit(self, fn, arg, job: RolloutsJob | CommandJob, label: str):
        submitted = self.backend.submit(fn, arg, job_resources(self.spec, job, label, self.run_id))
        self.other_jobs = [submitted]
        self.job_seen = Seen(events.JOB, str(submitted.job_id), "SUBMITTED")
        self._observe()
        self._record()  # a resume stops it first, should this launcher die without a word
        return submitted

    def _job_state(self, job) -> str:
        """Blank while running; else the state, with Slurm's reason for a pending job."""
        state = self.backend.state(job)
        reason = self.backend.pending_reason(job) if state == "PENDING" else None
        # Not recorded: UNKNOWN (accounting has not seen a fresh job yet) and PENDING after RUNNING but
        # for a requeue (accounting lagging behind the queue): neither is what the job does.
        lag = state == "UNKNOWN" or (state == "PENDING" and self.job_seen.state == "RUNNING"
                                     and not (reason or "").startswith("BeginTime"))
        if not lag:
            self.job_seen = Seen(events.JOB, str(job.job_id), state, reason)
        if state == "RUNNING":
            return ""
        if state == "PENDING" and (why := self.backend.never_starts(job)):
            raise JobFailed(why)
        return f"job {state} ({reason})" if reason else f"job {state}"

    def _job_ended(self, state: str, why: str | None = None) -> None:
        """How the job that used the service ended, by its result (a local job's state says only FINISHED)."""
        self.job_seen = Seen(events.JOB, self.job_seen.job_id, state, why.splitlines()[0] if why else None)
        self._observe()

    def _serve_until_interrupted(self) -> None:
        urls = self.gateway.url if self.gateway else ",".join(r.entry.base_url for r in self.replicas if r.entry)
        service = self.spec.server.service
        self._say_command(f"serving {service} at {urls}  (Ctrl-C to stop)")
        self._say_command(f"  python -m server.registry --namespace {self.namespace} urls {service}")
        first = next(r.entry for r in self.replicas if r.entry)
        auth = f'-H "Authorization: Bearer $(cat {first.api_key_file})" ' if first.api_key_file else ""
        if first.api_key_file:
            self._say_command(f"  API key: {first.api_key_file} (send it as Authorization: Bearer <key>)")
        self._say_command(f"  curl {auth}{urls.split(',')[0]}/models")
        while True:
            self._check_servers_alive()
            time.sleep(_POLL_S)

    def _check_servers_alive(self) -> None:
        """One look at the service while it is in use: a dead replica is replaced (launcher/fleet.py)."""
        self._check_stop_request()
        self.fleet.watch()
        if self.gateway is not None:
            self.gateway.watch()
        self._observe()

    def _observe(self) -> None:
        """One look for the record (launcher/events.py): every job the run holds now, and their deaths."""
        seen, deaths = [], {}
        if self.fleet is not None:
            for r in [*self.fleet.replicas, *self.fleet.successors]:
                seen.append(Seen(events.replica(r.replica), str(r.job.job_id), *events.job_state(r.state)))
            deaths = {d["job_id"]: d["reason"] for r in self.fleet.replicas for d in r.deaths}
        if self.gateway is not None and self.gateway.status is not None:  # None: its submission failed
            for g in (self.gateway.status, self.gateway.successor):
                if g is not None:
                    seen.append(Seen(events.GATEWAY, str(g.job.job_id), *events.job_state(g.state)))
            deaths |= {d["job_id"]: d["reason"] for d in self.gateway.status.deaths}
        if self.job_seen is not None:
            seen.append(self.job_seen)
        self.events.observe(seen, deaths)

    def _check_stop_request(self) -> None:
        by = self.registry.stop_request(self.namespace)
        if by is not None:
            raise Interrupted(f"stopped by {by}", from_another_shell=True)

    # ------------------------------------------------------------ resume (launcher/resume.py)

    def _record(self) -> None:
        resume.write_record(self.run_dir, resume.RunRecord(
            run_id=self.run_id, namespace=self.namespace, cluster=self.backend.kind,
            job_ids=[str(j.job_id) for j in self.other_jobs], **resume.this_launcher(),
            rollouts_total=self.spec.job.num_rollouts if isinstance(self.spec.job, RolloutsJob) else None,
        ))

    def _take_over(self) -> None:
        """``run.resume``: the interrupted run's job that writes into this folder is stopped first (two
        collectors must never append to one file); its servers are joined when all are alive, and this
        run owns them from then on (its heartbeat, its replacements); else what is left of them goes."""
        say = lambda text: self._say(escape(text), "yellow")  # noqa: E731
        old = resume.read_record(self.run_dir)
        if old is not None:
            grace_s = self.spec.job.process.stop_grace_s if isinstance(self.spec.job, CommandJob) else 0
            resume.stop_jobs(old.cluster, old.job_ids, self.backend.folder,
                             max(grace_s, self.spec.server.stop_grace_s), say, "job writing into this folder")
        self.resumed_from = {"run_id": old.run_id if old else None,
                             "rollouts_before": GrowingLines(self.run_dir / "rollouts.jsonl")()}
        self._say(escape(f"resuming {self.run_dir} (run {self.resumed_from['run_id'] or 'unrecorded'}): "
                         f"{self.resumed_from['rollouts_before']} rollouts already written"))
        s = self.spec.server
        ids = old and resume.live_servers(self.registry, old, self.backend.kind, self.spec.server_hash(),
                                          s.service, s.replicas)
        if not ids:
            if old is not None:
                resume.clear_namespace(self.registry, old, self.backend.folder, s.stop_grace_s, say)
            self._say("starting new servers")
            return
        self.namespace = old.namespace
        heartbeat = self._owner_heartbeat()
        self.registry.remove_owner(old.namespace, old.run_id)  # it left no one else to let go of them
        entries = self.registry.entries(old.namespace, s.service)
        self.api_key_file = entries[0].api_key_file if entries else None  # for replacements
        self.pool = self._pool(self.backend.jobs_from_ids(ids), heartbeat)
        self.joined = self.took_over = True
        replicas = "0" if s.replicas == 1 else f"0-{s.replicas - 1}"
        self._say(escape(f"joined the interrupted run's servers {s.service}/{replicas} (jobs {', '.join(ids)})"))

    # ------------------------------------------------------------ what the jobs ask of the cluster

    def _preflight(self) -> None:
        """The backend refuses (``ClusterRefused``) what its cluster can never run, and keeps what
        the run's jobs ask, to judge later whether a pending one is starved by its siblings."""
        t0 = time.monotonic()
        if self.backend.preflight(cluster_asks(self.spec)):  # a backend that checks nothing adds no phase
            self.phases["cluster check"] = time.monotonic() - t0
        if self.backend.rollover_note and self.spec.server.rollover_lead_s != 0:
            self._say(escape(f"note: {self.backend.rollover_note}"), "yellow")

    # ------------------------------------------------------------ teardown

    def _teardown(self, status: str) -> None:
        """Stop this run's own jobs; let go of its servers (a sweep keeps them for its next points).
        What it waits for (which jobs, how long) is said before each wait, as a timestamped line
        without a terminal."""
        say = self.events.note if not self.console.is_terminal else lambda text: self._say(escape(text), "yellow")
        job = self.spec.job
        # A program job stops its own programs first (job.stop_grace_s): do not kill it before that.
        grace_s = max(self.spec.server.stop_grace_s, job.process.stop_grace_s if isinstance(job, CommandJob) else 0)
        self.backend.stop(self.other_jobs, grace_s, say, f"{job.kind} job")
        if self.other_jobs and self.job_seen is not None:  # still running when the run ended: stopped now
            self._job_ended("CANCELLED", f"stopped at teardown ({status})")
        self.other_jobs = []
        if self.pool is None:
            return
        if self.fleet is not None:  # replacements included: every job that serves the pool now
            self.fleet.close()
            self.pool.jobs = self.fleet.jobs
        if self.gateway is not None:  # its successors and replacements included
            self.gateway.scrape()
            self.pool.gateways = self.gateway.jobs
        if self.sweep_dir is not None and status == "succeeded":
            if pools.kept(self.namespace) is None:
                pools.keep(self.pool)
            self._say(escape(f"servers of {self.namespace} kept for the sweep's next points (stopped when the sweep ends)"))
        else:
            self.released = pools.release(self.pool, say)

    def _remove_namespace_left(self) -> None:
        """The namespace of servers this run stopped (entries, API key) is gone at the end, also when a
        hiccup of the shared filesystem kept the teardown from removing it: tried again for up to
        ``registry.ttl_s``, then reported."""
        if not self.released:
            return
        deadline = time.monotonic() + self.registry.ttl_s
        while self.registry.namespace_exists(self.namespace):
            if time.monotonic() > deadline:
                self._say(escape(f"registry namespace {self.namespace} could not be removed: remove "
                                 f"{self.registry.root / self.namespace} by hand"), "red")
                return
            log.warning("registry namespace %s still there after teardown; removing it again", self.namespace)
            time.sleep(self.registry.heartbeat_s)
            self.registry.remove_namespace(self.namespace)

    # ------------------------------------------------------------ helpers

    def _say(self, markup: str, style: str | None = None) -> None:
        """Print to the terminal and log the same words (the run folder's launcher log)."""
        self.console.print(markup, style=style)
        log.info(Text.from_markup(markup).plain)

    def _say_command(self, line: str) -> None:
        """A line holding a command to copy: never wrapped (at any width: a wrapped resume command
        pasted as two lines started a fresh default run), no markup, no highlighting."""
        self._print_plain(line)
        log.info(line)

    def _print_plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        self.events.phase(name)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - t0

    def _engine_log(self, replica: int) -> str:
        s = self.spec.server
        if s.nodes_per_replica == 1:
            return log_tail(engine_log(self.log_dir, s.service, replica), lines=25)
        return "\n".join(f"--- node {k}:\n" + log_tail(engine_log(self.log_dir, s.service, replica, k, s.nodes_per_replica),
                                                         lines=25) for k in range(s.nodes_per_replica))

    def _write_summary(self, status: str, error: str | None) -> dict:
        path = self.run_dir / resume.SUMMARY_FILE
        requests_by, requests = self._requests_per_replica()
        rollouts = self._rollouts_written()
        summary = {
            "run": self.spec.run.name,
            "namespace": self.namespace,
            "run_id": self.run_id,
            "overrides": self.overrides,
            "joined_servers": self.joined,
            "resumed_from": self.resumed_from,
            "status": status,
            "error": error,
            "run_dir": str(self.run_dir),
            "summary_path": str(path),
            "phases": {k: round(v, 2) for k, v in self.phases.items()},
            "servers": [
                {
                    "service": self.spec.server.service,
                    "replica": r.replica,
                    "job_id": str(r.job.job_id),
                    # Only a job that passed the gate served there (a replacement's `starting` entry has one too).
                    "base_url": r.entry.base_url if r.entry and r.ready_after_s is not None else None,
                    "ready_after_s": None if r.ready_after_s is None else round(r.ready_after_s, 2),
                    "readiness_gate_s": None if r.gate_s is None else round(r.gate_s, 2),
                    "checks": [c.name for c in r.checks],  # what the gate checked (server/verify.py)
                    # Replacements (launcher/fleet.py): how often, why each job before died, time not ready.
                    "restarts": r.restarts,
                    "deaths": r.deaths,
                    "down_s": round(r.down_s, 2),
                    "rollovers": r.rollovers,  # time-limit handovers to a successor job (not deaths)
                    "state": r.state,  # its current job's, as the run ended ("ready": it was serving)
                    "jobs": job_history(r),  # each job of the replica: whether it served, how it ended
                    # What it was sent (requests_counted_by says who counted): None when no one did.
                    **(requests.get(r.replica, dict.fromkeys(PER_REPLICA, 0)) if requests is not None else
                       dict.fromkeys(PER_REPLICA)),
                }
                for r in self.replicas
            ],
            "requests_counted_by": requests_by,
            "gateway": self.gateway.summary() if self.gateway else None,
            "collection": self.collection,
            "rollouts": rollouts,
            "job": self.job_result,
            "started": self.started,
            "ended": time.time(),
        }
        before = self.resumed_from["rollouts_before"] if self.resumed_from else 0
        summary["rollouts_written_this_attempt"] = rollouts["written"] - before if rollouts else None
        earlier = resume.earlier_attempts(self.run_dir, self.resumed_from["run_id"]) if self.resumed_from else []
        summary["attempts"] = [*earlier, resume.attempt_of(summary)]
        summary["totals"] = resume.totals(summary["attempts"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _requests_per_replica(self) -> tuple[str | None, dict[int, dict] | None]:
        """Who counted the requests each replica was sent, and the counts by replica index: the gateway
        when there is one (it routed them; the collector saw only the gateway), else the collector's
        own pool; None for a program talking to the replicas itself, or when no gateway job answered
        the scrape."""
        if self.gateway is not None:
            counted = self.gateway.per_replica()
            return ("gateway" if counted is not None else None), counted
        if self.collection and self.collection.get("replicas") is not None:
            return "collector", {int(k): {name: v[name] for name in PER_REPLICA}
                                 for k, v in self.collection["replicas"].items()}
        return None, None

    def _rollouts_written(self) -> dict | None:
        """``{written, total, failed}`` from the run folder's files, whatever the run's end (the
        collector's own summary exists only when it finished)."""
        job = self.spec.job
        if not isinstance(job, RolloutsJob):
            return None
        return {"written": GrowingLines(self.run_dir / ROLLOUTS_FILE)(), "total": job.num_rollouts,
                "failed": GrowingLines(self.run_dir / FAILURES_FILE)()}


def check_cluster(spec: RunSpec) -> None:
    """Before Hydra creates anything: ``ClusterRefused`` (a ``SpecError``) when the cluster can
    never run the run's jobs, each alone or side by side. Costs two ``scontrol`` calls on Slurm."""
    make_backend(spec.cluster, Path("submitit")).preflight(cluster_asks(spec))


def cluster_asks(spec: RunSpec, run_id: str = "") -> list[Resources]:
    """What the run's jobs ask of the cluster: the server replicas, and the jobs that run beside
    them until the run ends (the gateway, the job that uses them); all of them must fit at once
    (launcher/slurm_fit.py ``refusals`` says why rollover successors need not)."""
    job = spec.job
    asks = [server_resources(spec, run_id)]
    if spec.gateway.enabled:
        asks.append(gateway_resources(spec, run_id))
    if isinstance(job, (RolloutsJob, CommandJob)):
        asks.append(job_resources(spec, job, "rollouts" if isinstance(job, RolloutsJob) else job.kind, run_id))
    return asks


# Slurm stores a job name whole (slurmdbd keeps up to 255 bytes); this leaves room and stays readable.
_JOB_NAME_MAX = 128


def job_name(spec: RunSpec, run_id: str, role: str = "") -> str:
    """``<run name>-<service>[-gateway|-job]-<run id's tail>``: in ``squeue -o %j`` and ``sacct`` a
    run's jobs say what they are, and two runs of one name (the default names a run after its job
    kind) differ by the random tail of their run ids (``Run.run_id``). Without a run id (the fit
    check before a run exists) no tail."""
    tail = "-".join(part for part in (spec.server.service, role, run_id.rsplit("-", 1)[-1]) if part)
    return f"{spec.run.name[:max(1, _JOB_NAME_MAX - len(tail) - 1)]}-{tail}"


def server_resources(spec: RunSpec, run_id: str = "") -> Resources:
    s, c = spec.server, spec.cluster
    return Resources(
        name=job_name(spec, run_id), timeout_min=c.timeout_min,
        gpus=s.gpus_per_replica // s.nodes_per_replica, nodes=s.nodes_per_replica,
        count=s.replicas, what=f"{s.service} server replica",
        keys={"gpus": "server.gpus_per_replica", "timeout_min": "cluster.timeout_min", "count": "server.replicas",
              "nodes": "server.nodes_per_replica"},
    )


def gateway_resources(spec: RunSpec, run_id: str = "") -> Resources:
    g = spec.gateway
    return Resources(
        name=job_name(spec, run_id, "gateway"), timeout_min=g.timeout_min or spec.cluster.timeout_min,
        partition=g.partition, cpus_per_task=g.cpus_per_task, mem_gb=g.mem_gb, what=f"{spec.server.service} gateway",
        keys={k: f"gateway.{k}" for k in ("timeout_min", "partition", "cpus_per_task", "mem_gb")},
    )


def job_resources(spec: RunSpec, job: RolloutsJob | CommandJob, label: str, run_id: str = "") -> Resources:
    return Resources(
        name=job_name(spec, run_id, "job"), timeout_min=job.timeout_min, partition=job.partition,
        cpus_per_task=job.cpus_per_task, mem_gb=job.mem_gb, what=f"{label} job",
        requeues=job.max_requeues,
        keys={k: f"job.{k}" for k in ("timeout_min", "partition", "cpus_per_task", "mem_gb")},
    )


def _job_error(e: Exception) -> str:
    """A job's own message (``CommandFailed``: exit code and log tail; ``CollectionStopped``;
    ``NotRequeued``: stopped at its time limit with its requeues used up) without
    submitit's traceback and footer around it."""
    text = str(e)
    for marker in ("CommandFailed: ", "CollectionStopped: ", "OutputBusy: ", "NotRequeued: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].split("\n----------------------")[0].strip()
    return text


class GrowingLines:
    """The lines of a file that grows, counted on from where the last look ended: the job loop looks
    five times a second, and re-reading the whole file each time cost more as it grew (3600 stand-in
    rollouts are ~20 MB; a long collection, gigabytes). A file that shrank (rewritten, a torn last
    line cut off) is counted afresh."""

    def __init__(self, path: Path) -> None:
        self.path, self._offset, self._count = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset = self._count = 0
                f.seek(self._offset)
                for chunk in iter(lambda: f.read(1 << 16), b""):
                    self._offset += len(chunk)
                    self._count += chunk.count(b"\n")
        except FileNotFoundError:
            self._offset = self._count = 0
        return self._count


@contextmanager
def _signals_raise_interrupted() -> Iterator[None]:
    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """Teardown must finish: a second Ctrl-C would leave jobs and entries behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
