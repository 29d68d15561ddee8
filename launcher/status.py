"""``python -m launcher.status``: every run and server the registry knows, from any shell.

Per registry namespace: every job of its runs (the server replicas, the gateway, each run's job
that uses them: collector, command or Gym), its state, and how many of them are alive; per run its
folder and the rows written so far (of the total, for job=rollouts). Reads only the registry (the
entries, the jobs recorded for the namespace, the owner files, which name each run's folder), the
run folders (``.run.json``, ``events.jsonl``, ``rollouts.jsonl``) and the cluster (squeue, or
process ids for local jobs), so it works from another login shell and after a launcher died.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher import events, resume
from launcher.executors import backend_class
from server.registry import GATEWAY_SUFFIX, Registry

# A job's last recorded state after which it is known to be over.
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "dead", "replaced"}


@dataclass
class JobRow:
    who: str
    job_id: str
    kind: str  # the cluster kind that knows job_id ("": unknown)
    state: str
    url: str = ""
    heartbeat_age: str = ""


def namespace_view(registry: Registry, namespace: str, now: float) -> tuple[Table, list[str]]:
    """The namespace's jobs as a table, and a line per run using it (its folder: never wrapped, it is copied)."""
    record = registry.recorded_jobs(namespace)
    kind = record.kind if record else ""
    rows: list[JobRow] = []
    for e in registry.entries(namespace):
        who = e.service if e.service.endswith(GATEWAY_SUFFIX) else f"{e.service}/{e.replica}"
        state = e.state if e.is_fresh(registry.ttl_s, now) else f"{e.state} (stale)"
        rows.append(JobRow(who, e.job_id, e.cluster or kind, state, e.base_url, f"{max(0.0, now - e.heartbeat_at):.0f}s"))
    if record:  # submitted, not registered yet: queued, or its server still starting
        registered = {r.job_id for r in rows}
        waiting = [i for i in record.all_job_ids if i not in registered]
        for job_id in backend_class(kind).alive_ids(waiting) if waiting else []:
            who = "gateway" if job_id in record.gateway_job_ids else "server"
            rows.append(JobRow(who, job_id, kind, "submitted, not registered yet"))
    runs = []
    for run_id in registry.live_owners(namespace, now):
        folder = registry.owner_run_dir(namespace, run_id)
        runs.append(f"run {run_id}: " + (_run_line(Path(folder), rows) if folder else "folder unknown"))
    alive = _alive(rows)
    table = Table("job of", "job", "state", "url", "heartbeat age", title_justify="left",
                  title=escape(f"{namespace}: {len(alive)}/{len(rows)} jobs alive"))
    for r in rows:
        state = r.state if r.job_id in alive or r.state in _ENDED else f"{r.state} (job gone)"
        table.add_row(*map(escape, (r.who, r.job_id, state, r.url, r.heartbeat_age)))  # never markup ([::1])
    if not rows:
        table.add_row("", "", "(no job registered)", "", "")
    return table, runs or ["no run uses it"]


def _run_line(folder: Path, rows: list[JobRow]) -> str:
    """The run's folder and rows written; its job (from the run's record) added to ``rows``."""
    record = resume.read_record(folder)
    last = _last_states(folder / events.FILE)
    for job_id in record.job_ids if record else []:
        state, detail = last.get(job_id, ("SUBMITTED", None))
        rows.append(JobRow("rollouts job" if record.rollouts_total is not None else "job", job_id,
                           record.cluster, state + (f" ({detail})" if detail else "")))
    total = record.rollouts_total if record else None
    if total is None and not (folder / "rollouts.jsonl").is_file():  # serve-only, a program's own output
        return str(folder)
    return f"{folder}, rows {_lines(folder / 'rollouts.jsonl')}" + (f"/{total}" if total is not None else "") + \
        " written"


def _last_states(path: Path) -> dict[str, tuple[str, str | None]]:
    """The job that uses the service, by job id: its last state in the run's events."""
    last: dict[str, tuple[str, str | None]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:  # a torn last line
            continue
        if isinstance(event, dict) and event.get("who") == events.JOB:
            last[str(event.get("job_id"))] = (str(event.get("state")), event.get("detail"))
    return last


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except OSError:
        return 0


def _alive(rows: list[JobRow]) -> set[str]:
    """The job ids of ``rows`` that still run, asked of the cluster kind that knows each."""
    alive: set[str] = set()
    for kind in {r.kind for r in rows if r.kind}:
        alive |= set(backend_class(kind).alive_ids([r.job_id for r in rows if r.kind == kind]))
    return alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.status", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="registry root (default: $GYMLAUNCH_REGISTRY_ROOT or ~/.gymlaunch/registry)")
    parser.add_argument("--ttl", type=float, default=Registry.ttl_s, help="heartbeat age after which an entry is stale")
    parser.add_argument("--orphan-grace", type=float, default=Registry.orphan_grace_s,
                        help="owner heartbeat age after which a run is gone")
    args = parser.parse_args(argv)
    registry = Registry(args.root, ttl_s=args.ttl, orphan_grace_s=args.orphan_grace)
    now = time.time()
    console = Console(width=None if sys.stdout.isatty() else 240)
    plain = dict(markup=False, highlight=False, soft_wrap=True)
    console.print(f"registry {registry.root}", **plain)
    namespaces = registry.namespaces()
    for namespace in namespaces:
        table, runs = namespace_view(registry, namespace, now)
        console.print(table)
        for line in runs:
            console.print(line, **plain)
    if not namespaces:
        console.print("no run or server registered", **plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
