"""Submitit executors behind one small interface: submit, state, cancel, logs."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit

from launcher.spec import ClusterSpec


class Backend:
    """Submits functions as jobs of one cluster kind and reports on them."""

    def __init__(self, cluster: ClusterSpec, folder: Path) -> None:
        self.cluster = cluster
        self.folder = Path(folder)

    def _executor(self, name: str, timeout_min: int, gpus: int) -> submitit.Executor:
        # A fresh executor per submission: submitit's update_parameters cannot unset a value.
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=timeout_min, gpus_per_node=gpus, name=name)
        return executor

    def submit(self, fn: Callable, arg: Any, name: str, timeout_min: int, gpus: int = 0) -> submitit.Job:
        with _terminal_interrupts_ignored():
            return self._executor(name, timeout_min, gpus).submit(fn, arg)

    def submit_many(
        self, fn: Callable, args: Sequence[Any], name: str, timeout_min: int, gpus: int = 0
    ) -> list[submitit.Job]:
        """One submission for all ``args`` (an array job where the cluster has them)."""
        executor = self._executor(name, timeout_min, gpus)
        with _terminal_interrupts_ignored(), executor.batch():
            jobs = [executor.submit(fn, a) for a in args]
        return jobs

    @staticmethod
    def state(job: submitit.Job) -> str:
        return job.state

    @staticmethod
    def cancel(job: submitit.Job) -> None:
        """Ask the job to stop cleanly.

        submitit's local ``cancel`` sends SIGINT to the job's controller, which
        SIGKILLs the job one second later: too soon for a server to stop its
        engine in order. SIGTERM is forwarded to the job by the controller,
        which then waits for it to exit.
        """
        process = getattr(job, "_process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        elif process is None:
            job.cancel(check=False)

    @staticmethod
    def force_cancel(job: submitit.Job) -> None:
        process = getattr(job, "_process", None)
        if process is not None:
            process.kill()
        else:
            job.cancel(check=False)

    @staticmethod
    def log_tail(job: submitit.Job, lines: int = 30) -> str:
        """The end of the job's stderr (where tracebacks go), else stdout."""
        for path in (job.paths.stderr, job.paths.stdout):
            try:
                text = path.read_text(errors="replace").strip()
            except FileNotFoundError:
                continue
            if text:
                return "\n".join(text.splitlines()[-lines:])
        return f"(no log yet in {job.paths.folder})"


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
