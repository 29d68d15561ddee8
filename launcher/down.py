"""``python -m launcher.down RUN_OR_SERVICE``: cancel a run's (or a service's) jobs and deregister them.

RUN is a registry namespace, or a run name that prefixes exactly one
namespace; SERVICE is a service name (its replicas in every namespace). Reads
only the registry and the cluster, so it works after the launcher died. Job
ids are handed to the backend of the cluster kind that recorded them (the
namespace's job record, or each entry's ``cluster``); an id whose kind is
unknown is refused, never guessed: a Slurm job id taken for a local pid would
signal an unrelated process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict
from typing import Callable

from launcher.executors import backend_class
from server.registry import Entry, Registry


class DownError(ValueError):
    """What to stop cannot be told apart safely; the message says what and why."""


def down_namespace(registry: Registry, namespace: str, wait_s: float) -> list[str]:
    """Cancel every job of ``namespace``, wait for them to end, remove the namespace."""
    by_kind = _jobs_by_kind(registry.entries(namespace))
    record = registry.recorded_jobs(namespace)
    if record:
        by_kind[record.kind].update(record.all_job_ids)
    # First, so that the runs using it say they were stopped, rather than that their servers died.
    registry.request_stop(namespace, _who())
    return _cancel_and_wait(by_kind, wait_s, after=lambda: registry.remove_namespace(namespace))


def down_service(registry: Registry, service: str, wait_s: float) -> list[str]:
    """Cancel the jobs of ``service``'s replicas in every namespace and remove their entries."""
    entries = registry.entries(service=service)
    by_kind = _jobs_by_kind(entries)
    for namespace in sorted({e.namespace for e in entries}):
        registry.request_stop(namespace, _who())

    def remove() -> None:
        for e in entries:
            registry.remove(e.namespace, e.service, e.replica, e.job_id)

    return _cancel_and_wait(by_kind, wait_s, after=remove)


def _who() -> str:
    return f"launcher.down on {socket.gethostname()} (pid {os.getpid()})"


def _jobs_by_kind(entries: list[Entry]) -> defaultdict[str, set[str]]:
    by_kind: defaultdict[str, set[str]] = defaultdict(set)
    for e in entries:
        if e.job_id.startswith("pid:"):  # a server started by hand, outside any job: nothing to cancel
            continue
        if not e.cluster:
            raise DownError(
                f"replica {e.service}/{e.replica} of {e.namespace} names job {e.job_id} but not the cluster kind "
                f"that runs it (an entry from an older gymlaunch): cancel it yourself (scancel, or kill its "
                f"process), then remove {e.namespace} with python -m launcher.down again"
            )
        by_kind[e.cluster].add(e.job_id)
    return by_kind


def _cancel_and_wait(by_kind: dict[str, set[str]], wait_s: float, after: Callable[[], object]) -> list[str]:
    backends = {backend_class(kind): sorted(ids) for kind, ids in by_kind.items() if ids}
    for backend, ids in backends.items():
        backend.cancel_ids(ids)
    deadline = time.monotonic() + wait_s
    while any(b.alive_ids(ids) for b, ids in backends.items()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for backend, ids in backends.items():
        backend.cancel_ids(backend.alive_ids(ids), force=True)
    after()
    return sorted(j for ids in backends.values() for j in ids)


def resolve(registry: Registry, name: str) -> tuple[str, str]:
    """``("namespace", ns)`` or ``("service", name)``; ``DownError`` when it names nothing or too much."""
    namespaces = registry.namespaces()
    if name in namespaces:
        return "namespace", name
    prefixed = [ns for ns in namespaces if ns.startswith(f"{name}-")]
    if len(prefixed) == 1:
        return "namespace", prefixed[0]
    if len(prefixed) > 1:
        raise DownError(f"{name!r} prefixes several runs {prefixed}: name one")
    if registry.entries(service=name):
        return "service", name
    raise DownError(f"no run or service {name!r} in {registry.root} (see python -m launcher.status)")


def down(registry: Registry, name: str, wait_s: float) -> tuple[str, str, list[str]]:
    """Stop what ``name`` names; returns (what, resolved name, cancelled job ids)."""
    what, resolved = resolve(registry, name)
    stop = down_namespace if what == "namespace" else down_service
    return what, resolved, stop(registry, resolved, wait_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.down", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="a run (namespace or unique run-name prefix) or a service")
    parser.add_argument("--root", default=None, help="registry root (default: $GYMLAUNCH_REGISTRY_ROOT or ~/.gymlaunch/registry)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for jobs to stop before killing them")
    args = parser.parse_args(argv)
    try:
        what, name, job_ids = down(Registry(args.root), args.name, args.wait)
    except DownError as e:
        print(f"launcher.down: {e}", file=sys.stderr)
        return 2
    print(f"{what} {name}: cancelled jobs {job_ids or 'none'}, entries removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
