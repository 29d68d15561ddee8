"""The endpoint registry: the only code that knows its folders on the shared filesystem.

::

    <root>/                           registry.root ($GYMLAUNCH_REGISTRY_ROOT, ~/.gymlaunch/registry)
      .<namespace>.lock               launch-or-join / let-go lock of a pool shared by a sweep's
                                      points; it lives exactly as long as the namespace
      <namespace>/                    one run, or one pool shared by a sweep's points (mode 0700)
        .api_key                      the namespace's API key (0600)
        .jobs.json                    the cluster kind and the job ids serving it
        .owners/<run id>              one file per launcher run using it, touched as its heartbeat
        .stop                         written by ``launcher.down``: the runs using it stop
        .deaths/<service>-<replica>-<job id>   why that replica's engine died (its server job writes it)
        .admitted/<service>-<replica>-<job id> the launcher's readiness gate passed that job's engine:
                                      its entry may turn ``ready`` (``healthy`` until then)
        .nodes/<service>-<replica>-<job id>/<rank>.json   a replica spanning nodes: each node's beat
                                      (server/multinode.py), by which head and workers watch each other
        <service>/<replica>-<job id>.json   one entry per replica's job (0600), what clients read; a
                                      replica's successor (a time-limit rollover) has its own
                                      while both run
        <service>@gateway/0-<job id>.json   the service's gateway (server/gateway.py), an entry like a
                                      replica's (engine ``gateway``): clients that read the registry
                                      find the one URL of the service as they find a replica

Writers replace a file atomically (temp file + fsync + ``os.replace``), so a
reader sees either the old or the new file, never half of one. Readers take no
lock: on shared filesystems locks are slow and sometimes broken, and a reader
that meets a file it cannot parse, or a field of the wrong type, skips it with
a warning. Two writers in one folder: one's ``remove`` may prune the folder
the other is about to write in; that writer makes it again and retries.
Namespace and service names (they become folders) match ``NAME_RULE``. An entry whose
heartbeat is older than ``ttl_s`` is not handed out: its server job may have
died without removing it. Server jobs stop themselves when no owner of their
namespace heartbeated for ``orphan_grace_s`` (the launcher was killed, or its
node was lost), so no GPU job outlives its runs by more than that.

``Registry`` is also the schema of the config's ``registry:`` section: its
settings are the namespace's rules (heartbeat, TTL, orphan grace) that every
job of a run shares. This module imports nothing from launcher/ so that any
Gym job can use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from server.checks import Checks
from server.cli import options_anywhere

log = logging.getLogger(__name__)

# starting: the engine loads; healthy: it answers its health route, the launcher's gate checks it
# (clients do not use it yet); ready: gated, clients send work; draining: no new sessions.
STATES = ("starting", "healthy", "ready", "draining")
ROOT_ENV = "GYMLAUNCH_REGISTRY_ROOT"
NAMESPACE_ENV = "GYMLAUNCH_NAMESPACE"
# A key for clients to send where an entry names no key file (an endpoint run outside the registry).
API_KEY_ENV = "GYMLAUNCH_API_KEY"
# Hidden names: no listing of services takes them for one.
_API_KEY_FILE = ".api_key"
_JOBS_FILE = ".jobs.json"
_OWNERS = ".owners"
_STOP_FILE = ".stop"
_DEATHS = ".deaths"
_ADMITTED = ".admitted"
_NODES = ".nodes"  # the nodes of replicas that span several: <service>-<replica>-<job id>/<rank>.json
# The gateway of service S publishes as service ``S@gateway``: any client of the registry (the
# collector's pool, ``urls``) reaches it, fails over to its replacement, and checks its heartbeat,
# as for a replica. ``@`` cannot start a service name a client asks for by mistake.
GATEWAY_SUFFIX = "@gateway"
GATEWAY_ENGINE = "gateway"
# Namespaces and services become folder names below the root: no separator, no leading dot (hidden
# records, "." and ".."), no ".." anywhere, so that no name reaches outside its namespace.
NAME_RULE = "[A-Za-z0-9][A-Za-z0-9._-]* without '..'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A writer whose folder is pruned under it (another writer removed the last entry) makes it again:
# this many times in a row would be a remover in a loop, not a race.
_WRITE_ATTEMPTS = 10


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a namespace or service name (a folder below the registry root); None if it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        return f"{name!r} must match {NAME_RULE}"
    return None


def check_name(what: str, name: object) -> str:
    """``name`` when it is a valid ``what`` (namespace, service); else ``ValueError``. A service may
    be a gateway's (``<service>@gateway``)."""
    bare = name[: -len(GATEWAY_SUFFIX)] if what == "service" and isinstance(name, str) and \
        name.endswith(GATEWAY_SUFFIX) else name
    problem = name_problem(bare)
    if problem:
        raise ValueError(f"registry {what} {problem}")
    return name


def gateway_service(service: str) -> str:
    """The registry service name under which ``service``'s gateway publishes itself."""
    return f"{service}{GATEWAY_SUFFIX}"


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
    # Which scheduler job_id belongs to (slurm | local), so that a stop never takes a Slurm job id
    # for a local pid; "" when the server runs outside any job (by hand).
    cluster: str = ""

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
        """``ValueError`` naming the field when one is missing or not of its type (``heartbeat_at:
        "soon"`` would break every reader that compares it)."""
        entry = _typed(cls, data)
        if entry.state not in STATES:
            raise ValueError(f"state: unknown state {entry.state!r}")
        return entry


@dataclass
class JobRecord:
    """The jobs submitted for a namespace, so another process can stop them without the submitter."""

    kind: str  # the cluster kind that knows these ids: local | slurm
    job_ids: list[str]  # the replicas' jobs (replacements appended)
    server_hash: str = ""
    gateway_job_ids: list[str] = dataclasses.field(default_factory=list)  # the service's gateway jobs, in order

    @property
    def all_job_ids(self) -> list[str]:
        return [*self.job_ids, *self.gateway_job_ids]


@dataclass
class NodeBeat:
    """One node of a replica that spans several (server/multinode.py), as it last said: the head
    (rank 0) and its workers watch each other through these, on the shared filesystem."""

    rank: int  # 0: the head, which serves HTTP and has the replica's entry
    host: str  # the node's hostname
    addr: str  # the address the other nodes reach it at
    pid: int
    state: str  # starting | listening (head: its distributed port takes connections) | running | dead
    heartbeat_at: float
    engine_pid: int | None = None
    dist_port: int | None = None  # the head's distributed port (torch's master port, DP's RPC port)
    log: str = ""  # its engine's log file
    reason: str = ""  # dead: why

    def is_fresh(self, ttl_s: float, now: float | None = None) -> bool:
        return ((now if now is not None else time.time()) - self.heartbeat_at) <= ttl_s


@dataclass(frozen=True)
class Scanned:
    """One entry file as a client last parsed it (``Registry.scan``)."""

    # inode, size, mtime, ctime: os.replace gives every write a new inode, so a rewrite is seen
    # even where mtimes are coarse (NFS, some shared filesystems).
    signature: tuple[int, int, int, int]
    entry: Entry | None  # None: the file did not parse (logged when read)


@dataclass
class Registry:
    """Entries and namespace records below one root folder, and the rules a namespace's jobs share."""

    root: Optional[Path] = None  # None: $GYMLAUNCH_REGISTRY_ROOT, else ~/.gymlaunch/registry
    heartbeat_s: float = 5.0  # how often a server rewrites its entry (and a launcher its owner file)
    ttl_s: float = 30.0  # an entry older than this is not handed out as ready
    # Servers stop when no run using them heartbeated for this long; None: never (servers run by hand).
    orphan_grace_s: Optional[float] = 120.0

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser() if self.root else default_root()

    def validate(self, checks: Checks) -> None:
        problem = _root_problem(self.root)
        checks.require(problem is None, "root", f"{problem}")
        if not checks.above(self, "heartbeat_s", 0):
            return
        twice = f"at least twice {checks.key('heartbeat_s')} ({self.heartbeat_s})"
        checks.must(self, "ttl_s", twice, lambda v: v >= 2 * self.heartbeat_s)
        checks.must(self, "orphan_grace_s", twice + " or null", lambda v: v is None or v >= 2 * self.heartbeat_s)

    # ------------------------------------------------------------ entries

    def path(self, namespace: str, service: str, replica: int, job_id: str) -> Path:
        # Per job, not per replica: a replica's successor publishes beside the job it takes over
        # from, and the old one's drain removes its own entry only.
        return self._service_dir(namespace, service) / f"{replica}-{_file_part('job id', job_id)}.json"

    def publish(self, entry: Entry) -> Path:
        """Write (or replace) ``entry`` atomically."""
        target = self.path(entry.namespace, entry.service, entry.replica, entry.job_id)
        _write_atomic(target, json.dumps(entry.to_json(), indent=1).encode())
        return target

    def heartbeat(self, entry: Entry, state: str | None = None) -> Entry:
        """Publish ``entry`` again with a new heartbeat (and optionally a new state)."""
        entry.heartbeat_at = time.time()
        if state is not None:
            entry.state = state
        self.publish(entry)
        return entry

    def remove(self, namespace: str, service: str, replica: int, job_id: str | None = None) -> bool:
        """Remove the entry of ``replica``'s job ``job_id`` (None: of every job of it); whether one was there."""
        folder = self._service_dir(namespace, service)
        paths = [self.path(namespace, service, replica, job_id)] if job_id is not None else \
            list(folder.glob(f"{replica}-*.json"))
        removed = False
        for path in paths:
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        _prune_empty(folder, stop=self.root)
        return removed

    def entries(self, namespace: str | None = None, service: str | None = None) -> list[Entry]:
        """Every entry that parses, sorted by (namespace, service, replica, job id)."""
        out = []
        for path in self._files(namespace, service):
            entry = read_entry(path)
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.namespace, e.service, e.replica, e.job_id))

    def entry(self, namespace: str, service: str, replica: int, job_id: str) -> Entry | None:
        return read_entry(self.path(namespace, service, replica, job_id))

    def ready(self, service: str, namespace: str | None = None) -> list[Entry]:
        """Entries that a client may send new work to: ``ready`` and heartbeating."""
        now = time.time()
        return [e for e in self.entries(namespace, service) if e.state == "ready" and e.is_fresh(self.ttl_s, now)]

    def handed_out(self, service: str, namespace: str | None = None) -> list[Entry]:
        """The ready entries a client may be given: a gateway's (``S@gateway``) only while a replica
        of ``S`` is ready in its namespace, since without one it answers nothing but 503."""
        ready = self.ready(service, namespace)
        if not service.endswith(GATEWAY_SUFFIX) or not ready:
            return ready
        backed = {e.namespace for e in self.ready(service.removesuffix(GATEWAY_SUFFIX), namespace)}
        return [e for e in ready if e.namespace in backed]

    def wait(
        self, service: str, count: int, timeout_s: float, namespace: str | None = None, poll_s: float = 0.5
    ) -> list[Entry]:
        """Block until ``count`` replicas of ``service`` are ready (``handed_out``); ``TimeoutError``
        otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.handed_out(service, namespace)
            if len(ready) >= count:
                return ready
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(ready)}/{count} replicas of service {service!r} ready after {timeout_s:g}s "
                    f"(registry {self.root}, namespace {namespace or 'any'})"
                )
            time.sleep(poll_s)

    def scan(self, namespace: str, service: str, previous: dict[str, Scanned]) -> dict[str, Scanned]:
        """The service's entry files, parsing only those whose signature changed since ``previous``.

        For clients that look often (a pool asks once per request): re-reading every file of a
        shared filesystem that often would be slow. Not keyed on the folder's mtime: every
        heartbeat replaces a file, so it changes anyway.
        """
        found: dict[str, Scanned] = {}
        try:
            listing = os.scandir(self._service_dir(namespace, service))
        except (FileNotFoundError, NotADirectoryError):
            return found
        with listing:
            for item in listing:
                if item.name.startswith(".") or not item.name.endswith(".json"):  # temp files are hidden
                    continue
                try:
                    st = item.stat()
                except FileNotFoundError:  # removed since the listing
                    continue
                signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                scanned = previous.get(item.path)
                if scanned is None or scanned.signature != signature:
                    # Stat before read: a file replaced in between is parsed again next time, never missed.
                    scanned = Scanned(signature, read_entry(Path(item.path)))
                found[item.path] = scanned
        return found

    # ------------------------------------------------------------ namespaces

    def namespaces(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return _subdirs(self.root, "namespace")

    def remove_namespace(self, namespace: str) -> int:
        """Remove ``namespace`` whole (entries, key, run records); returns how many entries were left."""
        entries = self.entries(namespace)
        for e in entries:  # first, so that no client reads an entry whose key is gone
            with hiccup_tolerated(f"removing entry {e.service}/{e.replica}-{e.job_id}"):  # rmtree's turn next
                self.remove(e.namespace, e.service, e.replica, e.job_id)
        shutil.rmtree(self._namespace_dir(namespace), ignore_errors=True)
        return len(entries)

    def namespace_exists(self, namespace: str) -> bool:
        """Whether anything is left of ``namespace`` (a run's teardown checks that its removal took)."""
        return os.path.lexists(self._namespace_dir(namespace))

    def create_api_key(self, namespace: str) -> Path:
        """A fresh random key for the namespace's endpoints, readable by this user only."""
        path = self._namespace_dir(namespace) / _API_KEY_FILE
        _write_atomic(path, secrets.token_urlsafe(32).encode())
        return path

    def record_jobs(self, namespace: str, record: JobRecord) -> None:
        _write_atomic(self._namespace_dir(namespace) / _JOBS_FILE, json.dumps(dataclasses.asdict(record)).encode())

    def recorded_jobs(self, namespace: str) -> JobRecord | None:
        try:
            return _typed(JobRecord, json.loads((self._namespace_dir(namespace) / _JOBS_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    @contextmanager
    def pool_lock(self, namespace: str) -> Iterator[None]:
        """Makes launch-or-join and let-go of a shared pool one step each.

        The lock file is removed, still locked, when the namespace is gone at the end (the pool
        stopped, or its launch failed), so no lock file outlives its pool. A process that was
        waiting on the removed file then holds a lock nobody else can see: it notices that the
        path no longer names the file it locked, and locks again. (filelock cannot tell, hence
        fcntl here.)
        """
        path = self.root / f".{check_name('namespace', namespace)}.lock"
        _private_dirs(self.root)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            yield
        finally:
            if not self._namespace_dir(namespace).is_dir():
                path.unlink(missing_ok=True)
            os.close(fd)  # releases the lock

    def record_death(self, namespace: str, service: str, replica: int, job_id: str, reason: str) -> None:
        """Why a replica's engine died (``killed by signal 9 (SIGKILL)``), for whoever replaces it."""
        _write_atomic(self._namespace_dir(namespace) / _DEATHS / _job_key(service, replica, job_id), reason.encode())

    def death_note(self, namespace: str, service: str, replica: int, job_id: str) -> str | None:
        try:
            return (self._namespace_dir(namespace) / _DEATHS / _job_key(service, replica, job_id)).read_text()
        except OSError:  # none written, or unreadable for now: the scheduler's state says the rest
            return None

    def admit(self, namespace: str, service: str, replica: int, job_id: str) -> None:
        """The launcher's gate passed this job's engine: its server job may publish it ``ready``."""
        _write_atomic(self._namespace_dir(namespace) / _ADMITTED / _job_key(service, replica, job_id), b"")

    def admitted(self, namespace: str, service: str, replica: int, job_id: str) -> bool:
        # os.path.exists: False on any OSError (a hiccup), where Path.exists raises some.
        return os.path.exists(self._namespace_dir(namespace) / _ADMITTED / _job_key(service, replica, job_id))

    def publish_node(self, namespace: str, service: str, replica: int, job_id: str, beat: NodeBeat) -> None:
        """Write (or replace) one node's beat of a replica spanning nodes; stamps ``heartbeat_at``."""
        beat.heartbeat_at = time.time()
        _write_atomic(self._node_dir(namespace, service, replica, job_id) / f"{beat.rank}.json",
                      json.dumps(dataclasses.asdict(beat)).encode())

    def nodes(self, namespace: str, service: str, replica: int, job_id: str) -> dict[int, NodeBeat]:
        """The beats of a replica's nodes by rank (a torn or vanished file is left out)."""
        beats = {}
        for path in self._node_dir(namespace, service, replica, job_id).glob("*.json"):
            try:
                beat = _typed(NodeBeat, json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError):
                continue
            beats[beat.rank] = beat
        return beats

    def remove_node(self, namespace: str, service: str, replica: int, job_id: str, rank: int) -> None:
        folder = self._node_dir(namespace, service, replica, job_id)
        (folder / f"{rank}.json").unlink(missing_ok=True)
        _prune_empty(folder, stop=self.root)

    def _node_dir(self, namespace: str, service: str, replica: int, job_id: str) -> Path:
        return self._namespace_dir(namespace) / _NODES / _job_key(service, replica, job_id)

    def request_stop(self, namespace: str, by: str) -> None:
        """Ask every run using ``namespace`` to stop (``launcher.down``); ``by`` says who asked."""
        if self._namespace_dir(namespace).is_dir():
            _write_atomic(self._namespace_dir(namespace) / _STOP_FILE, by.encode())

    def stop_request(self, namespace: str) -> str | None:
        """Who asked the runs of ``namespace`` to stop, if anyone did (or removed the namespace)."""
        try:
            return (self._namespace_dir(namespace) / _STOP_FILE).read_text() or "launcher.down"
        except FileNotFoundError:
            return None if self._namespace_dir(namespace).is_dir() else f"its registry namespace {namespace} was removed"
        except OSError:  # the folder unreadable for a moment: no one is known to have asked
            return None

    # ------------------------------------------------------------ owners

    def touch_owner(self, namespace: str, run_id: str, run_dir: str | None = None) -> None:
        """Beat as an owner of ``namespace`` (the file's age); with ``run_dir``, the file names the run's
        folder (``python -m launcher.status`` shows it, its progress and its job)."""
        folder = self._namespace_dir(namespace) / _OWNERS
        _private_dirs(folder)
        path = folder / _file_part("run id", run_id)
        if run_dir is None:
            path.touch()
        else:
            _write_atomic(path, run_dir.encode())

    def owner_run_dir(self, namespace: str, run_id: str) -> str | None:
        """The run folder ``run_id`` named when it began to own ``namespace``; None if unknown."""
        try:
            return (self._namespace_dir(namespace) / _OWNERS / _file_part("run id", run_id)).read_text() or None
        except OSError:
            return None

    def remove_owner(self, namespace: str, run_id: str) -> None:
        (self._namespace_dir(namespace) / _OWNERS / _file_part("run id", run_id)).unlink(missing_ok=True)

    def live_owners(self, namespace: str, now: float | None = None) -> list[str]:
        """Runs using ``namespace`` whose heartbeat is younger than ``orphan_grace_s``."""
        now = time.time() if now is None else now
        grace_s = self.orphan_grace_s if self.orphan_grace_s is not None else float("inf")
        alive = []
        try:
            for path in (self._namespace_dir(namespace) / _OWNERS).iterdir():
                if path.name.startswith("."):  # an owner file being written (_write_atomic's temp)
                    continue
                try:
                    if now - path.stat().st_mtime <= grace_s:
                        alive.append(path.name)
                except FileNotFoundError:
                    continue
        except FileNotFoundError:
            return []
        return sorted(alive)

    def owner_age(self, namespace: str, run_id: str) -> float | None:
        """Seconds since ``run_id`` last heartbeated as an owner of ``namespace``; None if it is no owner."""
        try:
            return time.time() - (self._namespace_dir(namespace) / _OWNERS / run_id).stat().st_mtime
        except FileNotFoundError:
            return None

    def orphaned(self, namespace: str) -> bool:
        """No run has used ``namespace`` for ``orphan_grace_s``: its servers should stop. Owners that
        cannot be read for a moment (a hiccup of the shared filesystem) are not taken for none: the
        caller looks again at its next beat."""
        if self.orphan_grace_s is None:
            return False
        try:
            return not self.live_owners(namespace)
        except OSError as e:
            log.warning("owners of %s not readable (%s); looking again at the next beat", namespace, e)
            return False

    def owner_heartbeat(self, namespace: str, run_id: str, run_dir: str | None = None) -> "OwnerHeartbeat":
        return OwnerHeartbeat(self, namespace, run_id, run_dir)

    # ------------------------------------------------------------ helpers

    def _namespace_dir(self, namespace: str) -> Path:
        return self.root / check_name("namespace", namespace)

    def _service_dir(self, namespace: str, service: str) -> Path:
        return self._namespace_dir(namespace) / check_name("service", service)

    def _files(self, namespace: str | None, service: str | None) -> Iterator[Path]:
        namespaces = [namespace] if namespace else self.namespaces()
        for ns in namespaces:
            ns_dir = self._namespace_dir(ns)
            services = [service] if service else _subdirs(ns_dir, "service")
            for svc in services:
                svc_dir = ns_dir / check_name("service", svc)
                if svc_dir.is_dir():
                    yield from svc_dir.glob("*.json")


class OwnerHeartbeat:
    """Touches a run's owner file from a daemon thread until stopped."""

    def __init__(self, registry: Registry, namespace: str, run_id: str, run_dir: str | None = None) -> None:
        self.registry, self.namespace, self.run_id, self.run_dir = registry, namespace, run_id, run_dir
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"owner-heartbeat-{run_id}", daemon=True)

    def start(self) -> "OwnerHeartbeat":
        self.registry.touch_owner(self.namespace, self.run_id, self.run_dir)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and remove the owner file: this run no longer uses the namespace."""
        self._stop.set()
        self._thread.join()
        # Left behind by a hiccup, the file ages out after orphan_grace_s, as a killed launcher's does.
        with hiccup_tolerated(f"removing owner file of run {self.run_id}"):
            self.registry.remove_owner(self.namespace, self.run_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.registry.heartbeat_s):
            try:
                self.registry.touch_owner(self.namespace, self.run_id)
            except OSError:  # a hiccup of the shared filesystem: the next beat may work
                pass


@contextmanager
def hiccup_tolerated(what: str) -> Iterator[None]:
    """For a registry write its caller can do without (it tidies up, or is done again later): a
    shared-filesystem hiccup (any ``OSError``) is logged, not raised, so that it cannot take a
    launcher's fleet or teardown down."""
    try:
        yield
    except OSError as e:
        log.warning("registry: %s failed (%s); carrying on", what, e)


def read_entry(path: Path) -> Entry | None:
    """The entry in ``path``; None (with a warning) if it cannot be parsed, None if it is gone."""
    try:
        return Entry.from_json(json.loads(path.read_bytes()))
    except FileNotFoundError:  # removed between listing and reading
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("skipping unreadable registry entry %s: %s", path, e)
        return None


def _write_atomic(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` (mode 0600): readers see the old file or the new one, whole."""
    # Hidden temp name: readers only look at visible ``*.json`` files.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    for attempt in range(_WRITE_ATTEMPTS):
        _private_dirs(target.parent)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            break
        except FileNotFoundError:
            # Another writer removed the last entry of this folder and pruned it (``_prune_empty``)
            # between our mkdir and this open: make it again. Once our temp file is in it, the
            # folder is not empty and no prune can remove it.
            if attempt == _WRITE_ATTEMPTS - 1:
                raise
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def _root_problem(root: Path) -> str | None:
    """Why the registry cannot live in ``root`` (this user could neither make nor write it); None if
    it can. Only looks: nothing is created."""
    existing = root
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    where = f"{root}" if existing == root else f"{root} cannot be created: {existing}"
    if not existing.is_dir():
        return f"{where} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{where} is not writable by this user"
    return None


def _typed(cls: type, data: object):
    """``cls(**data)`` with each field checked against its annotation; ``ValueError`` naming the
    field otherwise. Readers of the shared filesystem get whatever a writer (or a person) left there."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object: {type(data).__name__}")
    fields = dataclasses.fields(cls)
    missing = sorted(f.name for f in fields if f.default is dataclasses.MISSING and
                     f.default_factory is dataclasses.MISSING and f.name not in data)
    if missing:
        raise ValueError(f"missing keys {missing}")
    hints = _type_hints(cls)
    values = {}
    for f in fields:
        if f.name in data:
            if not _is_a(data[f.name], hints[f.name]):
                raise ValueError(f"{f.name}: expected {_type_name(hints[f.name])}, got {data[f.name]!r}")
            values[f.name] = data[f.name]
    return cls(**values)


_type_hints = functools.cache(typing.get_type_hints)  # per record class; clients parse often


def _is_a(value: object, hint: object) -> bool:
    """Whether a JSON value fits a field's annotation (the few kinds the registry's records use)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_is_a(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # JSON writes 1.0 as 1 after some tools' round trips
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: object) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _file_part(what: str, value: object) -> str:
    """A job or run id inside a file name: nothing in it may make the name a path."""
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\0" in value:
        raise ValueError(f"registry {what} {value!r} cannot be part of a file name")
    return value


def _job_key(service: str, replica: int, job_id: str) -> str:
    """The name of a job's records (death note, admission, nodes) in its namespace."""
    return f"{check_name('service', service)}-{replica}-{_file_part('job id', job_id)}"


def _private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents as 0700: entries point at keys. A parent that
    another writer pruned a moment ago (``_prune_empty``) is made again."""
    for attempt in range(_WRITE_ATTEMPTS):
        try:
            folder.mkdir(mode=0o700)
            return
        except FileExistsError:  # there already (a file in the way: the write below it says so)
            return
        except FileNotFoundError:
            if attempt == _WRITE_ATTEMPTS - 1:
                raise
            _private_dirs(folder.parent)


def _subdirs(folder: Path, what: str) -> list[str]:
    """The namespace or service folders in ``folder``: hidden ones hold records (owners, locks), and
    a folder whose name no writer of ours could have made (someone's ``mkdir 'a b'``) is no one's
    namespace or service: passed over, so that it breaks no listing."""
    try:
        names = [p.name for p in folder.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _valid(what, name))


def _valid(what: str, name: str) -> bool:
    try:
        check_name(what, name)
    except ValueError:
        return False
    return True


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


# ---------------------------------------------------------------- library functions behind the CLI


def resolve_namespace(registry: Registry, service: str, namespace: str | None) -> str | None:
    """``namespace``, or the only namespace serving ``service``; ``ValueError`` when several do."""
    if namespace:
        return namespace
    owners = sorted({e.namespace for e in registry.entries(service=service)})
    if len(owners) > 1:
        raise ValueError(
            f"service {service!r} exists in several namespaces {owners}: pass --namespace (or set {NAMESPACE_ENV})"
        )
    return owners[0] if owners else None


def urls(registry: Registry, service: str, namespace: str | None, replicas: bool = False) -> list[str]:
    """The base URL of ``service``'s gateway when one serves it (ready, a ready replica behind it),
    none while its gateway is not serving yet (the service's one URL, or none: never a URL that
    does not serve, nor the replicas behind the gateway's back); with no gateway (or with
    ``replicas``) the base URLs of its ready replicas."""
    namespace = resolve_namespace(registry, service, namespace)
    now = time.time()
    if not replicas and any(e.is_fresh(registry.ttl_s, now) for e in registry.entries(namespace, gateway_service(service))):
        return [e.base_url for e in registry.handed_out(gateway_service(service), namespace)[-1:]]
    return [e.base_url for e in registry.ready(service, namespace)]


def key_file(registry: Registry, service: str, namespace: str | None) -> str | None:
    """The file holding the API key the replicas of ``service`` take; None when they take none."""
    return next((e.api_key_file for e in registry.entries(resolve_namespace(registry, service, namespace), service)
                 if e.api_key_file), None)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=None, help=f"registry root (default: ${ROOT_ENV} or ~/.gymlaunch/registry)")
    parser.add_argument(
        "--namespace", default=os.environ.get(NAMESPACE_ENV), help=f"run namespace (default: ${NAMESPACE_ENV})"
    )
    parser.add_argument("--ttl", type=float, default=Registry.ttl_s, help="heartbeat age (s) after which an entry is stale")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every entry, as a table")
    urls_cmd = sub.add_parser("urls", help="the base URL of a service's gateway, else those of its ready replicas")
    urls_cmd.add_argument("service")
    urls_cmd.add_argument("--replicas", action="store_true", help="the replicas' URLs even when a gateway serves them")
    wait = sub.add_parser("wait", help="block until COUNT replicas of SERVICE are ready")
    wait.add_argument("service")
    wait.add_argument("--count", type=int, default=1)
    wait.add_argument("--timeout", type=float, default=600.0)
    sub.add_parser("key-file", help="the file holding the API key of a service's replicas").add_argument("service")
    options_anywhere(parser, sub)
    args = parser.parse_args(argv)

    for what, name in (("namespace", args.namespace), ("service", getattr(args, "service", None))):
        if name is None:
            continue
        try:
            check_name(what, name)
        except ValueError as e:  # a usage error (exit 2), as argparse's own
            parser.error(str(e))
    registry = Registry(args.root, ttl_s=args.ttl)
    if args.command == "list":
        _print_table(registry.entries(args.namespace), registry.ttl_s)
        return 0
    try:
        if args.command == "key-file":
            path = key_file(registry, args.service, args.namespace)
            if path is None:
                print(f"no replica of service {args.service!r} in {registry.root} takes a key", file=sys.stderr)
                return 1
            print(path)
            return 0
        if args.command == "urls":
            found = urls(registry, args.service, args.namespace, args.replicas)
            if not found:
                print(f"no ready replica of service {args.service!r} in {registry.root} (or its gateway not "
                      "serving yet)", file=sys.stderr)
                return 1
        else:
            namespace = resolve_namespace(registry, args.service, args.namespace)
            found = [e.base_url for e in registry.wait(args.service, args.count, args.timeout, namespace)]
    except (ValueError, TimeoutError) as e:
        print(str(e), file=sys.stderr)
        return 1
    print(",".join(found))
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
