"""A submitit job that outlives its time limit: it stops cleanly at the warning, is requeued, and resumes.

The scheduler's warning is SIGUSR2, ``cluster.signal_delay_s`` before the limit
(Slurm's ``--signal``, submitit's local controller alike). submitit's own handler
for it would checkpoint and requeue at once, in the middle of whatever the job
does. Our jobs take the signal themselves instead (the collector cancels its
conversations and keeps whole lines; a command job stops its programs) and raise
an error whose ``signum`` is SIGUSR2; ``Requeueable`` then hands the signal to
submitit's handler, which calls ``checkpoint`` (the same call again: the job
resumes from its output), requeues the job (``scontrol requeue``: the same job
id, pending for Slurm's requeue delay, about two minutes; locally its controller
starts it again at once) and exits. After ``job.max_requeues`` requeues
(``Resources.requeues``, submitit's ``max_num_timeout``) the job fails instead.

Imports nothing from launcher/.
"""

from __future__ import annotations

import signal
from typing import Any, Callable


class NotRequeued(RuntimeError):
    """The job stopped at its time-limit warning and was not requeued (its requeues are used up)."""


class Requeueable:
    """Wraps ``fn(cfg)`` as a job function with submitit's ``checkpoint`` protocol."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, cfg: Any) -> Any:
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # installed by submitit before it called us
        try:
            return self.fn(cfg)
        except Exception as e:
            if getattr(e, "signum", None) != signal.SIGUSR2 or not callable(submitit_handler):
                raise
            # Stopped at the warning, every line whole: now submitit checkpoints, requeues and exits
            # (or raises why it does not requeue).
            try:
                submitit_handler(signal.SIGUSR2, None)
            except Exception as refused:  # submitit's UncompletedJobError: job.max_requeues used up
                raise NotRequeued(f"{e}; {refused} (job.max_requeues)") from None
            raise

    def checkpoint(self, cfg: Any) -> Any:
        """What the requeued job runs: the same call, which resumes from what is already written."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, cfg)
