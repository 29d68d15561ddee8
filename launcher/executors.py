"""Submitit executors behind one small interface: submit, state, cancel, logs.

``LocalBackend`` runs jobs on this machine (submitit's local executor),
``SlurmBackend`` submits them with sbatch; everything that differs between
schedulers lives in these two classes. Both also act on bare job ids
(``cancel_ids``, ``alive_ids``), so that ``launcher.down`` and runs joining a
shared server pool can stop jobs another process submitted: they ask the
backend of the kind that recorded the ids (``backend_class``), never guess.
"""

from __future__ import annotations

import getpass
import io
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit
from submitit.core.utils import FailedJobError

from launcher import slurm_fit
from launcher.spec import ClusterSpec, SpecError
from server.process import alive, log_tail

log = logging.getLogger(__name__)

# Slurm states in which a job may still run; anything else is an end.
_SLURM_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "UNKNOWN"}
_SACCT_EVERY_S = 2.0  # one sacct call serves every job; more often only loads slurmdbd
_SQUEUE_EVERY_S = 1.0  # one squeue call (all of this user's jobs) serves every pending reason
_NEVER_CONFIRM_S = 3.0  # a "never starts" verdict must hold this long, over two squeue snapshots
_VIEW_MAX_AGE_S = 30.0  # the nodes' states, for judging a pending job


class ClusterRefused(SpecError):
    """The cluster can never run what the run asks; found before anything was submitted (exit 2)."""


class SubmissionRefused(RuntimeError):
    """The scheduler refused a submission; its message is in ours, nothing of it was queued."""


@dataclass
class Resources:
    """What one job (or ``count`` alike, one array) asks of the cluster, beyond the cluster-wide settings."""

    name: str
    timeout_min: int
    gpus: int = 0  # per node
    nodes: int = 1  # >1: one task on each (a replica spanning nodes, server/multinode.py)
    partition: str | None = None  # None: the cluster's
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    count: int = 1
    # Requeues near the time limit (submitit's checkpoint protocol): the job's function must have a
    # ``checkpoint`` method (jobs.requeue.Requeueable); 0: a job that reaches its limit ends.
    requeues: int = 0
    what: str = ""  # for people: "policy server replica", "rollouts job"
    # The config key behind each value (partition, cpus_per_task, mem_gb, gpus, timeout_min, count),
    # named in refusals; a value left None falls back to cluster.<field>.
    keys: dict[str, str] = field(default_factory=dict)


class Backend:
    """Submits functions as jobs and reports on them; one subclass per cluster kind."""

    kind = ""
    # How often ``stop`` looks whether the jobs ended: a teardown waits for each stop up to this long.
    stop_poll_s = 0.5

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        self.cluster = cluster
        self.folder = Path(folder)
        self.rollover_note: str | None = None  # preflight: what rollovers will cost on this cluster

    def _executor(self, res: Resources) -> submitit.Executor:
        raise NotImplementedError

    def preflight(self, jobs: Sequence[Resources]) -> bool:
        """Before anything is submitted: raise ``ClusterRefused`` for what the cluster can never run.
        ``jobs[0]`` are the servers (``count`` replicas); the others must run beside them. Returns
        whether anything was checked."""
        return False

    def submit(self, fn: Callable, arg: Any, res: Resources) -> submitit.Job:
        with self._refusals(res, 1), _terminal_interrupts_ignored(), _outer_job_env_hidden():
            job = self._executor(res).submit(fn, arg)
        self._submitted([job], res)
        return job

    def submit_many(self, fn: Callable, args: Sequence[Any], res: Resources) -> list[submitit.Job]:
        """One submission for all ``args``: a job array on Slurm (one sbatch call)."""
        executor = self._executor(res)
        with self._refusals(res, len(args)), _terminal_interrupts_ignored(), _outer_job_env_hidden():
            with executor.batch():
                jobs = [executor.submit(fn, a) for a in args]
        self._submitted(jobs, res)
        return jobs

    def tidy(self) -> None:
        """Once the run's jobs are gone: submitit (and each job, as it starts) makes the ``%j`` folder of
        the path template itself, and leaves it empty; each job has a folder of its own."""
        try:
            (self.folder / "%j").rmdir()
        except OSError:  # not empty (a job's files went there) or not there
            pass

    def _submitted(self, jobs: Sequence[submitit.Job], res: Resources) -> None:
        """Hook: the backend's own record of what it submitted."""

    @contextmanager
    def _refusals(self, res: Resources, count: int) -> Iterator[None]:
        """A refused submission as ``SubmissionRefused`` with the scheduler's message, not a traceback
        (submitit raises with the submit command's stderr, and prints it too: that copy is dropped)."""
        captured = io.StringIO()
        try:
            with redirect_stderr(captured):
                yield
            sys.stderr.write(captured.getvalue())  # a submission that went through loses nothing
        except FailedJobError as e:  # the submit command ran and said no
            raise SubmissionRefused(self._refusal_text(str(e).strip(), res, count)) from None
        except OSError as e:  # it could not run (not installed, no folder)
            raise SubmissionRefused(f"could not submit {_jobs_label(res, count)}: {e}") from None

    def _refusal_text(self, message: str, res: Resources, count: int) -> str:
        return f"submitting {_jobs_label(res, count)} failed: {message}"

    def jobs_from_ids(self, job_ids: Sequence[str]) -> list[submitit.Job]:
        """Handles on jobs another process submitted (a run joining a shared pool)."""
        raise NotImplementedError

    def state(self, job: submitit.Job) -> str:
        return job.state

    def finished(self, job: submitit.Job) -> bool:
        return job.done()

    def pending_reason(self, job: submitit.Job) -> str | None:
        return None

    def time_left(self, job: submitit.Job) -> float | None:
        """Seconds until the scheduler ends the running ``job`` at its time limit; None while it does
        not run, or when it has no limit."""
        return None

    def drain(self, job: submitit.Job) -> None:
        """Send ``job`` the warning its time limit would (SIGUSR2): a server drains, then ends."""
        raise NotImplementedError

    def never_starts(self, job: submitit.Job) -> str | None:
        """Why a pending ``job`` can never start as things stand (e.g. the run's own jobs hold what
        it waits for), once that is certain; None while it may still start."""
        return None

    @classmethod
    def cancel_ids(cls, job_ids: Sequence[str], force: bool = False) -> None:
        """Stop jobs known only by id (submitted by this or another process): ask, or kill when ``force``."""
        raise NotImplementedError

    @classmethod
    def alive_ids(cls, job_ids: Sequence[str]) -> list[str]:
        """The ids of ``job_ids`` that may still run."""
        raise NotImplementedError

    @classmethod
    def submitted_from(cls, job_ids: Sequence[str], folder: Path) -> list[str]:
        """The ids of ``job_ids`` that still name jobs submitted with ``folder`` as their submitit folder
        (a resume stops what its run folder's record names, maybe long after): all of them where ids
        are not reused."""
        return list(job_ids)

    def cancel(self, job: submitit.Job) -> None:
        self.cancel_ids([str(job.job_id)])

    def force_cancel(self, job: submitit.Job) -> None:
        self.cancel_ids([str(job.job_id)], force=True)

    def stop(self, jobs: Sequence[submitit.Job], grace_s: float, say: Callable[[str], None],
             what: str = "jobs") -> None:
        """Ask ``jobs`` (``what`` names them for a person) to stop, wait up to ``grace_s`` (+15 s), then
        kill what is left. What it waits for, and for how long, is said first: a wait of up to
        ``grace_s`` + 15 s must not look like a hang."""
        running = [j for j in jobs if not self.finished(j)]
        if not running:
            return
        ids = ", ".join(str(j.job_id) for j in running)
        say(f"stopping {what} {ids}: waiting up to {grace_s + 15:g}s for them to end "
            f"(stop grace {grace_s:g}s + 15s), then killing what is left")
        t0 = time.monotonic()
        # One cancel call for all of them: a fleet of 64 replicas was 64 scancel calls.
        self.cancel_ids([str(j.job_id) for j in running])
        deadline = t0 + grace_s + 15
        while any(not self.finished(j) for j in running) and time.monotonic() < deadline:
            time.sleep(self.stop_poll_s)
        left = [j for j in running if not self.finished(j)]
        for job in left:
            say(f"job {job.job_id} did not stop in time; killing it")
        self.cancel_ids([str(j.job_id) for j in left], force=True)
        if not left:
            say(f"{what} {ids} ended after {time.monotonic() - t0:.1f}s")

    @staticmethod
    def log_tail(job: submitit.Job, lines: int = 30) -> str:
        """The end of the job's stderr (where tracebacks go), else stdout."""
        for path in (job.paths.stderr, job.paths.stdout):
            if path.is_file() and path.stat().st_size:
                return log_tail(path, lines)
        return f"(no log yet in {job.paths.folder})"


class LocalBackend(Backend):
    kind = "local"
    stop_poll_s = 0.05  # a poll() of the controller process: cheap

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        super().__init__(cluster, folder)
        self._ends_at: dict[str, float] = {}  # job id -> when its controller ends it (monotonic)

    def _executor(self, res: Resources) -> submitit.Executor:
        # A fresh executor per submission: submitit's update_parameters cannot unset a value.
        executor = submitit.LocalExecutor(folder=self.folder / "%j", max_num_timeout=res.requeues)
        # USR2 this long before the limit, as on Slurm: servers drain, requeueable jobs requeue.
        executor.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus,
                                   signal_delay_s=self.cluster.signal_delay_s)
        return executor

    def _submitted(self, jobs: Sequence[submitit.Job], res: Resources) -> None:
        # A local job runs from its submission on; its controller ends it timeout_min later (and
        # starts that clock again when the job requeues itself, which a server never does).
        for job in jobs:
            self._ends_at[str(job.job_id)] = time.monotonic() + res.timeout_min * 60

    def time_left(self, job: submitit.Job) -> float | None:
        ends_at = self._ends_at.get(str(job.job_id))
        return None if ends_at is None or self.finished(job) else ends_at - time.monotonic()

    def drain(self, job: submitit.Job) -> None:
        # To the job's tasks: the controller takes only SIGTERM from outside (USR2 would kill it).
        for pid in _children(int(job.job_id)):
            try:
                os.kill(pid, signal.SIGUSR2)
            except ProcessLookupError:
                pass

    def jobs_from_ids(self, job_ids: Sequence[str]) -> list[submitit.Job]:
        return [submitit.local.local.LocalJob(self.folder / "%j", job_id) for job_id in job_ids]

    def state(self, job: submitit.Job) -> str:
        if getattr(job, "_process", None) is None:  # another process's job: all we have is its pid
            return "RUNNING" if self.alive_ids([str(job.job_id)]) else "FINISHED"
        return job.state

    def finished(self, job: submitit.Job) -> bool:
        return self.state(job) != "RUNNING"

    @classmethod
    def cancel_ids(cls, job_ids: Sequence[str], force: bool = False) -> None:
        """A local job's id is its controller's pid.

        Not submitit's local ``cancel``: it sends SIGINT to the controller, which
        SIGKILLs the job one second later, too soon for a server to stop its
        engine in order. SIGTERM is forwarded to the job by the controller,
        which then waits for it to exit. Forced, the controller's children (the
        job's tasks) are killed with it: they would outlive it, orphaned, and
        the programs they started get their parent-death signal.
        """
        for pid in _pids(job_ids):
            for target in ([*_children(pid), pid] if force else [pid]):
                try:
                    os.kill(target, signal.SIGKILL if force else signal.SIGTERM)
                except ProcessLookupError:
                    pass

    @classmethod
    def alive_ids(cls, job_ids: Sequence[str]) -> list[str]:
        # Not a zombie: a controller that ended stays one while the process that started it lives on
        # without reaping it (a sweep's later point, which joined the jobs an earlier point submitted,
        # then waited 30 s on each of them at the sweep's end).
        return [str(pid) for pid in _pids(job_ids) if alive(pid)]

    @classmethod
    def submitted_from(cls, job_ids: Sequence[str], folder: Path) -> list[str]:
        """A pid is reused once its process ended: only those whose command line is submitit's local
        controller for a job folder under ``folder``."""
        spellings = {str(Path(folder).absolute()).encode(), str(Path(folder).resolve()).encode()}
        ours = []
        for pid in _pids(job_ids):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"submitit.local._local" in argv and any(s in argv for s in spellings):
                ours.append(str(pid))
        return ours


class SlurmBackend(Backend):
    """sbatch through submitit. Before submission it checks the run's requests against what the
    cluster reports (``preflight``: ``scontrol show partition`` and ``show node``, two calls; the
    config and sacctmgr only when they decide); while jobs pend, one ``squeue`` call a second
    serves every job's reason and the verdict whether it can ever start (``launcher.slurm_fit``)."""

    kind = "slurm"

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        super().__init__(cluster, folder)
        self._last_sacct = 0.0
        self._asks: list[slurm_fit.Ask] = []  # the run's requests (preflight), servers first
        self._own: dict[str, slurm_fit.Ask | None] = {}  # job id -> its request: this run's jobs
        self._view: tuple[float, slurm_fit.ClusterView] | None = None
        self._config: slurm_fit.ClusterConfig | None = None
        self._queue: tuple[float, dict[str, slurm_fit.QueuedJob]] = (-1e9, {})
        self._left: dict[str, float] = {}  # running job id -> seconds to its time limit, at the snapshot
        self._verdicts: dict[str, slurm_fit.Verdict | None] = {}  # for the current queue snapshot
        self._never_since: dict[str, tuple[float, float]] = {}  # job id -> (first seen, its snapshot)
        self._groups: dict[tuple[str, str], tuple[float, list[str]]] = {}  # (qos|account, name) -> running ids

    def _params(self, res: Resources) -> dict[str, Any]:
        c = self.cluster
        params: dict[str, Any] = dict(
            job_name=res.name, time=res.timeout_min, nodes=res.nodes, ntasks_per_node=1,
            partition=res.partition or c.partition, account=c.account, qos=c.qos, constraint=c.constraint,
            cpus_per_task=res.cpus_per_task or c.cpus_per_task, setup=list(c.setup), srun_args=list(c.srun_args),
            additional_parameters=dict(c.additional_parameters),
            # USR2 this long before the time limit: servers drain, then stop.
            signal_delay_s=c.signal_delay_s,
        )
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        if res.nodes > 1:
            # A task that fails (its node's engine died) ends the others at once: the group is broken.
            params["srun_args"] = [*params["srun_args"], "--kill-on-bad-exit=1"]
        mem_gb = res.mem_gb or c.mem_gb
        if mem_gb:
            params["mem"] = f"{int(mem_gb * 1024)}M"
        if c.exclusive:
            params["exclusive"] = True
        return {k: v for k, v in params.items() if v is not None}

    def _executor(self, res: Resources) -> submitit.Executor:
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=res.requeues)
        executor.update_parameters(**self._params(res))
        return executor

    # ------------------------------------------------------------ before submission

    def _ask(self, res: Resources) -> slurm_fit.Ask:
        """``res`` as sbatch will get it, with the key behind each value (``slurm_fit.Ask``)."""
        c = self.cluster
        source, lever = {}, {}
        for name, attr in (("partition", "partition"), ("cpus", "cpus_per_task"), ("mem", "mem_gb")):
            lever[name] = res.keys.get(attr, f"cluster.{attr}")
            source[name] = lever[name] if getattr(res, attr) is not None else f"cluster.{attr}"
        for name, attr, default in (("gpus", "gpus", "server.gpus_per_replica"),
                                    ("time", "timeout_min", "cluster.timeout_min")):
            source[name] = lever[name] = res.keys.get(attr, default)
        for name in ("count", "nodes"):
            if name in res.keys:
                source[name] = lever[name] = res.keys[name]
        mem_gb = res.mem_gb or c.mem_gb
        return slurm_fit.Ask(
            what=res.what or res.name, count=res.count, partition=res.partition or c.partition,
            cpus=res.cpus_per_task or c.cpus_per_task or 1, mem_mb=int(mem_gb * 1024) if mem_gb else None,
            gpus=res.gpus, time_min=res.timeout_min, exclusive=c.exclusive, source=source, lever=lever,
            nodes=res.nodes,
        )

    def preflight(self, jobs: Sequence[Resources]) -> bool:
        """Refuse what the cluster can never run (``slurm_fit.refusals``); skipped with
        ``cluster.fit_check: false``. A cluster that does not answer is left to sbatch."""
        self._asks = [self._ask(r) for r in jobs]
        if not self.cluster.fit_check:
            return False
        try:
            view = self._cluster_view(max_age_s=0)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("cluster check skipped: %s", e)
            return False
        c = self.cluster
        problems = slurm_fit.refusals(view, self._asks, self._cluster_config, account=c.account, qos=c.qos,
                                      associations=self._associations)
        if problems:
            raise ClusterRefused("the cluster can never run this configuration (nothing was submitted):\n"
                                 + "\n".join("  " + p.replace("\n", "\n  ") for p in problems))
        self.rollover_note = slurm_fit.successor_room(view, self._asks, self._cluster_config)
        return True

    def _cluster_view(self, max_age_s: float) -> slurm_fit.ClusterView:
        if self._view is None or time.monotonic() - self._view[0] > max_age_s:
            partitions = _run(["scontrol", "show", "partition", "-o"])
            nodes = _run(["scontrol", "show", "node", "-o"])
            self._view = (time.monotonic(), slurm_fit.ClusterView.parse(partitions, nodes))
        return self._view[1]

    def _cluster_config(self) -> slurm_fit.ClusterConfig:
        if self._config is None:
            try:
                self._config = slurm_fit.ClusterConfig.parse(_run(["scontrol", "show", "config"]))
            except (OSError, subprocess.SubprocessError):
                self._config = slurm_fit.ClusterConfig()
        return self._config

    @staticmethod
    def _associations() -> list[tuple[str, str, str]]:
        """This user's (account, partition, qos list) associations, as far as sacctmgr shows them."""
        try:
            out = _run(["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={getpass.getuser()}",
                        "format=account,partition,qos"])
        except (OSError, subprocess.SubprocessError):
            return []
        return [tuple(line.split("|")[:3]) for line in out.splitlines() if line.count("|") >= 2]

    def _refusal_text(self, message: str, res: Resources, count: int) -> str:
        """sbatch's own words, then each option it got with the key that set it."""
        ask = self._ask(res)
        params = self._params(res)
        keys = {"partition": ask.said("partition"), "cpus_per_task": ask.said("cpus"), "mem": ask.said("mem"),
                "gpus_per_node": ask.said("gpus"), "time": ask.said("time"), "account": "cluster.account",
                "qos": "cluster.qos", "constraint": "cluster.constraint", "exclusive": "cluster.exclusive"}
        asked = [f"--{k.replace('_', '-')}={params[k]} ({key})" for k, key in keys.items() if k in params]
        asked += [f"--{k.replace('_', '-')}={v} (cluster.additional_parameters.{k})"
                  for k, v in params.get("additional_parameters", {}).items()]
        lines = message.splitlines() or ["(no message)"]
        return (f"sbatch refused {_jobs_label(res, count)}:\n" + "\n".join(f"  {line}" for line in lines) +
                "\n  it asked for: " + ", ".join(asked) + "\n  nothing was queued; change the key behind the "
                "option sbatch names")

    # ------------------------------------------------------------ after submission

    def _submitted(self, jobs: Sequence[submitit.Job], res: Resources) -> None:
        ask = self._ask(res)
        for job in jobs:
            self._own[str(job.job_id)] = ask

    def jobs_from_ids(self, job_ids: Sequence[str]) -> list[submitit.Job]:
        for job_id in job_ids:  # a joined pool's servers: this run waits on them like on its own
            self._own[str(job_id)] = self._asks[0] if self._asks else None
        return [submitit.SlurmJob(self.folder / "%j", job_id) for job_id in job_ids]

    def state(self, job: submitit.Job) -> str:
        # submitit's own polling backs off to once a minute: too slow to fail fast.
        mode = "force" if time.monotonic() - self._last_sacct >= _SACCT_EVERY_S else "cache"
        if mode == "force":
            self._last_sacct = time.monotonic()
        state = job.watcher.get_state(job.job_id, mode=mode)
        if state == "UNKNOWN":  # accounting lags a few seconds behind a submission; the queue does not
            row = self._snapshot()[1].get(str(job.job_id))
            state = row.state if row is not None else state
        return state

    def finished(self, job: submitit.Job) -> bool:
        return self.state(job) not in _SLURM_ALIVE

    def _snapshot(self) -> tuple[float, dict[str, slurm_fit.QueuedJob]]:
        """This user's queue, at most one squeue call per ``_SQUEUE_EVERY_S`` for all jobs."""
        if time.monotonic() - self._queue[0] >= _SQUEUE_EVERY_S:
            try:
                # The same call also says how long each job has left (%L): no call of its own.
                out = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%L|" + slurm_fit.QUEUE_FORMAT])
            except (OSError, subprocess.SubprocessError):
                out = ""
            rows = [line.split("|", 1) for line in out.splitlines() if "|" in line]
            self._queue = (time.monotonic(), slurm_fit.parse_queue("\n".join(row for _, row in rows)))
            self._left = {row.split("|", 1)[0].strip(): left for left, row in rows}
            self._verdicts = {}
        return self._queue

    def _verdict(self, job_id: str) -> slurm_fit.Verdict | None:
        queue = self._snapshot()[1]
        row = queue.get(job_id)
        if row is None or row.state != "PENDING":
            return None
        if job_id not in self._verdicts:
            try:
                view = self._cluster_view(max_age_s=_VIEW_MAX_AGE_S)
            except (OSError, subprocess.SubprocessError):
                view = None
            self._verdicts[job_id] = slurm_fit.judge(
                row, queue, self._own, view, self._cluster_config, servers=self._asks[0] if self._asks else None,
                others=self._asks[1:], group_running=self._group_running,
            )
        return self._verdicts[job_id]

    def _group_running(self, kind: str, name: str) -> list[str]:
        """Running job ids of a QOS or account (every user's): who holds a group limit; asked at
        most every ``_VIEW_MAX_AGE_S``, and only while a job of the run waits on such a limit."""
        taken, ids = self._groups.get((kind, name), (-1e9, []))
        if time.monotonic() - taken > _VIEW_MAX_AGE_S:
            try:
                ids = _run(["squeue", "-h", "-r", "-t", "RUNNING", "-q" if kind == "qos" else "-A", name,
                            "-o", "%i"]).split()
            except (OSError, subprocess.SubprocessError):
                ids = []
            self._groups[(kind, name)] = (time.monotonic(), ids)
        return ids

    def time_left(self, job: submitit.Job) -> float | None:
        """From the queue snapshot (squeue's %L, for every job in one call)."""
        taken, queue = self._snapshot()
        job_id = str(job.job_id)
        row = queue.get(job_id)
        if row is None or not row.running:
            return None
        try:
            left_min = slurm_fit.minutes(self._left.get(job_id, ""))
        except ValueError:  # INVALID, NOT_SET
            return None
        return None if left_min is None else left_min * 60 - (time.monotonic() - taken)

    def drain(self, job: submitit.Job) -> None:
        # To the job's steps (where the server runs under srun), as Slurm's own --signal does.
        subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], capture_output=True, text=True)

    def pending_reason(self, job: submitit.Job) -> str | None:
        """Slurm's reason, with what to do when it will not resolve by itself."""
        job_id = str(job.job_id)
        verdict = self._verdict(job_id)
        if verdict is not None:
            return verdict.short()
        row = self._queue[1].get(job_id)
        return row.reason if row is not None and row.state == "PENDING" else None

    def never_starts(self, job: submitit.Job) -> str | None:
        job_id = str(job.job_id)
        verdict = self._verdict(job_id)
        if verdict is None or not verdict.never:
            self._never_since.pop(job_id, None)
            return None
        taken = self._queue[0]
        first_seen, first_snapshot = self._never_since.setdefault(job_id, (time.monotonic(), taken))
        if time.monotonic() - first_seen >= _NEVER_CONFIRM_S and taken > first_snapshot:
            return verdict.explanation
        return None

    @classmethod
    def cancel_ids(cls, job_ids: Sequence[str], force: bool = False) -> None:
        """``scancel``: SIGTERM to the job, SIGKILL after the cluster's KillWait; ``--signal=KILL`` when forced."""
        if job_ids:
            cmd = ["scancel", *(["--signal=KILL", "--full"] if force else []), *job_ids]
            subprocess.run(cmd, capture_output=True, text=True)

    @classmethod
    def alive_ids(cls, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True
        ).stdout
        listed = {line.split()[0] for line in out.splitlines() if line.strip()}
        return [j for j in job_ids if j in listed]


BACKENDS: dict[str, type[Backend]] = {"local": LocalBackend, "slurm": SlurmBackend}


def make_backend(cluster: ClusterSpec, folder: Path) -> Backend:
    return BACKENDS[cluster.kind](cluster, folder)


def backend_class(kind: str) -> type[Backend]:
    """The backend that knows job ids recorded under ``kind``; refuses a kind it does not know."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown cluster kind {kind!r} (known: {sorted(BACKENDS)})") from None


def _run(argv: list[str]) -> str:
    """A Slurm client's output; raises on failure (``CalledProcessError``, ``TimeoutExpired``, ``OSError``)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def _jobs_label(res: Resources, count: int) -> str:
    what = res.what or res.name
    return f"the {what}" if count == 1 else f"the {count} {what}s (one array)"


def _pids(job_ids: Sequence[str]) -> list[int]:
    """Local job ids as pids; anything else is not a local job and is never signalled."""
    return [int(j) for j in job_ids if j.isdigit() and int(j) > 1]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; none where there is no /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, the last ")" ends it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1:2] == [str(pid)]:
            found.append(int(stat.parent.name))
    return found


@contextmanager
def _outer_job_env_hidden() -> Iterator[None]:
    """Submit as if from a login shell, also from inside a job (a sweep handed to Slurm).

    sbatch passes the submitting environment on: a new job would inherit the
    outer job's SLURM_ARRAY_JOB_ID and friends, and submitit in it would look
    for the outer job's pickle. SLURM_CONF stays: it says which cluster.
    """
    hidden = {k: v for k, v in os.environ.items()
              if (k.startswith("SLURM_") and k != "SLURM_CONF") or k.startswith("SUBMITIT_")}
    for key in hidden:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(hidden)


@contextmanager
def _terminal_interrupts_ignored() -> Iterator[None]:
    """Local jobs inherit an ignored SIGINT.

    They share the launcher's terminal, so a Ctrl-C would reach them directly
    and submitit's local controller would SIGKILL them a second later, before
    a server could stop its engine. The launcher alone takes the Ctrl-C and
    stops its jobs in order (SIGTERM, see ``cancel``).
    """
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
