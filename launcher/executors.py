"""Submitit executors behind one small interface: submit, state, cancel, logs.

``LocalBackend`` runs jobs on this machine (submitit's local executor),
``SlurmBackend`` submits them with sbatch; everything that differs between
schedulers lives in these two classes. Both also act on bare job ids
(``cancel_ids``, ``alive_ids``), so that ``launcher.down`` and runs joining a
shared server pool can stop jobs another process submitted: they ask the
backend of the kind that recorded the ids (``backend_class``), never guess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit

from launcher.spec import ClusterSpec
from server.process import log_tail

# Slurm states in which a job may still run; anything else is an end.
_SLURM_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "UNKNOWN"}
_SACCT_EVERY_S = 2.0  # one sacct call serves every job; more often only loads slurmdbd


@dataclass
class Resources:
    """What one job asks of the cluster, beyond the cluster-wide settings."""

    name: str
    timeout_min: int
    gpus: int = 0
    partition: str | None = None  # None: the cluster's
    cpus_per_task: int | None = None
    mem_gb: float | None = None


class Backend:
    """Submits functions as jobs and reports on them; one subclass per cluster kind."""

    kind = ""

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        self.cluster = cluster
        self.folder = Path(folder)

    def _executor(self, res: Resources) -> submitit.Executor:
        raise NotImplementedError

    def submit(self, fn: Callable, arg: Any, res: Resources) -> submitit.Job:
        try:
            with _terminal_interrupts_ignored(), _outer_job_env_hidden():
                return self._executor(res).submit(fn, arg)
        finally:
            self._drop_template_folder()

    def submit_many(self, fn: Callable, args: Sequence[Any], res: Resources) -> list[submitit.Job]:
        """One submission for all ``args``: a job array on Slurm (one sbatch call)."""
        executor = self._executor(res)
        try:
            with _terminal_interrupts_ignored(), _outer_job_env_hidden(), executor.batch():
                return [executor.submit(fn, a) for a in args]
        finally:
            self._drop_template_folder()

    def _drop_template_folder(self) -> None:
        """submitit creates the ``%j`` folder of its path template itself; each job has its own."""
        try:
            (self.folder / "%j").rmdir()
        except OSError:  # not empty (a job's files went there) or not there
            pass

    def jobs_from_ids(self, job_ids: Sequence[str]) -> list[submitit.Job]:
        """Handles on jobs another process submitted (a run joining a shared pool)."""
        raise NotImplementedError

    def state(self, job: submitit.Job) -> str:
        return job.state

    def finished(self, job: submitit.Job) -> bool:
        return job.done()

    def pending_reason(self, job: submitit.Job) -> str | None:
        return None

    @classmethod
    def cancel_ids(cls, job_ids: Sequence[str], force: bool = False) -> None:
        """Stop jobs known only by id (submitted by this or another process): ask, or kill when ``force``."""
        raise NotImplementedError

    @classmethod
    def alive_ids(cls, job_ids: Sequence[str]) -> list[str]:
        """The ids of ``job_ids`` that may still run."""
        raise NotImplementedError

    def cancel(self, job: submitit.Job) -> None:
        self.cancel_ids([str(job.job_id)])

    def force_cancel(self, job: submitit.Job) -> None:
        self.cancel_ids([str(job.job_id)], force=True)

    def stop(self, jobs: Sequence[submitit.Job], grace_s: float, say: Callable[[str], None]) -> None:
        """Ask ``jobs`` to stop, wait up to ``grace_s`` (+15 s), then kill what is left."""
        for job in jobs:
            if not self.finished(job):
                self.cancel(job)
        deadline = time.monotonic() + grace_s + 15
        while any(not self.finished(j) for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.5)
        for job in jobs:
            if not self.finished(job):
                say(f"job {job.job_id} did not stop in time; killing it")
                self.force_cancel(job)

    @staticmethod
    def log_tail(job: submitit.Job, lines: int = 30) -> str:
        """The end of the job's stderr (where tracebacks go), else stdout."""
        for path in (job.paths.stderr, job.paths.stdout):
            if path.is_file() and path.stat().st_size:
                return log_tail(path, lines)
        return f"(no log yet in {job.paths.folder})"


class LocalBackend(Backend):
    kind = "local"

    def _executor(self, res: Resources) -> submitit.Executor:
        # A fresh executor per submission: submitit's update_parameters cannot unset a value.
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=res.timeout_min, gpus_per_node=res.gpus)
        return executor

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
        which then waits for it to exit.
        """
        for pid in _pids(job_ids):
            try:
                os.kill(pid, signal.SIGKILL if force else signal.SIGTERM)
            except ProcessLookupError:
                pass

    @classmethod
    def alive_ids(cls, job_ids: Sequence[str]) -> list[str]:
        alive = []
        for pid in _pids(job_ids):
            try:
                os.kill(pid, 0)
                alive.append(str(pid))
            except ProcessLookupError:
                pass
        return alive


class SlurmBackend(Backend):
    kind = "slurm"

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        super().__init__(cluster, folder)
        self._last_sacct = 0.0

    def _executor(self, res: Resources) -> submitit.Executor:
        c = self.cluster
        executor = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=0)
        params: dict[str, Any] = dict(
            job_name=res.name, time=res.timeout_min, nodes=1, ntasks_per_node=1,
            partition=res.partition or c.partition, account=c.account, qos=c.qos, constraint=c.constraint,
            cpus_per_task=res.cpus_per_task or c.cpus_per_task, setup=list(c.setup), srun_args=list(c.srun_args),
            additional_parameters=dict(c.additional_parameters),
            # USR2 this long before the time limit: servers drain, then stop.
            signal_delay_s=c.signal_delay_s,
        )
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        mem_gb = res.mem_gb or c.mem_gb
        if mem_gb:
            params["mem"] = f"{int(mem_gb * 1024)}M"
        if c.exclusive:
            params["exclusive"] = True
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return executor

    def jobs_from_ids(self, job_ids: Sequence[str]) -> list[submitit.Job]:
        return [submitit.SlurmJob(self.folder / "%j", job_id) for job_id in job_ids]

    def state(self, job: submitit.Job) -> str:
        # submitit's own polling backs off to once a minute: too slow to fail fast.
        mode = "force" if time.monotonic() - self._last_sacct >= _SACCT_EVERY_S else "cache"
        if mode == "force":
            self._last_sacct = time.monotonic()
        return job.watcher.get_state(job.job_id, mode=mode)

    def finished(self, job: submitit.Job) -> bool:
        return self.state(job) not in _SLURM_ALIVE

    def pending_reason(self, job: submitit.Job) -> str | None:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job.job_id), "-o", "%T %r"], capture_output=True, text=True
        ).stdout.split()
        return out[1] if len(out) == 2 and out[0] == "PENDING" else None

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


def _pids(job_ids: Sequence[str]) -> list[int]:
    """Local job ids as pids; anything else is not a local job and is never signalled."""
    return [int(j) for j in job_ids if j.isdigit() and int(j) > 1]


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
