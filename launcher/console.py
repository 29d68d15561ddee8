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
    written = summary.get("rollouts")  # counted from the files: also when the collection did not finish
    # The whole run's (summed over its attempts), where the summary has them; this attempt's otherwise.
    totals = summary.get("totals") or collection
    rows = [
        ("tasks", collection.get("tasks")),
        ("rollouts written", f"{written['written']}/{written['total']}" if written else
         collection.get("rollouts_written")),
        ("failures", collection.get("failures", written and written["failed"])),
        ("mean reward", _fmt(collection.get("mean_reward"))),
        ("generated tokens/s", _fmt(totals.get("generated_tokens_per_s"))),
        ("multi-turn prefix contiguity", _contiguity(totals)),
    ]
    counted_by = summary.get("requests_counted_by")
    rows += [(f"replica {server['replica']}", _replica(server, counted_by)) for server in summary.get("servers", [])]
    resumed = summary.get("resumed_from")
    if resumed:  # run.resume: the rows above count the interrupted run's too
        rows.append(("resumed from", f"run {resumed['run_id'] or '(unrecorded)'}, {resumed['rollouts_before']} "
                                     "rollouts written before"))
    attempts = summary.get("attempts") or []
    if len(attempts) > 1:
        rows.append(("attempts", f"{len(attempts)}: " + ", ".join(
            f"{a['status']}" + (f" ({a['rollouts_written_this_attempt']} rollouts)"
                                if a.get("rollouts_written_this_attempt") is not None else "") for a in attempts)))
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


def _replica(server: dict, counted_by: str | None) -> str:
    """``48 requests (2 retried, 1 failed); 1 death (signal 9), 1 restart, down 34.2s; job 12 never ready
    (starting)``: what one replica was sent (counted by the gateway or the collector) and what befell it."""
    parts = []
    if server.get("requests") is not None:
        extra = [f"{server[k]} {word}" for k, word in (("retries", "retried"), ("failures", "failed")) if server[k]]
        parts.append(f"{server['requests']} requests" + (f" ({', '.join(extra)})" if extra else "")
                     + (f" [{counted_by}]" if counted_by else ""))
    deaths = server["deaths"]
    parts.append(", ".join([
        f"{len(deaths)} death{'' if len(deaths) == 1 else 's'}" + (f" ({deaths[-1]['reason']})" if deaths else ""),
        f"{server['restarts']} restart{'' if server['restarts'] == 1 else 's'}",
        f"down {server['down_s']:.1f}s",
    ]))
    current = (server.get("jobs") or [{}])[-1]
    if current.get("served") is False:  # the run ended before this replica's (last) job passed the gate
        parts.append(f"job {current['job_id']} never ready ({current['state']})")
    return "; ".join(parts)


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
