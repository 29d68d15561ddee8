"""What the launcher shows a person: live server states, job progress, the summary."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from launcher.gateways import GatewayStatus
from launcher.readiness import ReplicaStatus


# The live view of a big fleet: one row per replica does not fit a terminal (rich cuts it off) and
# costs ~20 ms per refresh at 64 rows; counts per state in the title, rows for those not ready.
LIVE_ROWS = 16


def servers_table(service: str, replicas: list[ReplicaStatus], live: bool = False,
                  gateway: GatewayStatus | None = None) -> Table:
    title, shown, caption = f"service {service}", replicas, None
    if live and len(replicas) > LIVE_ROWS:
        counts = Counter(r.state for r in replicas)
        title += ": " + ", ".join(f"{n} {state}" for state, n in counts.most_common())
        waiting = [r for r in replicas if r.state != "ready"]
        shown = waiting[:LIVE_ROWS]
        caption = f"and {len(waiting) - len(shown)} more not ready" if len(waiting) > len(shown) else None
    table = Table(title=escape(title), title_justify="left", caption=caption)
    for column in ("replica", "job", "state", "url", "ready after", "restarts"):
        table.add_column(column)
    for r in shown:
        url = r.entry.base_url if r.entry else ""
        ready = f"{r.ready_after_s:.1f}s" if r.ready_after_s is not None else ""
        restarts = f"{r.restarts} ({escape(r.deaths[-1]['reason'])})" if r.deaths else str(r.restarts)
        state = _styled_state(r.state) + (f" {escape(r.note)}" if r.note else "")
        table.add_row(str(r.replica), escape(str(r.job.job_id)), state, escape(url), ready, restarts)
    if gateway is not None:  # the service's one URL, below its replicas
        g = gateway
        url = g.entry.base_url if g.entry else ""
        ready = f"{g.ready_after_s:.1f}s" if g.ready_after_s is not None else ""
        restarts = f"{g.restarts} ({escape(g.deaths[-1]['reason'])})" if g.deaths else str(g.restarts)
        table.add_row("gateway", escape(str(g.job.job_id)), _styled_state(g.state), escape(url), ready, restarts)
    return table


def _styled_state(state: str) -> str:
    color = {"ready": "green", "healthy": "blue", "starting": "yellow", "checking": "blue",
             "draining": "magenta"}.get(state, "cyan")
    return f"[{color}]{escape(state)}[/]"


def rollout_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("rollouts"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failures]} failed"),
        TextColumn("{task.fields[state]}", style="cyan", markup=False),  # Slurm's words, not our markup
        TimeElapsedColumn(),
        console=console,
    )


def summary_table(summary: dict) -> Table:
    table = Table(title=escape(f"run {summary['run_id']}: {summary['status']}"), title_justify="left",
                  show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    collection = summary.get("collection") or {}
    rows = [
        ("tasks", collection.get("tasks")),
        ("rollouts written", collection.get("rollouts_written")),
        ("failures", collection.get("failures")),
        ("mean reward", _fmt(collection.get("mean_reward"))),
        ("generated tokens/s", _fmt(collection.get("generated_tokens_per_s"))),
        ("multi-turn prefix contiguity", _contiguity(collection)),
        ("requests per replica", _per_replica(collection.get("replicas"))),
    ]
    resumed = summary.get("resumed_from")
    if resumed:  # run.resume: the rows above count the interrupted run's too
        rows.append(("resumed from", f"run {resumed['run_id'] or '(unrecorded)'}, {resumed['rollouts_before']} "
                                     "rollouts written before"))
    gateway = summary.get("gateway")
    if gateway:  # the service's one URL, and how often its job changed
        changes = [f"{n} {word}" for n, word in ((gateway["restarts"], "restarts"),
                                                 (len(gateway["rollovers"]), "rollovers")) if n]
        where = gateway["base_url"] or f"job {gateway['job_id']}, never ready"  # the run ended before it was
        rows.append(("gateway", where + (f" ({', '.join(changes)})" if changes else "")))
    if summary["namespace"] != summary["run_id"]:
        rows.append(("servers (joined)" if resumed else "servers (shared)", summary["namespace"]))
    rows += [(f"time: {phase}", f"{seconds:.1f}s") for phase, seconds in summary["phases"].items()]
    rows += [
        ("rollouts", collection.get("rollouts_path")),
        ("failures file", collection.get("failures_path")),
        ("summary", summary["summary_path"]),
    ]
    for what, value in rows:
        if value is not None:
            table.add_row(what, escape(str(value)))
    if summary.get("error"):
        table.add_row("error", f"[red]{escape(summary['error'].splitlines()[0])}[/]")
    return table


def _per_replica(replicas: dict | None) -> str | None:
    """``0: 12 (1 failed), 1: 14 (2 retried)``: how the collector's requests spread over the replicas."""
    if not replicas:
        return None
    parts = []
    for replica, stats in sorted(replicas.items(), key=lambda kv: int(kv[0])):
        extra = [f"{stats[k]} {word}" for k, word in (("failures", "failed"), ("retries", "retried")) if stats.get(k)]
        parts.append(f"{replica}: {stats['requests']}" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def _contiguity(collection: dict) -> str | None:
    """``12/12 (100%)``: consecutive model calls whose next prompt begins with the previous prompt +
    generation (server.onpolicy.prefix_contiguity); None when no rollout had two calls."""
    checked = collection.get("prefix_checked")
    if not checked:
        return None
    contiguous = collection["prefix_contiguous"]
    return f"{contiguous}/{checked} ({100 * contiguous / checked:.0f}%)"


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"
