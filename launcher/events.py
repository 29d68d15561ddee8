"""What happened in a run, as it happened: one observer of state changes, for the record and the words.

At each poll of the launcher's loops (servers starting, the gateway, the job that uses them,
serve-only, teardown) the run hands ``RunEvents.observe`` what it sees now: the state of each job
of each replica (successors included), of the gateway's jobs and of the job that uses the service.
The observer diffs that against the last look and records each change, plus the phases as they
begin and the run's end, as one line of ``<run folder>/events.jsonl``:

    {"at": <unix time>, "who": "replica 0" | ... | "gateway" | "job" | "run",
     "job_id": <str or null>, "state": <str>, "detail": <str or null>}

A job that leaves its slot while another job of the slot remains is ``replaced`` (a rollover's
successor took over, or a dead job's replacement was submitted). ``report.html`` and
``python -m launcher.status`` read this file.

Without a terminal (CI, ``nohup``, a Slurm batch script) nobody sees the live view: each change is
also printed as one plain timestamped line, with the rollouts' progress at most every
``PROGRESS_EVERY_S``. With a terminal the live view shows the same states; the lines go to the
run's log only. One source for both, so the record and the words never disagree.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from server.registry import hiccup_tolerated

log = logging.getLogger(__name__)

FILE = "events.jsonl"
RUN, JOB, GATEWAY = "run", "job", "gateway"
# A progress line at most this often: a 3600-rollout run must not print 3600 lines.
PROGRESS_EVERY_S = 5.0


def replica(index: int) -> str:
    return f"replica {index}"


@dataclass(frozen=True)
class Seen:
    """One job's state at one look (or a run phase)."""

    who: str
    job_id: str | None
    state: str
    detail: str | None = None


def job_state(state: str) -> tuple[str, str | None]:
    """A launcher-side state as (state, detail): ``PENDING (Resources)`` -> ``PENDING``, ``Resources``;
    a replica waiting for its replacement (``died: <reason>``) -> ``dead``, the reason."""
    if state.startswith("died: "):
        return "dead", state.removeprefix("died: ")
    head, _, rest = state.partition(" (")
    return (head, rest.removesuffix(")")) if rest else (state, None)


def clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


class RunEvents:
    """Diffs what the run sees at each look; records and (``echo``: no terminal) prints each change."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] | None) -> None:
        self.path = Path(run_dir) / FILE
        self._echo = echo
        self._last: dict[tuple[str, str | None], Seen] = {}
        self._progress: tuple[int, int] | None = None
        self._progress_at = 0.0

    def observe(self, seen: Iterable[Seen], deaths: dict[str, str] | None = None) -> None:
        """``seen``: every job the run holds now; ``deaths``: job id -> why, of the jobs that died (a
        job that leaves unseen as dead, e.g. a successor that died starting, is recorded dead)."""
        now: dict[tuple[str, str | None], Seen] = {}
        for s in seen:  # UNKNOWN: Slurm's accounting has not caught up; it says nothing of the job
            now[(s.who, s.job_id)] = self._last.get((s.who, s.job_id), s) if s.state == "UNKNOWN" else s
        for key, s in now.items():
            if self._last.get(key) != s and s.state != "UNKNOWN":
                self._record(s)
        holders = {who: job_id for who, job_id in now}
        for (who, job_id), last in self._last.items():
            if (who, job_id) in now:
                continue
            if last.state != "dead" and job_id in (deaths or {}):
                self._record(Seen(who, job_id, "dead", deaths[job_id]))
            elif who in holders:  # superseded in its slot: a rollover's successor, a death's replacement
                self._record(Seen(who, job_id, "replaced", f"by job {holders[who]}"))
        self._last = now

    def phase(self, name: str) -> None:
        self._record(Seen(RUN, None, name))

    def end(self, status: str) -> None:
        self._record(Seen(RUN, None, "end", status))

    def note(self, text: str) -> None:
        """Something the run waits for that is no state (what teardown stops, and for how long)."""
        self._say(time.time(), text)

    def progress(self, written: int, total: int, failures: int, final: bool = False) -> None:
        """The rollouts written so far: a line on a change, at most every ``PROGRESS_EVERY_S`` (and the last)."""
        now = time.time()
        if (written, failures) == self._progress or (not final and now - self._progress_at < PROGRESS_EVERY_S):
            return
        self._progress, self._progress_at = (written, failures), now
        self._say(now, f"rollouts: {written}/{total} written, {failures} failed")

    def _record(self, s: Seen) -> None:
        at = time.time()
        # A hiccup of the shared filesystem costs a line of the record, never the run.
        with hiccup_tolerated(f"appending to {self.path}"):
            with open(self.path, "a") as f:
                f.write(json.dumps({"at": at, **asdict(s)}) + "\n")
        job = f" (job {s.job_id})" if s.job_id else ""
        self._say(at, f"{s.who}{job}: {s.state}" + (f" ({s.detail})" if s.detail else ""))

    def _say(self, at: float, text: str) -> None:
        log.info("%s", text)
        if self._echo is not None:
            self._echo(f"{clock(at)} {text}")
