"""The launcher's exit codes: decided here, and only here.

| code | meaning |
| ---- | ------- |
| 0    | the run succeeded; or a serve-only run (``job=none``) was stopped, its normal end |
| 1    | the run failed: a server or the job failed, or the launcher itself hit an error |
| 2    | refused before anything was submitted: a config error (unknown key, bad value, missing program) |
| 130  | interrupted: Ctrl-C or SIGTERM, or stopped from another shell (``python -m launcher.down``) |

``for_status`` maps a run's status (the ``status`` of its ``summary.json``) to its code.
"""

from __future__ import annotations

OK = 0
FAILED = 1
REFUSED = 2
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C

# A run's status -> its exit code. "stopped" is job=none's normal end (Ctrl-C or SIGTERM on a
# serve-only run); "interrupted" is any other run ended that way, or taken down from elsewhere.
STATUS_CODES = {
    "succeeded": OK,
    "stopped": OK,
    "failed": FAILED,
    "interrupted": INTERRUPTED,
}


def for_status(status: str) -> int:
    """The exit code of a run that ended with ``status``; an unknown status is a failure."""
    return STATUS_CODES.get(status, FAILED)
