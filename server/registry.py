"""The endpoint registry: one JSON file per server replica on a shared filesystem.

Layout: ``<root>/<namespace>/<service>/<replica>.json``. A namespace is one run
(or one shared server pool), a service is a named group of replicas (``policy``).

Writers replace a file atomically (temp file + fsync + ``os.replace``), so a
reader sees either the old or the new entry, never half of one. Readers take
no lock: on shared filesystems locks are slow and sometimes broken, and a
reader that meets a file it cannot parse skips it with a warning. An entry
whose heartbeat is older than the TTL is not returned as ready: its server job
may have died without removing it.

This module imports nothing from launcher/ so that any Gym job can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

STATES = ("starting", "ready", "draining")
ROOT_ENV = "GYMLAUNCH_REGISTRY_ROOT"
NAMESPACE_ENV = "GYMLAUNCH_NAMESPACE"
DEFAULT_TTL_S = 30.0
API_KEY_FILE = ".api_key"  # per namespace; hidden so no listing takes it for a service


def default_root() -> Path:
    """Under the user's home, so jobs on other nodes of a cluster find it."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else Path.home() / ".gymlaunch" / "registry"


@dataclass
class Entry:
    """What a server replica publishes about itself."""

    namespace: str
    service: str
    replica: int
    model: str  # the served model name clients put in requests
    host: str
    port: int
    engine: str  # vllm | sglang | ...
    engine_version: str
    job_id: str  # Slurm job id, or the local job's id
    node: str
    pid: int  # the server job's process (the engine is its child)
    engine_pid: int | None = None
    state: str = "starting"
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    config_hash: str = ""
    api_key_file: str | None = None  # where the key lives (mode 0600); None: no key needed

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """Where the engine's non-OpenAI routes live (``/health``, ``/tokenize``)."""
        return f"http://{self.host}:{self.port}"

    def is_fresh(self, ttl_s: float, now: float | None = None) -> bool:
        return ((now if now is not None else time.time()) - self.heartbeat_at) <= ttl_s

    def read_api_key(self) -> str | None:
        return Path(self.api_key_file).read_text().strip() if self.api_key_file else None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "base_url": self.base_url}

    @classmethod
    def from_json(cls, data: dict) -> "Entry":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - data.keys()
        if missing:
            raise ValueError(f"missing keys {sorted(missing)}")
        entry = cls(**{k: v for k, v in data.items() if k in names})
        if entry.state not in STATES:
            raise ValueError(f"unknown state {entry.state!r}")
        return entry


class Registry:
    """Read and write entries below one root folder."""

    def __init__(self, root: str | Path | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.ttl_s = ttl_s

    def path(self, namespace: str, service: str, replica: int) -> Path:
        return self.root / namespace / service / f"{replica}.json"

    def publish(self, entry: Entry) -> Path:
        """Write (or replace) ``entry`` atomically."""
        target = self.path(entry.namespace, entry.service, entry.replica)
        self._private_dirs(target.parent)
        # Hidden temp name: readers only look at ``*.json``.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        data = json.dumps(entry.to_json(), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return target

    def heartbeat(self, entry: Entry, state: str | None = None) -> Entry:
        """Publish ``entry`` again with a new heartbeat (and optionally a new state)."""
        entry.heartbeat_at = time.time()
        if state is not None:
            entry.state = state
        self.publish(entry)
        return entry

    def create_api_key(self, namespace: str) -> Path:
        """A fresh random key for the namespace's endpoints, readable by this user only."""
        path = self.root / namespace / API_KEY_FILE
        self._private_dirs(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_urlsafe(32).encode())
        finally:
            os.close(fd)
        return path

    def remove_namespace(self, namespace: str) -> int:
        """Remove ``namespace`` whole (entries, key, run records); returns how many entries were left."""
        entries = self.entries(namespace)
        for e in entries:
            self.remove(e.namespace, e.service, e.replica)
        shutil.rmtree(self.root / namespace, ignore_errors=True)
        return len(entries)

    def _private_dirs(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents as 0700: entries point at keys."""
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:  # another writer made it first
                pass

    def remove(self, namespace: str, service: str, replica: int) -> bool:
        path = self.path(namespace, service, replica)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _prune_empty(path.parent, stop=self.root)
        return True

    def entries(self, namespace: str | None = None, service: str | None = None) -> list[Entry]:
        """Every entry that parses, sorted by (namespace, service, replica)."""
        out = []
        for path in self._files(namespace, service):
            entry = read_entry(path)
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.namespace, e.service, e.replica))

    def ready(self, service: str, namespace: str | None = None) -> list[Entry]:
        """Entries that a client may send new work to: ``ready`` and heartbeating."""
        now = time.time()
        return [
            e
            for e in self.entries(namespace, service)
            if e.state == "ready" and e.is_fresh(self.ttl_s, now)
        ]

    def namespaces(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def wait(
        self, service: str, count: int, timeout_s: float, namespace: str | None = None, poll_s: float = 0.5
    ) -> list[Entry]:
        """Block until ``count`` replicas of ``service`` are ready; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.ready(service, namespace)
            if len(ready) >= count:
                return ready
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(ready)}/{count} replicas of service {service!r} ready after {timeout_s:g}s "
                    f"(registry {self.root}, namespace {namespace or 'any'})"
                )
            time.sleep(poll_s)

    def _files(self, namespace: str | None, service: str | None) -> Iterator[Path]:
        namespaces = [namespace] if namespace else self.namespaces()
        for ns in namespaces:
            ns_dir = self.root / ns
            services = [service] if service else _subdirs(ns_dir)
            for svc in services:
                svc_dir = ns_dir / svc
                if svc_dir.is_dir():
                    yield from svc_dir.glob("*.json")


def read_entry(path: Path) -> Entry | None:
    """The entry in ``path``; None (with a warning) if it cannot be parsed, None if it is gone."""
    try:
        return Entry.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:  # removed between listing and reading
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("skipping unreadable registry entry %s: %s", path, e)
        return None


def _subdirs(folder: Path) -> list[str]:
    """Service folders: hidden ones hold a namespace's own records (owners)."""
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse, which is harmless.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove now-empty service and namespace folders (another writer may race us: fine)."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


# ---------------------------------------------------------------- CLI


def _resolve_namespace(registry: Registry, service: str, namespace: str | None) -> str:
    if namespace:
        return namespace
    owners = sorted({e.namespace for e in registry.entries(service=service)})
    if len(owners) > 1:
        raise SystemExit(
            f"service {service!r} exists in several namespaces {owners}: pass --namespace "
            f"(or set {NAMESPACE_ENV})"
        )
    return owners[0] if owners else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help=f"registry root (default: ${ROOT_ENV} or ~/.gymlaunch/registry)")
    parser.add_argument(
        "--namespace", default=os.environ.get(NAMESPACE_ENV), help=f"run namespace (default: ${NAMESPACE_ENV})"
    )
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="heartbeat age (s) after which an entry is stale")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every entry, as a table")
    urls = sub.add_parser("urls", help="comma-separated base URLs of a service's ready replicas")
    urls.add_argument("service")
    wait = sub.add_parser("wait", help="block until COUNT replicas of SERVICE are ready")
    wait.add_argument("service")
    wait.add_argument("--count", type=int, default=1)
    wait.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    registry = Registry(args.root, ttl_s=args.ttl)
    if args.command == "list":
        _print_table(registry.entries(args.namespace), registry.ttl_s)
        return 0
    namespace = _resolve_namespace(registry, args.service, args.namespace)
    if args.command == "urls":
        ready = registry.ready(args.service, namespace or None)
        if not ready:
            print(f"no ready replica of service {args.service!r} in {registry.root}", file=sys.stderr)
            return 1
        print(",".join(e.base_url for e in ready))
        return 0
    try:
        ready = registry.wait(args.service, args.count, args.timeout, namespace or None)
    except TimeoutError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(",".join(e.base_url for e in ready))
    return 0


def _print_table(entries: list[Entry], ttl_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("namespace", "service", "replica", "state", "base_url", "model", "job", "heartbeat age")
    now = time.time()
    for e in entries:
        age = now - e.heartbeat_at
        state = e.state if e.is_fresh(ttl_s, now) else f"{e.state} (stale)"
        table.add_row(e.namespace, e.service, str(e.replica), state, e.base_url, e.model, e.job_id, f"{age:.0f}s")
    # Piped output is read by scripts and people in logs: never cut URLs at 80 columns.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


if __name__ == "__main__":
    sys.exit(main())
