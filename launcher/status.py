"""``python -m launcher.status``: every run and server the registry knows, from any shell.

Reads only the registry and the cluster (squeue, or process ids for local
jobs), so it works from another login shell and after a launcher died.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher.executors import backend_class
from server.registry import Registry


def status_table(registry: Registry) -> Table:
    table = Table("namespace", "runs alive", "jobs alive", "service", "replica", "state", "url", "job",
                  "heartbeat age", title=f"registry {registry.root}", title_justify="left")
    now = time.time()
    for namespace in registry.namespaces():
        record = registry.recorded_jobs(namespace)
        # Only the backend that recorded the ids may say whether they run; without a record: unknown.
        jobs = (f"{len(backend_class(record.kind).alive_ids(record.job_ids))}/{len(record.job_ids)} {record.kind}"
                if record else "?")
        runs = str(len(registry.live_owners(namespace, now)))
        entries = registry.entries(namespace)
        if not entries:
            table.add_row(namespace, runs, jobs, "", "", "(no replica registered)", "", "", "")
        for e in entries:
            state = e.state if e.is_fresh(registry.ttl_s, now) else f"{e.state} (stale)"
            cells = (namespace, runs, jobs, e.service, str(e.replica), state, e.base_url, e.job_id,
                     f"{now - e.heartbeat_at:.0f}s")
            table.add_row(*map(escape, cells))  # registry text, never markup ([::1] in a URL)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.status", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help="registry root (default: $GYMLAUNCH_REGISTRY_ROOT or ~/.gymlaunch/registry)")
    parser.add_argument("--ttl", type=float, default=Registry.ttl_s, help="heartbeat age after which an entry is stale")
    parser.add_argument("--orphan-grace", type=float, default=Registry.orphan_grace_s,
                        help="owner heartbeat age after which a run is gone")
    args = parser.parse_args(argv)
    registry = Registry(args.root, ttl_s=args.ttl, orphan_grace_s=args.orphan_grace)
    Console(width=None if sys.stdout.isatty() else 240).print(status_table(registry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
