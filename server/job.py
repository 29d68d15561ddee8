"""What a server job runs on its node: a supervisor around one engine process.

It reserves a port, starts the engine as its own child (never detached, so the
cluster's process tracking and our signals reach it), waits for its health
route, publishes the replica in the registry and heartbeats. A job the launcher
gates stays ``healthy`` (clients do not use it) until the launcher's readiness
checks admit it, and only then turns ``ready``. SIGTERM/SIGINT or
an engine crash remove the entry and stop the engine's whole process group.
SIGUSR2 (Slurm's warning before the time limit, as submitit asks for it, or the
launcher's fleet once this replica's successor is ready) drains first: the entry
turns ``draining`` so clients send it nothing new, and in-flight requests get up
to ``drain_grace_s`` to finish; the job then ends on its own (COMPLETED). Each job
has an entry of its own, so a successor serves beside it meanwhile. The engine also gets
SIGTERM from the kernel if this supervisor dies without cleaning up
(``server.process``): no orphaned GPU process.

Imports nothing from launcher/.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

from server import multinode, process, ray_cluster
from server.engines import EngineLaunch, EngineSpec, build_launch, engine_version, host_port
from server.multinode import NodeGroup, NodeProblem
from server.ray_cluster import RayNode
from server.registry import Entry, Registry, hiccup_tolerated

log = logging.getLogger(__name__)

_PORT_ATTEMPTS = 3
# free_port: picks remembered this long per node (longer than any engine takes to bind its port).
_PICKED_PORTS = "gymlaunch-picked-ports.json"  # in the user's private folder on the node (_private_node_dir)
_PICK_WINDOW_S = 1800.0
_PICK_ATTEMPTS = 50
# Holding the picks' lock takes milliseconds: longer means a stuck (or hostile) holder, and a port
# picked without the record beats a job that never starts.
_PICK_LOCK_TIMEOUT_S = 10.0
_fallback_dir: Path | None = None  # a process's own private folder when the shared-by-name one is not ours
_DRAIN_POLL_S = 0.5
# A draining replica stops no sooner than this after its entry turned ``draining``, even with nothing
# in flight: clients re-read the registry every few seconds (jobs.pool.EndpointPool.refresh_s, 2 s),
# and one that has not yet seen the state could still send it a request.
_DRAIN_SETTLE_S = 5.0
# Prometheus gauges of requests an engine still owes an answer (SGLang's need --enable-metrics;
# without them draining waits the whole grace period).
_IN_FLIGHT_METRICS = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "sglang:num_running_reqs", "sglang:num_queue_reqs",
)


@dataclass(kw_only=True)
class ServerSettings:
    """How a replica is started, stopped and drained: ``server.*`` keys beside ``EngineSpec``'s."""

    port: int | None = None  # None: any free port on the node
    startup_timeout_s: float = 900.0  # from the job running to the engine answering its health route
    stop_grace_s: float = 15.0  # SIGTERM to SIGKILL when stopping the engine
    drain_grace_s: float = 60.0  # on Slurm's pre-timeout signal (USR2): time for in-flight requests


@dataclass(kw_only=True)
class ServerJob(ServerSettings):
    """Everything one replica needs; picklable, so it travels through submitit."""

    namespace: str
    service: str
    replica: int
    engine: EngineSpec
    registry: Registry  # where to publish, and the namespace's heartbeat and orphan rules
    log_dir: str
    cluster: str = ""  # the cluster kind submitting the job (local | slurm), recorded in the entry
    model_path: str | None = None  # a local folder or a hub id the engine resolves
    embedded_model: str | None = None  # prepared on the node by server.models
    model_cache_dir: str | None = None
    bind_host: str | None = "127.0.0.1"  # None: the advertised host's address (multinode.listen_address)
    advertise_host: str | None = None  # None: this node's hostname
    api_key_file: str | None = None  # None: the endpoint takes requests without a key
    config_hash: str = ""
    # The launcher sets it: the entry stays ``healthy`` until its readiness gate admits the job.
    gated: bool = False
    nodes: int = 1  # >1: this job runs on that many nodes, one task each (server/multinode.py)
    advertise_interface: str | None = None  # whose address the nodes give each other and the registry
    multinode_backend: str = "mp"  # mp: an engine on every node; ray: a Ray node on every node (ray_cluster.py)

    def orphaned(self) -> bool:
        return self.registry.orphaned(self.namespace)

    @property
    def engine_log(self) -> Path:
        return self.node_log(0)

    def node_log(self, rank: int) -> Path:
        return engine_log(self.log_dir, self.service, self.replica, rank, self.nodes)


def engine_log(log_dir: str | Path, service: str, replica: int, rank: int = 0, nodes: int = 1) -> Path:
    """Where a replica's engine logs: one file per node of a replica spanning nodes (``.node<k>``)."""
    node = f".node{rank}" if nodes > 1 else ""
    return Path(log_dir) / f"{service}-{replica}{node}.engine.log"


class EngineFailed(RuntimeError):
    """The engine exited or never became healthy; the message carries its log tail, ``reason`` the why
    in a few words (``killed by signal 9 (SIGKILL)``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def run(job: ServerJob) -> None:
    """Serve until told to stop. Raises ``EngineFailed`` if the engine dies."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    process.raise_open_files_limit()  # for the engine too, which inherits it
    signals = _Signals()
    registry = job.registry
    api_key = Path(job.api_key_file).read_text().strip() if job.api_key_file else None
    model_path = _resolve_model(job)
    Path(job.log_dir).mkdir(parents=True, exist_ok=True)
    group = _join_group(job) if job.nodes > 1 else None
    # Resolved once: the engine's --host, the port probe and our own requests to it all mean this
    # address. A worker serves no HTTP (its engine ignores --host): its own address stands in.
    if not job.bind_host:
        worker = group is not None and group.rank > 0
        job.bind_host = group.addr if worker else multinode.listen_address(_advertised_host(job, group))
    if group is not None and group.rank > 0:
        return _run_worker(job, group, model_path, api_key, signals)
    engine = ray = None
    watch = _Watch(job, group)
    try:
        if group is not None and job.multinode_backend == "ray":
            ray = _start_ray_cluster(job, group, watch, signals)
            if signals.stop.is_set():
                return
        for attempt in range(_PORT_ATTEMPTS):
            port = job.port or free_port(job.bind_host)
            role = None
            if group is not None:
                if ray is None:  # the head: its distributed port, which the workers' engines connect to
                    group.say(dist_port=free_port(group.addr))
                role = group.role(group.beat, job.multinode_backend)
            launch = build_launch(job.engine, model_path, job.bind_host, port, api_key, node=role)
            engine = watch.engine = _start_engine(job, launch)
            entry = _entry(job, port, engine.pid, group)
            beat = EntryHeartbeat(registry, entry)
            beat()
            try:
                if group is not None and ray is None:
                    group.say(engine_pid=engine.pid)
                    _wait_until(lambda: _listens(group.addr, group.beat.dist_port), 0.2, watch, beat, signals.stop)
                    group.say(state="listening")  # the workers start now
                _wait_healthy(job, watch, beat, launch.health_path, signals.stop)
                break
            except EngineFailed as e:
                with hiccup_tolerated(f"removing the entry of job {entry.job_id}"):  # it goes stale anyway
                    registry.remove(job.namespace, job.service, job.replica, entry.job_id)
                retry = job.port is None and "address already in use" in str(e).lower()
                if not retry or attempt == _PORT_ATTEMPTS - 1:
                    raise
                log.warning("port %d was taken before the engine bound it; retrying on another", port)
        watch.all_started = True  # the head's engine answers: every worker joined it
        if group is not None:
            group.say(state="running")
        if job.gated and not signals.stop.is_set():
            wait_admitted(watch, beat, signals.stop)
        if signals.stop.is_set():
            return
        beat(state="ready")
        log.info("replica %s/%d ready at %s", job.service, job.replica, entry.base_url)
        _serve(job, watch, beat, signals)
    except (EngineFailed, NodeProblem) as e:
        reason = getattr(e, "reason", str(e))
        # Said where the launcher's fleet looks, so the replacement's report says why (the
        # scheduler's state says less, should the registry be what failed).
        with hiccup_tolerated("recording why the replica died"):
            registry.record_death(job.namespace, job.service, job.replica, current_job_id(), reason)
        if group is not None:
            group.say(state="dead", reason=reason)  # the workers stop theirs at once
        raise
    finally:
        # Its own entry only: a successor of the same replica may already serve beside it. Left
        # behind by a hiccup, it goes stale, and the launcher removes a dead job's entry.
        with hiccup_tolerated(f"removing the entry of job {current_job_id()}"):
            registry.remove(job.namespace, job.service, job.replica, current_job_id())
        if engine is not None:
            process.stop(engine, job.stop_grace_s)
        if ray is not None:
            ray.stop(watch.ray, job.stop_grace_s)
        if group is not None:
            group.leave()


class _Signals:
    """SIGTERM/SIGINT: stop now. SIGUSR2: drain, then stop."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.drain = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop.set())
        signal.signal(signal.SIGUSR2, lambda signum, frame: self.drain.set())


class _Watch:
    """Whether the replica still works: its engine (and the head's Ray node) alive and, spanning
    nodes, every worker too (server/multinode.py). Raises ``EngineFailed`` otherwise."""

    def __init__(self, job: ServerJob, group: NodeGroup | None) -> None:
        self.job, self.group = job, group
        self.engine: subprocess.Popen | None = None
        self.ray: subprocess.Popen | None = None
        self.all_started = False  # the head's engine answered: every worker must be there now

    @property
    def poll_s(self) -> float:
        """How often to look: a group must see a lost node within seconds."""
        return multinode.POLL_S if self.group else self.job.registry.heartbeat_s

    def __call__(self) -> None:
        for proc, what in ((self.engine, "engine"), (self.ray, "Ray node")):
            if proc is not None and proc.poll() is not None:
                raise _died(self.job, proc, self.group, what)
        if self.group is None:
            return
        broken = self.group.broken_worker(self.all_started)
        if broken:
            raise EngineFailed(f"replica {self.job.service}/{self.job.replica} broken: {broken}\n"
                               f"{multinode.log_tails(self.group.others() | {0: self.group.beat})}",
                               reason=broken)
        self.group.keep_alive()


class EntryHeartbeat:
    """Publishes a replica's entry again (``Registry.heartbeat``), surviving shared-filesystem hiccups.

    A write that fails (an ``OSError``: the folder unreachable or replaced for a moment) is logged
    and tried again at the next beat: the new state, if any, is kept and written then. Failing for
    longer than ``ttl_s`` is a real failure: clients already take the entry for stale and send the
    replica nothing, so the job fails (``EngineFailed``) and the launcher's fleet replaces it, maybe
    on a node whose filesystem works, rather than a replica serving no one holding its GPUs.
    """

    def __init__(self, registry: Registry, entry: Entry) -> None:
        self.registry, self.entry = registry, entry
        self._failing_since: float | None = None

    def __call__(self, state: str | None = None) -> None:
        try:
            self.registry.heartbeat(self.entry, state)
        except OSError as e:
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            failing_s = now - self._failing_since
            if failing_s > self.registry.ttl_s:
                raise EngineFailed(f"its registry entry could not be written for {failing_s:.0f}s, longer than "
                                   f"registry.ttl_s ({self.registry.ttl_s:g}s): {e}",
                                   reason=f"registry unwritable for {failing_s:.0f}s ({type(e).__name__})") from e
            log.warning("heartbeat of %s/%d not written (%s); trying again at the next beat",
                        self.entry.service, self.entry.replica, e)
            return
        if self._failing_since is not None:
            log.info("heartbeat written again after %.1fs of failures", time.monotonic() - self._failing_since)
            self._failing_since = None


def _serve(job: ServerJob, watch: _Watch, beat: EntryHeartbeat, signals: _Signals) -> None:
    registry = job.registry
    entry = beat.entry
    drain_deadline = settled_at = None
    last_beat = time.monotonic()
    while not signals.stop.wait(_DRAIN_POLL_S if drain_deadline else watch.poll_s):
        watch()
        # A group looks every POLL_S, and beats the registry entry only every heartbeat_s.
        if time.monotonic() - last_beat < registry.heartbeat_s - watch.poll_s / 2 and drain_deadline is None \
                and not signals.drain.is_set():
            continue
        last_beat = time.monotonic()
        if job.orphaned():
            log.warning("no run using %s heartbeated for %.0fs: stopping", job.namespace, registry.orphan_grace_s)
            return
        if signals.drain.is_set() and drain_deadline is None:
            log.info("draining: no new sessions, up to %.0fs for in-flight requests", job.drain_grace_s)
            drain_deadline = time.monotonic() + job.drain_grace_s
            settled_at = time.monotonic() + min(_DRAIN_SETTLE_S, job.drain_grace_s)
            beat(state="draining")
        if drain_deadline is not None:
            in_flight = in_flight_requests(entry, job.bind_host)
            if (in_flight == 0 and time.monotonic() >= settled_at) or time.monotonic() >= drain_deadline:
                log.info("drained (%s requests in flight); stopping", in_flight)
                return
        beat()


def in_flight_requests(entry: Entry, bind_host: str) -> float | None:
    """Requests the engine is still working on, from its Prometheus metrics (which need the key, as
    every route but health does); None if unknown."""
    try:
        key = entry.read_api_key()
        text = httpx.get(f"http://{host_port(_connect_host(bind_host), entry.port)}/metrics", timeout=5.0,
                         headers={"Authorization": f"Bearer {key}"} if key else None).raise_for_status().text
    except (httpx.HTTPError, OSError):
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(_IN_FLIGHT_METRICS)
    ]
    return sum(values) if values else None


def free_port(host: str) -> int:
    """A port nothing is bound to, and that no other job of this user on this node picked in the
    last ``_PICK_WINDOW_S``.

    The engine binds the port later (vLLM after loading its weights: minutes), and once our probe
    socket is closed the kernel may hand the same port to the next job that asks: with 64 replicas
    starting at once on one node, two picked the same port, the second engine failed to bind and
    its job took the first one's /health answer for its own. A node-local record (a flock'ed file
    in the user's private folder, ``_private_node_dir``) keeps picks apart. Nothing another local
    user can do to that record stops a pick: a file that is not ours, a link or a lock held too
    long is logged and the port picked without the record.
    """
    record = _open_picks()
    if record is None:
        return _pick(host, {})
    with record:
        if not _lock(record):
            log.warning("the picked-ports record %s stayed locked for %.0fs: picking a port without it",
                        record.name, _PICK_LOCK_TIMEOUT_S)
            return _pick(host, {})
        record.seek(0)
        try:
            picked = {int(p): t for p, t in json.loads(record.read() or "{}").items()}
        except (ValueError, AttributeError):  # torn or foreign content: start afresh
            picked = {}
        now = time.time()
        picked = {p: t for p, t in picked.items() if now - t < _PICK_WINDOW_S}
        port = _pick(host, picked)
        picked[port] = now
        record.seek(0)
        record.truncate()
        json.dump(picked, record)
    return port  # the lock goes with the file's close


def _pick(host: str, picked: dict[int, float]) -> int:
    for _ in range(_PICK_ATTEMPTS):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in picked:
            break
    return port


def _open_picks():
    """The picked-ports record, opened without following a link and checked to be this user's own
    regular file; None (logged) when it cannot be."""
    path = _private_node_dir() / _PICKED_PORTS
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:  # ELOOP: a link planted in its place
        log.warning("cannot open the picked-ports record %s (%s): picking a port without it", path, e)
        return None
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        log.warning("the picked-ports record %s is not this user's own file: picking a port without it", path)
        return None
    return os.fdopen(fd, "r+")


def _lock(record) -> bool:
    deadline = time.monotonic() + _PICK_LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(record, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)


def _private_node_dir() -> Path:
    """A folder on this node only this user can write: ``$XDG_RUNTIME_DIR`` when it is one, else
    ``<tmp>/gymlaunch-<uid>`` (made 0700). The temp folder is shared by every local user, who may
    have made that name first (a folder or a link of theirs): then a fresh private folder of this
    process's own, picks then kept apart within this process only (logged)."""
    global _fallback_dir
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    shared = Path(tempfile.gettempdir()) / f"gymlaunch-{uid}"
    for folder in ([Path(runtime)] if runtime else []) + [shared]:
        if folder == shared:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
        try:
            st = os.lstat(folder)
        except OSError:  # an XDG_RUNTIME_DIR inherited from another node, say
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
            return folder
        if folder == shared:
            log.warning("%s is not a private folder of this user's (owner uid %d, mode %o): using one of "
                        "this process's own", folder, st.st_uid, stat.S_IMODE(st.st_mode))
    if _fallback_dir is None:
        _fallback_dir = Path(tempfile.mkdtemp(prefix=f"gymlaunch-{uid}-"))
    return _fallback_dir


def _resolve_model(job: ServerJob) -> str:
    if job.embedded_model:
        from server.models import prepare

        cache = Path(job.model_cache_dir) if job.model_cache_dir else None
        return str(prepare(job.embedded_model, cache))
    if not job.model_path:
        raise ValueError("ServerJob needs model_path or embedded_model")
    return job.model_path


def _start_ray_cluster(job: ServerJob, group: NodeGroup, watch: _Watch, signals: _Signals) -> RayNode:
    """The head's Ray node, its GCS port told the workers once it listens (they start theirs then),
    and the wait until Ray counts every node alive: only then may the engine ask Ray for their GPUs."""
    node = RayNode.plan(ray_cluster.program(job.engine.env), group.addr, current_job_id(), 0, free_port)
    watch.ray = _start_engine(job, node.launch())
    group.say(dist_port=node.gcs_port, engine_pid=watch.ray.pid)
    deadline = time.monotonic() + job.startup_timeout_s
    address = host_port(group.addr, node.gcs_port)
    alive = 0

    def within_startup(done: Callable[[], bool], what: Callable[[], str]) -> Callable[[], bool]:
        def check() -> bool:
            if done():
                return True
            if time.monotonic() > deadline:
                raise EngineFailed(f"{what()} after {job.startup_timeout_s:g}s (server.startup_timeout_s)\n"
                                   f"{multinode.log_tails(group.others() | {0: group.beat})}",
                                   reason=f"{what()} after {job.startup_timeout_s:g}s")
            return False
        return check

    def all_alive() -> bool:
        nonlocal alive
        alive = ray_cluster.alive_nodes(address)
        return alive >= job.nodes

    _wait_until(within_startup(lambda: _listens(group.addr, node.gcs_port), lambda: f"Ray's GCS not listening at "
                               f"{address}"), 0.2, watch, None, signals.stop)
    group.say(state="listening")
    _wait_until(within_startup(all_alive, lambda: f"Ray counts {alive} of {job.nodes} nodes alive"), 0.5, watch,
                None, signals.stop)
    log.info("Ray cluster at %s: %d nodes alive", address, alive)
    return node


def _start_engine(job: ServerJob, launch: EngineLaunch, rank: int = 0) -> subprocess.Popen:
    env = {**os.environ, **job.engine.env, **launch.env}
    return process.start(launch.argv, job.node_log(rank), env, header=launch.loggable())


def _entry(job: ServerJob, port: int, engine_pid: int, group: NodeGroup | None = None) -> Entry:
    now = time.time()
    return Entry(
        namespace=job.namespace,
        service=job.service,
        replica=job.replica,
        model=job.engine.served_name,
        host=_advertised_host(job, group),
        port=port,
        engine=job.engine.engine,
        engine_version=engine_version(job.engine.engine),
        job_id=current_job_id(),
        node=socket.gethostname(),
        pid=os.getpid(),
        engine_pid=engine_pid,
        state="starting",
        started_at=now,
        heartbeat_at=now,
        config_hash=job.config_hash,
        api_key_file=job.api_key_file,
        cluster=job.cluster,
    )


def _advertised_host(job: ServerJob, group: NodeGroup | None) -> str:
    """The host the entry's URL names. A group's head: the address its workers reach it at, which
    node names need not resolve to."""
    if group is not None:
        return job.advertise_host or group.addr
    return multinode.advertised_host(job.advertise_host, job.advertise_interface)


def current_job_id() -> str:
    """The scheduler's id of the job this process runs in (Slurm array tasks as A_i)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or f"pid:{os.getpid()}"


def _wait_healthy(job: ServerJob, watch: _Watch, beat: EntryHeartbeat, health_path: str, stop: threading.Event) -> None:
    deadline = time.monotonic() + job.startup_timeout_s
    health = f"http://{host_port(_connect_host(job.bind_host), beat.entry.port)}{health_path}"
    with httpx.Client(timeout=5.0) as client:
        def healthy() -> bool:
            try:
                if client.get(health).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise EngineFailed(
                    f"engine not healthy after {job.startup_timeout_s:g}s (server.startup_timeout_s); "
                    f"log {job.engine_log}:\n{process.log_tail(job.engine_log)}",
                    reason=f"not healthy after {job.startup_timeout_s:g}s",
                )
            return False

        # /health is cheap: the sooner seen, the sooner the gate runs.
        _wait_until(healthy, 0.2, watch, beat, stop)


def wait_admitted(watch: _Watch, beat: EntryHeartbeat, stop: threading.Event) -> None:
    """``healthy`` until the launcher's readiness gate admits this job (a replacement is handed out
    only after the same checks as the first replicas). The launcher bounds how long that takes.
    A replica's server job and a gateway's (server/gateway.py) wait alike; ``watch`` raises when
    the job can no longer serve, and ``watch.job`` names the namespace that must keep an owner."""
    beat(state="healthy")
    entry, registry = beat.entry, beat.registry
    _wait_until(lambda: registry.admitted(entry.namespace, entry.service, entry.replica, entry.job_id), 0.1,
                watch, beat, stop)


def _wait_until(done: Callable[[], bool], poll_s: float, watch: _Watch, beat: EntryHeartbeat | None,
                stop: threading.Event) -> None:
    """Poll ``done`` until it holds or ``stop`` is set, watching the engine; starting can take minutes
    (weights, compilation), so the entry (once there is one) keeps heartbeating, and an orphaned job
    stops itself."""
    job = watch.job
    last_beat = time.monotonic()
    while not stop.is_set():
        watch()
        if done():
            return
        if time.monotonic() - last_beat >= job.registry.heartbeat_s:
            if job.orphaned():
                log.warning("no run using %s heartbeated while starting: stopping", job.namespace)
                stop.set()
                return
            if beat is not None:
                beat()
            last_beat = time.monotonic()
        stop.wait(poll_s)


def _connect_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "") else bind_host


def _died(job: ServerJob, engine: subprocess.Popen, group: NodeGroup | None = None, what: str = "engine") -> EngineFailed:
    reason = process.exit_description(engine.returncode)
    if group is not None:  # every node's log: the cause may sit on another node
        return EngineFailed(f"{what} of {job.service}/{job.replica} on node {group.rank} {reason}\n"
                            f"{multinode.log_tails(group.others() | {group.rank: group.beat})}",
                            reason=f"node {group.rank} {what} {reason}")
    log_file = job.engine_log
    return EngineFailed(
        f"engine of {job.service}/{job.replica} {reason}; log {log_file}:\n{process.log_tail(log_file)}",
        reason=reason,
    )


def _join_group(job: ServerJob) -> NodeGroup:
    try:
        return NodeGroup.join(job.registry, job.namespace, job.service, job.replica, current_job_id(), job.nodes,
                              job.advertise_interface, lambda rank: str(job.node_log(rank)))
    except NodeProblem as e:
        job.registry.record_death(job.namespace, job.service, job.replica, current_job_id(), str(e))
        raise


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _run_worker(job: ServerJob, group: NodeGroup, model_path: str, api_key: str | None, signals: _Signals) -> None:
    """A worker node: wait for the head to listen, check it is reachable, start the engine headless
    (with a Ray cluster: a Ray node, which is this node's engine), and keep beating until the head
    goes (then stop) or the engine dies (then say so and fail, so the head fails the replica at once)."""
    engine = ray = None
    what = "Ray node" if job.multinode_backend == "ray" else "engine"
    died = False
    try:
        deadline = time.monotonic() + job.startup_timeout_s
        while (head := group.head()) is None or head.state not in ("listening", "running"):
            if head is not None and head.state == "dead" or signals.stop.wait(0.2) or job.orphaned():
                return
            if time.monotonic() > deadline:
                raise NodeProblem(f"node {group.rank}: the head did not open its distributed port in "
                                  f"{job.startup_timeout_s:g} s (server.startup_timeout_s)")
            group.keep_alive()
        group.check_reach(head, job.advertise_interface)
        if job.multinode_backend == "ray":
            ray = RayNode.plan(ray_cluster.program(job.engine.env), group.addr, current_job_id(), group.rank,
                               free_port, head=(head.addr, head.dist_port))
            launch = ray.launch()
        else:
            launch = build_launch(job.engine, model_path, job.bind_host, free_port(job.bind_host), api_key,
                                  node=group.role(head, job.multinode_backend))
        engine = _start_engine(job, launch, group.rank)
        group.say(state="running", engine_pid=engine.pid)
        while not signals.stop.wait(multinode.POLL_S):
            if engine.poll() is not None:
                raise _died(job, engine, group, what)
            gone = group.head_gone()
            if gone:
                log.info("stopping node %d: %s", group.rank, gone)
                return
            group.keep_alive()
    except (EngineFailed, NodeProblem) as e:
        reason = getattr(e, "reason", str(e))
        group.say(state="dead", reason=reason)
        died = True
        # srun ends the head at once (--kill-on-bad-exit), maybe before it reads this beat: the
        # launcher's report takes the reason from here.
        job.registry.record_death(job.namespace, job.service, job.replica, current_job_id(), reason)
        raise
    finally:
        if ray is not None and engine is not None:
            ray.stop(engine, job.stop_grace_s)
        elif engine is not None:
            process.stop(engine, job.stop_grace_s)
        # A dead worker's beat stays until the head has read it (the head then dies too, or srun ends
        # it): gone sooner, the head would fail the replica for "no beat" and record that instead.
        deadline = time.monotonic() + multinode.STALE_S
        while died and group.head_gone() is None and time.monotonic() < deadline:
            time.sleep(multinode.POLL_S / 5)
        group.leave()
