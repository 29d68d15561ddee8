"""``python -m launcher.down RUN_OR_SERVICE``: cancel a run's (or a service's) jobs and deregister them.

RUN is a registry namespace, or a run name that prefixes exactly one
namespace; SERVICE is a service name (its replicas in every namespace). Reads
only the registry and the cluster, so it works after the launcher died.
"""

from __future__ import annotations

import argparse
import sys
import time

from launcher.executors import alive_job_ids, cancel_job_ids
from server.registry import Registry
from server.runs import recorded_jobs


def down_namespace(registry: Registry, namespace: str, wait_s: float) -> list[str]:
    """Cancel every job of ``namespace``, wait for them to end, remove the namespace."""
    record = recorded_jobs(registry.root, namespace)
    kind = record.kind if record else "local"
    job_ids = sorted(set(record.job_ids if record else []) | {e.job_id for e in registry.entries(namespace)})
    return _cancel_and_wait(registry, kind, job_ids, wait_s, after=lambda: registry.remove_namespace(namespace))


def down_service(registry: Registry, service: str, wait_s: float) -> list[str]:
    cancelled = []
    for namespace in registry.namespaces():
        entries = registry.entries(namespace, service)
        if not entries:
            continue
        record = recorded_jobs(registry.root, namespace)

        def remove(entries=entries) -> None:
            for e in entries:
                registry.remove(e.namespace, e.service, e.replica)

        job_ids = sorted({e.job_id for e in entries})
        cancelled += _cancel_and_wait(registry, record.kind if record else "local", job_ids, wait_s, after=remove)
    return cancelled


def _cancel_and_wait(registry: Registry, kind: str, job_ids: list[str], wait_s: float, after) -> list[str]:
    job_ids = [j for j in job_ids if not j.startswith("pid:")]
    cancel_job_ids(kind, job_ids)
    deadline = time.monotonic() + wait_s
    while alive_job_ids(kind, job_ids) and time.monotonic() < deadline:
        time.sleep(0.5)
    cancel_job_ids(kind, alive_job_ids(kind, job_ids), force=True)
    after()
    return job_ids


def resolve(registry: Registry, name: str) -> tuple[str, str]:
    """``("namespace", ns)`` or ``("service", name)``; SystemExit when it names nothing or too much."""
    namespaces = registry.namespaces()
    if name in namespaces:
        return "namespace", name
    prefixed = [ns for ns in namespaces if ns.startswith(f"{name}-")]
    if len(prefixed) == 1:
        return "namespace", prefixed[0]
    if len(prefixed) > 1:
        raise SystemExit(f"{name!r} prefixes several runs {prefixed}: name one")
    if registry.entries(service=name):
        return "service", name
    raise SystemExit(f"no run or service {name!r} in {registry.root} (see python -m launcher.status)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.down", description=__doc__.split("\n")[0])
    parser.add_argument("name", help="a run (namespace or unique run-name prefix) or a service")
    parser.add_argument("--root", default=None, help="registry root (default: $GYMLAUNCH_REGISTRY_ROOT or ~/.gymlaunch/registry)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for jobs to stop before killing them")
    args = parser.parse_args(argv)
    registry = Registry(args.root)
    what, name = resolve(registry, args.name)
    stop = down_namespace if what == "namespace" else down_service
    job_ids = stop(registry, name, args.wait)
    print(f"{what} {name}: cancelled jobs {job_ids or 'none'}, entries removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
