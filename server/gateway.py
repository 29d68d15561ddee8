"""One URL for a service: an OpenAI-compatible reverse proxy in front of its replicas.

    python -m server.gateway --service policy --namespace NS [--registry-root R] [--port 0]
                             [--api-key-file F] [--policy sticky_least_loaded] [--max-retries 3] ...

prints ``gateway for service 'policy' (namespace NS) serving at http://HOST:PORT/v1`` once it
listens. A run starts it as a job of its own (``GatewayJob``, ``run_job``; the ``gateway:``
config group), published in the registry as service ``<service>@gateway``: ``healthy`` while
the launcher's readiness gate checks it, ``ready`` (handed out) once the gate admitted it, as a
replica. The run then hands its URL to the job that uses the service.

Replicas are the service's registry entries (``server.replicas.ReplicaView``, re-read every
``refresh_s`` on a thread), usable while ``ready``, heartbeating and not ejected. Routes:
``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/tokenize``
and ``/detokenize`` go to a replica with their bodies unchanged (Server-Sent Events chunk by
chunk, each awaited before the next is read: a slow client slows its replica's stream, it does
not fill the gateway's memory); ``/health`` (200 while a replica is usable, else 503) and
``/metrics`` (Prometheus) are the gateway's own.

Routing (``policy``): ``sticky_least_loaded`` sends a new session (header ``X-Session-ID``, else
NeMo Gym's ``conversation_params.conversation_id``, else the body's ``user``) to the replica
with the fewest requests in flight through this gateway and keeps it there (its prefix cache)
until that replica leaves, drains or is ejected; requests without a session key go least loaded.
``least_loaded`` ignores sessions; ``round_robin`` takes replicas in turn. Every choice costs
O(1), however many replicas and sessions there are.

Failover follows the pool's rules (``server.replicas``): a connect error, a reset, a 502/503 or
a replica gone before the first byte of its answer sends the request to another replica, at
most ``max_retries`` times; never once a byte went to the client. The failed replica is ejected
until its ``/health`` answers (checked every ``health_interval_s``) or its entry heartbeats
anew. With no usable replica a request waits up to ``wait_s``, then gets 503 with
``Retry-After``.

Statuses the gateway itself answers (OpenAI's error shape): 401 (missing or wrong key), 400 (a
session key over 256 bytes; a body it must parse that does not parse; token ids that cannot be a
prompt's), 404/405 (no such route, or not with that method), 408 (headers or body not received
within ``header_timeout_s``/``body_timeout_s``: server/connections.py), 413 (a body over
``max_body_bytes``), 431 (headers over ``connections.MAX_HEADER_BYTES``), 502 (every attempt
found its replica unreachable), 503 + ``Retry-After`` (no usable replica within ``wait_s``;
without ``Retry-After``: a gateway without a key in front of replicas that take one). Every other
status is the replica's, passed through (after ``max_retries`` a replica's own 502/503 too). NeMo
Gym 0.7's client (``NeMoGymAsyncOpenAI``) tries 404, 408, 429, 500, 502, 503, 504 and 520 three
times in all, 0.5 s apart (``Retry-After`` unread), and 401 once; a model call that still fails
fails its rollout, and with it the whole ``ng_collect_rollouts`` run: so a 503 here ends a Gym
rollout after about 3 x ``wait_s`` (docs/architecture.md, the gateway's entry, has each status
and the NeMo Gym source).

Auth: the key is the one the gateway is started with (``GatewayJob.api_key_file``; by hand
``--api-key-file``, else ``$GYMLAUNCH_API_KEY``), never an entry's; read from a
file or the environment, never from argv, and never logged. Every route but ``/health`` requires
``Authorization: Bearer <key>`` (the scheme in any case), checked first (``Gateway.__call__``,
server/auth.py): before routing, before the body is read, before a replica is waited for or a
session recorded. No key while the service's entries name a key file: refused (at start, and 503
per request), never an open proxy; no key and no key file anywhere (``server.api_key: null``):
open on purpose. The replicas get the key their entries name.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
import uvicorn
import uvloop
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import Route

from server.auth import authorization, carries_key, is_health, refuse
from server.checks import Checks, ConfigError
from server import connections, onpolicy
from server.job import EngineFailed, EntryHeartbeat, current_job_id, wait_admitted
from server.multinode import advertised_host, listen_address
from server.process import open_files_limit, raise_open_files_limit
from server.registry import (API_KEY_ENV, GATEWAY_ENGINE, NAMESPACE_ENV, Entry, Registry, gateway_service,
                             hiccup_tolerated)
from server.replicas import REPLICA_HEADER, RETRY_STATUSES, SESSION_HEADER, ReplicaView

log = logging.getLogger(__name__)

POLICIES = ("sticky_least_loaded", "least_loaded", "round_robin")
# Body fields that may name a session: NeMo Gym's vllm_model server, with
# `forward_session_id_as_conversation_id: true`, puts its per-rollout session id in
# `conversation_params.conversation_id` (responses_api_models/vllm_model/app.py, chat_completions);
# OpenAI's `user` otherwise. Matched as keys (followed by a colon), not as the `"user"` of every
# `"role": "user"` message: a body that names neither is not parsed.
_SESSION_FIELDS = re.compile(rb'"(?:conversation_params|user)"\s*:')
# The replicas' routes, as clients call them on the gateway (and the gateway on a replica).
PROXIED = {
    "/v1/chat/completions": ["POST"], "/v1/completions": ["POST"], "/v1/responses": ["POST"],
    "/v1/models": ["GET"], "/tokenize": ["POST"], "/detokenize": ["POST"],
}
# The routes whose prompt gateway.on_policy splices (server/onpolicy.py), and how.
_SPLICED = {"/v1/chat/completions": onpolicy.chat, "/tokenize": onpolicy.tokenize}
# aiohttp's counterpart of server.replicas.UNREACHABLE_ERRORS: refused, reset or closed before the
# whole answer arrived (ClientPayloadError: a body cut short). No read timeout is set, so none of
# these is a slow replica.
UNREACHABLE_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
# Per connection, not per message: a proxy must not pass them on (RFC 9110 7.6.1). Content-Length
# is recomputed by the side that sends the body.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authorization", "proxy-authenticate", "host", "content-length"})
# uvicorn writes its own Date; the gateway names the replica that answered. Bytes: the replica's
# raw header names are compared, lower-cased.
_REPLICA_HEADER = REPLICA_HEADER.encode()
_NOT_PASSED_BACK = frozenset(name.encode() for name in _HOP_BY_HOP | {"date", REPLICA_HEADER})
# Sessions remembered; beyond this the least recently seen is forgotten (its next turn risks one
# prefix-cache miss), so that a gateway serving millions of conversations stays small.
_MAX_SESSIONS = 1 << 18
# Draining (run_job, SIGUSR2): served at least this long after the entry turned ``draining``, since
# clients re-read the registry every few seconds and NeMo Gym its endpoint file every 10 s
# (vllm_model's endpoint_check_interval_s); then until nothing is in flight, at most the grace.
_DRAIN_SETTLE_S = 15.0
_DRAIN_GRACE_S = 120.0
_DRAIN_POLL_S = 0.5
# A session key (``X-Session-ID``, or the body's conversation id or ``user``) longer than this is
# refused (400), not stored: every key is kept until _MAX_SESSIONS newer ones pushed it out, so
# its size bounds the table (2**18 x 256 B = 64 MiB at most). Refused rather than ignored: a key
# silently dropped would silently cost the session its replica. Clients use UUIDs (36 bytes) or
# "<task>/<repeat>" ids.
_MAX_SESSION_KEY_BYTES = 256
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class GatewaySettings:
    """How one gateway serves (the future ``gateway:`` config group)."""

    # the address to listen on; 0.0.0.0 to serve other nodes; None (a run's gateway job only): its advertised host's
    host: str | None = "127.0.0.1"
    port: int = 0  # 0: a free one (printed)
    policy: str = "sticky_least_loaded"  # one of POLICIES
    max_retries: int = 3  # other replicas tried after the first failed, per request
    wait_s: float = 30.0  # how long a request waits for a usable replica before 503
    health_interval_s: float = 5.0  # active health checks of the replicas
    refresh_s: float = 1.0  # registry re-read
    # Chat completions whose earlier turns carry their token ids get a prompt that begins with
    # exactly those ids (server/onpolicy.py); off: passed on unchanged, as every other request.
    on_policy: bool = True
    # Client connections (server/connections.py). 0: as many as the open-file limit leaves room for
    # (raised to the hard limit at start; each connection serving a request holds a replica's too).
    max_connections: int = 0
    # A client on the cluster's network sends its headers in one packet, its body at network speed:
    # a connection slower than this is holding a descriptor, not sending a request (408, closed).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # Idle between requests. Longer than clients' own pools keep a connection (aiohttp 15 s, httpx
    # 5 s): the client, not the gateway, closes it, so that no request races a closing connection.
    keep_alive_s: float = 60.0
    # A request body larger than this is refused (413) before it is read whole, once its key was
    # checked. 64 MiB: above OpenAI's own 50 MB request limit (images as base64), and ~10x a long
    # NeMo Gym training conversation (each assistant message carries its prompt's ids again: 30
    # turns of a 32k context, ~6 MB); it bounds what one keyed request costs the gateway.
    max_body_bytes: int = 64 << 20

    def validate(self, checks: Checks) -> None:
        checks.require(self.host != "", "host", "must name an address to listen on")
        checks.must(self, "port", "in [0, 65535]", lambda v: 0 <= v <= 65535)
        checks.must(self, "policy", f"one of {', '.join(POLICIES)}", lambda v: v in POLICIES)
        checks.at_least(self, "max_retries", 0)
        checks.at_least(self, "wait_s", 0)
        checks.above(self, "health_interval_s", 0)
        checks.above(self, "refresh_s", 0)
        checks.at_least(self, "max_connections", 0)
        checks.above(self, "header_timeout_s", 0)
        checks.above(self, "body_timeout_s", 0)
        checks.above(self, "keep_alive_s", 0)
        checks.at_least(self, "max_body_bytes", 1)


class Upstream:
    """One replica's job as the gateway routes to it."""

    __slots__ = ("key", "entry", "url", "auth", "in_flight", "indexed", "gauge")

    def __init__(self, key: str, entry: Entry, auth: dict[str, str], gauge) -> None:
        self.key, self.entry, self.auth, self.gauge = key, entry, auth, gauge
        self.url = entry.root_url
        self.in_flight = 0
        self.indexed = False  # in the LoadIndex: usable for new work


class LoadIndex:
    """Usable upstreams bucketed by requests in flight: the least loaded in O(1) (amortized), where
    a ``min`` over them would cost a pass over every replica per request. Among equals the one
    that waited longest at that load comes first, so equal replicas take turns."""

    def __init__(self) -> None:
        self._levels: list[dict[str, Upstream]] = [{}]
        self._low = 0  # no usable upstream has fewer in flight
        self.size = 0

    def add(self, up: Upstream) -> None:
        if not up.indexed:
            self._level(up.in_flight)[up.key] = up
            self._low = min(self._low, up.in_flight)
            up.indexed = True
            self.size += 1

    def discard(self, up: Upstream) -> None:
        if up.indexed:
            del self._levels[up.in_flight][up.key]
            up.indexed = False
            self.size -= 1

    def change(self, up: Upstream, delta: int) -> None:
        """``up.in_flight += delta``, keeping the index in order."""
        if up.indexed:
            del self._levels[up.in_flight][up.key]
            up.in_flight += delta
            self._level(up.in_flight)[up.key] = up
            self._low = min(self._low, up.in_flight)
        else:
            up.in_flight += delta

    def least(self) -> Upstream | None:
        if not self.size:
            return None
        while not self._levels[self._low]:
            self._low += 1
        return next(iter(self._levels[self._low].values()))

    def _level(self, n: int) -> dict[str, Upstream]:
        while len(self._levels) <= n:
            self._levels.append({})
        return self._levels[n]


class GatewayKeyError(RuntimeError):
    """The gateway cannot know the key its clients must send: it refuses to serve."""


def gateway_key(api_key_file: str | None) -> str | None:
    """The key the gateway's clients must send: ``api_key_file``'s, which must hold one; None (no
    file): the gateway takes no key (``server.api_key: null``). A run's gateway job knows its file
    (``GatewayJob.api_key_file``); by hand, ``--api-key-file`` or ``$GYMLAUNCH_API_KEY``."""
    if api_key_file is None:
        return None
    try:
        key = open(api_key_file).read().strip()
    except OSError as e:
        raise GatewayKeyError(f"the gateway's API key file {api_key_file} cannot be read: {e}") from None
    if not key:
        raise GatewayKeyError(f"the gateway's API key file {api_key_file} is empty")
    return key


class Gateway:
    """The proxy of ``service``'s replicas in ``namespace``; ``app`` is its ASGI application.
    ``api_key``: what its clients must send (``gateway_key``); None: no key, and then it serves
    only while no entry of its service names a key file (``keyless``)."""

    def __init__(self, service: str, namespace: str, registry: Registry | None = None,
                 settings: GatewaySettings | None = None, api_key: str | None = None) -> None:
        self.service, self.namespace = service, namespace
        self._key = api_key.encode() if api_key else None
        self.registry = registry or Registry()
        self.settings = settings or GatewaySettings()
        self.view = ReplicaView(service, namespace, self.registry)
        self.upstreams: dict[str, Upstream] = {}
        self._index = LoadIndex()
        self._ring: list[Upstream] = []  # usable upstreams, for round_robin
        self._turn = 0
        self._sessions: collections.OrderedDict[str, Upstream] = collections.OrderedDict()
        self._usable_event: asyncio.Event | None = None
        self.keyless: str | None = None  # why a gateway without a key refuses every request (``_sync``)
        self._http: aiohttp.ClientSession | None = None
        # The service's EOS id and context once fetched, or why its replicas cannot splice (they share
        # one engine config, so the first answer holds for all).
        self._model_info: onpolicy.ModelInfo | onpolicy.Unsupported | None = None
        self.url: str | None = None  # http://host:port, once serving
        self._metrics()
        self._routes = self._app()
        self.app = self  # its ASGI application: __call__, the front door

    # ------------------------------------------------------------ metrics

    def _metrics(self) -> None:
        # A registry per gateway: several gateways (tests, a sweep's services) may share a process.
        self.metrics = CollectorRegistry()
        m = self.metrics
        self._requests = Counter("gateway_requests", "Requests answered, by route and status", ["route", "status"],
                                 registry=m)
        self._latency = Histogram("gateway_request_seconds", "Time from request to the answer's last byte",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=m)
        self._in_flight = Gauge("gateway_replica_in_flight", "Requests in flight per replica job", ["replica"],
                                registry=m)
        self._retries = Counter("gateway_retries", "Attempts sent to another replica after a failure", registry=m)
        self._ejections = Counter("gateway_ejections", "Replicas ejected after a failure", ["replica"], registry=m)
        # What each replica's job was sent (as jobs.pool.ReplicaStats counts it for the collector): the
        # run's per-replica figures behind a gateway (launcher/gateways.py scrape). Kept for replicas
        # that left: a dead replica's requests are still part of the run.
        self._replica_requests = Counter("gateway_replica_requests", "Attempts sent to a replica job, retries "
                                         "included", ["replica"], registry=m)
        self._replica_retries = Counter("gateway_replica_retries", "Attempts a replica job took over from one "
                                        "that failed", ["replica"], registry=m)
        self._replica_failures = Counter("gateway_replica_failures", "Attempts that found a replica job "
                                         "unreachable or answering 502/503", ["replica"], registry=m)
        self._replica_children: dict[str, tuple] = {}  # replica key -> (requests, retries, failures)
        self._sessions_gauge = Gauge("gateway_sessions", "Sessions remembered", registry=m)
        self._session_moves = Counter("gateway_session_moves", "Sessions moved off a replica that left",
                                      registry=m)
        self._usable_gauge = Gauge("gateway_usable_replicas", "Replicas that take new work", registry=m)
        self._waiting = Gauge("gateway_waiting_requests", "Requests waiting for a usable replica", registry=m)
        self._on_policy_outcomes = Counter(
            "gateway_on_policy", "Chat completions carrying prior token ids, by outcome: spliced, mismatch "
            "(generated from the re-rendered prompt), unsupported (passed on unchanged), error", ["outcome"],
            registry=m)
        self._connections_closed = Counter(
            "gateway_connections_closed", "Client connections the gateway closed, by reason: header_timeout, "
            "body_timeout, header_too_large, evicted (room for a newcomer), refused (at max_connections, none to "
            "evict)", ["reason"],
            registry=m)
        self._waiting_now = 0  # the same, for in_flight()
        self._children: dict[tuple[str, int | str], tuple] = {}  # (route, status) -> (latency, requests)

    # ------------------------------------------------------------ replicas

    def _sync(self) -> None:
        """Bring upstreams, the load index and the round-robin ring in line with the view."""
        known = self.view.known
        for key in [k for k in self.upstreams if k not in known]:
            self._index.discard(self.upstreams.pop(key))
            self._in_flight.remove(key)
        for key, entry in known.items():
            up = self.upstreams.get(key)
            if up is None:
                api_key = self.view.api_key(entry)
                auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
                up = self.upstreams[key] = Upstream(key, entry, auth, self._in_flight.labels(key))
            up.entry = entry
            if key in self.view.usable:
                self._index.add(up)
            else:
                self._index.discard(up)
        self._ring = [self.upstreams[k] for k in sorted(self.view.usable)]
        # Fail closed: a gateway started without a key in front of replicas that take one would
        # hand every caller the replicas' key. Checked on every refresh (an entry of any state,
        # stale too): the key comes from how the gateway was started, never from an entry.
        named = self._key is None and next((e.api_key_file for e in known.values() if e.api_key_file), None)
        self.keyless = (f"this gateway was started without an API key, but the replicas of {self.service!r} "
                        f"take one ({named}): it refuses every request; start it with its key "
                        f"(--api-key-file, ${API_KEY_ENV}, GatewayJob.api_key_file)") if named else None
        self._usable_gauge.set(len(self._ring))
        if self._usable_event is not None:
            if self._ring:
                self._usable_event.set()
            else:
                self._usable_event.clear()

    def _eject(self, up: Upstream, why: str) -> None:
        if up.key in self.view.usable:
            log.warning("ejecting replica %s of %s (%s): %s", up.key, self.service, up.url, why)
            self._ejections.labels(up.key).inc()
        self.view.eject(up.key)
        self._sync()

    async def _every(self, interval_s: float, step) -> None:
        """``step()`` every ``interval_s``, for as long as the gateway serves. Nothing ends the loop
        but the gateway's end (a cancel): a loop that died would leave the gateway serving on what it
        last knew, silently (a replica added later never seen, an ejected one never back)."""
        failing = None  # the last failure logged in full; the same again costs one line
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
                failing = None
            except OSError as e:  # a hiccup of the shared filesystem (an entry, a key file): keep what we know
                log.warning("%s failed: %s", step.__name__, e)
            except Exception as e:  # anything else (an entry not shaped as expected): said, then retried
                if repr(e) != failing:
                    log.exception("%s failed; retried every %gs", step.__name__, interval_s)
                    failing = repr(e)
                else:
                    log.warning("%s failed again: %r", step.__name__, e)

    async def _refresh(self) -> None:
        self.view.apply(await asyncio.to_thread(self.view.scan))
        self._sync()

    async def _check_health(self) -> None:
        ready = [up for up in self.upstreams.values()
                 if up.entry.state == "ready" and up.entry.is_fresh(self.registry.ttl_s)]
        results = await asyncio.gather(*(self._healthy(up) for up in ready))
        for up, ok in zip(ready, results):
            if ok and up.key in self.view.ejected:
                log.warning("replica %s of %s answers its health check again", up.key, self.service)
                self.view.readmit(up.key)
                self._sync()
            elif not ok:
                self._eject(up, "its health check failed")

    async def _healthy(self, up: Upstream) -> bool:
        try:
            async with self._http.get(f"{up.url}/health", headers=up.auth,
                                      timeout=aiohttp.ClientTimeout(total=self.settings.health_interval_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def refuse_if_keyless(self) -> None:
        """At start: ``GatewayKeyError`` when the service's entries name a key file and this gateway
        has no key (it would refuse every request; better said at once than served closed)."""
        self.view.refresh()
        self._sync()
        if self.keyless is not None:
            raise GatewayKeyError(self.keyless)

    def in_flight(self) -> int:
        """Requests not yet answered in full: sent to a replica, or waiting for one (every replica
        between jobs; a draining gateway must see those through too: its shutdown would cancel them)."""
        return sum(up.in_flight for up in self.upstreams.values()) + self._waiting_now

    # ------------------------------------------------------------ routing

    def _pick(self, session: str | None) -> Upstream | None:
        policy = self.settings.policy
        if policy == "round_robin":
            if not self._ring:
                return None
            self._turn = (self._turn + 1) % len(self._ring)
            return self._ring[self._turn]
        if policy == "least_loaded" or session is None:
            return self._index.least()
        up = self._sessions.get(session)
        if up is not None:
            if up.indexed:  # usable: ready, fresh, not ejected, not draining
                self._sessions.move_to_end(session)
                return up
            self._session_moves.inc()
        up = self._index.least()
        if up is not None:
            self._sessions[session] = up
            self._sessions.move_to_end(session)
            if len(self._sessions) > _MAX_SESSIONS:
                self._sessions.popitem(last=False)
            self._sessions_gauge.set(len(self._sessions))
        return up

    async def _wait_pick(self, session: str | None) -> Upstream | None:
        """``_pick``, waiting up to ``wait_s`` for a replica to become usable; None after that."""
        up = self._pick(session)
        if up is not None:
            return up
        deadline = time.monotonic() + self.settings.wait_s
        self._waiting_now += 1
        try:
            with self._waiting.track_inprogress():
                while up is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    try:
                        await asyncio.wait_for(self._usable_event.wait(), left)
                    except asyncio.TimeoutError:
                        return None
                    up = self._pick(session)
            return up
        finally:
            self._waiting_now -= 1

    def _session(self, request: Request, body: bytes) -> str | None:
        """The request's session key: the ``X-Session-ID`` header, else NeMo Gym's conversation id
        (``conversation_params.conversation_id``), else the body's ``user``; None without one.
        ``_Refused`` (400) for a key over ``_MAX_SESSION_KEY_BYTES`` or a body that does not parse."""
        if self.settings.policy != "sticky_least_loaded":
            return None
        session = request.headers.get(SESSION_HEADER)
        if session is None and _SESSION_FIELDS.search(body):
            fields = _parsed(body)
            params = fields.get("conversation_params") if isinstance(fields, dict) else None
            keys = (params.get("conversation_id") if isinstance(params, dict) else None,
                    fields.get("user") if isinstance(fields, dict) else None)
            session = next((key for key in keys if isinstance(key, str) and key), None)
        if session is not None and len(session.encode()) > _MAX_SESSION_KEY_BYTES:
            raise _Refused(_error(400, f"the session key (header {SESSION_HEADER}, else the body's "
                                       f"conversation_params.conversation_id or user) is longer than "
                                       f"{_MAX_SESSION_KEY_BYTES} bytes", "BadRequestError"))
        return session

    # ------------------------------------------------------------ proxying

    async def __call__(self, scope, receive, send) -> None:
        """The front door: every request but the health route shows the key here first, before
        routing (an unknown route is 401 too, not 404), before its body is read, before it waits
        for a replica or records a session. A gateway that must not serve at all (``keyless``)
        answers 503 here."""
        if scope["type"] in ("http", "websocket") and not is_health(scope):
            if self._key is not None and not carries_key(authorization(scope), self._key):
                if scope["type"] == "http":
                    # Unknown paths counted as one: a caller must not grow the metrics by inventing paths.
                    self._done(scope["path"] if scope["path"] in PROXIED else "other", time.perf_counter(), 401)
                return await refuse(scope, send)
            if self.keyless is not None:
                return await _error(503, self.keyless, "ServiceUnavailableError")(scope, receive, send)
        await self._routes(scope, receive, send)

    async def _body(self, scope, receive) -> bytes:
        """The request's body, read only once its key was checked, at most ``max_body_bytes`` (413,
        from its Content-Length before a byte is read). Its deadline is the connection's
        (``body_timeout_s``, server/connections.py: 408, closed), which ends this read too."""
        limit = self.settings.max_body_bytes
        too_large = _Refused(_error(413, f"the request body is larger than the gateway takes ({limit} bytes, "
                                         "gateway.max_body_bytes)", "RequestTooLargeError"))
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(_error(400, "the client left before its body arrived", "BadRequestError"))
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _to_splice(self, route: str, body: bytes) -> dict | None:
        """The parsed request when its prompt is to begin with prior token ids (server/onpolicy.py);
        None: proxied as it came. ``_Refused`` (400) for ids that cannot be a prompt's."""
        if route not in _SPLICED or not self.settings.on_policy or not onpolicy.has_prefix(body):
            return None
        fields = _parsed(body)
        try:
            return fields if isinstance(fields, dict) and onpolicy.required_prefix(fields) is not None else None
        except onpolicy.BadIds as e:
            raise _Refused(JSONResponse(onpolicy.error(str(e), e.param), 400)) from None

    async def _proxy(self, scope, receive, send) -> None:
        """The proxied routes, as a plain ASGI endpoint: FastAPI's request handling (dependencies,
        its Request and Response objects) cost more than the proxying itself. The key was checked
        by the front door (``__call__``)."""
        route = scope["path"]  # one of PROXIED: matched routes only come here
        started = time.perf_counter()
        request = Request(scope, receive)
        said: list[tuple[bytes, bytes]] = []  # what the gateway adds to the replica's headers
        try:
            body = await self._body(scope, receive)
            session = self._session(request, body)
            fields = self._to_splice(route, body)
        except _Refused as refused:
            return await self._refuse(scope, receive, send, route, started, refused.response)
        if fields is not None:
            with _UntilClientLeaves(receive) as client:
                unsupported = await self._on_policy(scope, receive, send, request, fields, session, started)
            if client.cut_short:
                return self._done(route, started, "aborted")
            if unsupported is None:
                return
            # Said, counted and passed on as it came: the replica's own route answers.
            said.append((onpolicy.HEADER.encode(), f"unsupported: {unsupported}".encode()))
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        query = scope["query_string"]
        target = f"{route}?{query.decode('latin-1')}" if query else route
        try:
            with _UntilClientLeaves(receive) as client:
                answer = await self._send(scope["method"], target, body, headers, session, stream=True)
        except _Refused as refused:
            return await self._refuse(scope, receive, send, route, started, refused.response)
        if client.cut_short:  # its replica's request closed: the engine aborts it
            return self._done(route, started, "aborted")
        answer.headers += said
        if answer.first is None:
            self._done(route, started, answer.status)
            await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers})
            await send({"type": "http.response.body", "body": answer.data})
            return
        # Outside the retries: once the stream's first bytes go out, a failure aborts it, never retries.
        await _Relay(answer.upstream, answer.first, answer.headers,
                     self._streamed(answer.up, route, started, answer.status))(receive, send)

    async def _send(self, method: str, target: str, body: bytes, headers: dict[str, str],
                    session: str | None, stream: bool = False) -> _Answer:
        """``body`` to a replica, with the failover rules (module docstring); ``_Refused`` carries the
        gateway's own answer (502, 503). With ``stream`` an event stream comes back as its
        first chunk and the open upstream response, the replica still counted in flight."""
        attempt = 0
        while True:
            up = await self._wait_pick(session)
            if up is None:
                raise _Refused(_error(
                    503, self.view.why_empty(self.settings.wait_s), "ServiceUnavailableError",
                    {"Retry-After": str(math.ceil(self.settings.health_interval_s))}))
            requests, retries, failures = self._replica_counters(up.key)
            requests.inc()
            if attempt:
                self._retries.inc()
                retries.inc()
            self._index.change(up, +1)
            up.gauge.inc()
            streaming = False
            try:
                upstream = await self._http.request(method, up.url + target, data=body,
                                                    headers={**headers, **up.auth} if up.auth else headers)
                try:
                    status = upstream.status
                    if status in RETRY_STATUSES:
                        failures.inc()
                    if status in RETRY_STATUSES and attempt < self.settings.max_retries:
                        self._eject(up, f"answered {status}")
                        attempt += 1
                        continue
                    out_headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _NOT_PASSED_BACK]
                    out_headers.append((_REPLICA_HEADER, up.key.encode()))
                    if stream and upstream.content_type == "text/event-stream":
                        # The first chunk decides: a replica gone before it is retried elsewhere.
                        first = await upstream.content.readany()
                        streaming = True
                        return _Answer(status, out_headers, b"", up, upstream, first)
                    data = await upstream.read()
                finally:
                    if not streaming:
                        upstream.release()
            except UNREACHABLE_ERRORS as e:
                failures.inc()
                self._eject(up, f"{type(e).__name__}: {e}")
                if attempt >= self.settings.max_retries:
                    raise _Refused(_error(
                        502, f"replica {up.key} of {self.service!r} unreachable after {attempt + 1} attempts: "
                             f"{type(e).__name__}", "BadGatewayError")) from None
                attempt += 1
                continue
            finally:
                if not streaming:
                    self._release(up)
            if not (status < 200 or status in (204, 304)):  # as Starlette's Response: a length where a body may be
                out_headers.append((b"content-length", b"%d" % len(data)))
            return _Answer(status, out_headers, data, up)

    async def _on_policy(self, scope, receive, send, request: Request, fields: dict, session: str | None,
                         started: float) -> onpolicy.Unsupported | None:
        """A chat completion (or ``/tokenize``) continuing a conversation whose earlier turns carry
        their token ids: its prompt begins with exactly those ids (``server.onpolicy``). Each step
        (render, generate, derender) goes through ``_send``, so a replica that fails mid-way costs a
        retry, not the request; they are stateless, so steps may land on different replicas.
        Returns why not (answering nothing) when the replicas cannot splice: the caller proxies."""
        route = scope["path"]
        # The client's key was checked at the front door (__call__); the replicas get theirs from the upstream's auth.
        headers = {"content-type": "application/json"}
        if "x-request-id" in request.headers:
            headers["x-request-id"] = request.headers["x-request-id"]
        replica = []

        async def call(method: str, path: str, payload) -> tuple[int, object]:
            answer = await self._send(method, path, b"" if payload is None else json.dumps(payload).encode(),
                                      headers, session)
            replica[:] = [answer.up.key]
            try:
                return answer.status, json.loads(answer.data)
            except ValueError:
                return answer.status, {"error": {"message": answer.data[:300].decode(errors="replace"),
                                                 "type": "BadGatewayError", "param": None, "code": answer.status}}

        try:
            if self._model_info is None:
                try:
                    self._model_info = await onpolicy.model_info(call)
                except onpolicy.Unsupported as e:
                    log.warning("%s: on-policy splicing unsupported, requests pass unchanged: %s", self.service, e)
                    self._model_info = e
            if isinstance(self._model_info, onpolicy.Unsupported):
                raise self._model_info
            status, data = await _SPLICED[route](call, fields, self._model_info)
            if status >= 400:
                outcome = "error"
            elif data[onpolicy.RESPONSE_FIELD]["spliced"]:
                outcome = "spliced"
            else:
                outcome = "mismatch"
                log.warning("on-policy splice not possible, generated from the re-rendered prompt: %s",
                            data[onpolicy.RESPONSE_FIELD]["reason"])
        except _Refused as refused:
            return await self._refuse(scope, receive, send, route, started, refused.response)
        except onpolicy.Unsupported as e:
            self._on_policy_outcomes.labels("unsupported").inc()
            return e
        except onpolicy.BadIds as e:  # ids beyond the vocabulary, known once the model's info is
            status, data, outcome = 400, onpolicy.error(str(e), e.param), "error"
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # a body or an answer not shaped as expected
            status, data, outcome = 400, onpolicy.error(f"on-policy splicing failed: {type(e).__name__}: {e}",
                                                        onpolicy.PREFIX_FIELD), "error"
        self._on_policy_outcomes.labels(outcome).inc()
        headers = {onpolicy.HEADER: outcome}
        if replica:
            headers[REPLICA_HEADER] = replica[0]
        self._done(route, started, status)
        await JSONResponse(data, status, headers)(scope, receive, send)

    async def _refuse(self, scope, receive, send, route: str, started: float, response: Response) -> None:
        """Answer with the gateway's own ``response`` (an error) instead of a replica's."""
        self._done(route, started, response.status_code)
        await response(scope, receive, send)

    def _streamed(self, up: Upstream, route: str, started: float, status: int):
        """What ends a relayed stream's request, once, whether it finished or not."""

        def end(finished: bool) -> None:
            self._release(up)
            self._done(route, started, status if finished else "aborted")

        return end

    def _replica_counters(self, key: str) -> tuple:
        # labels() costs more than the increment: each replica's children, once.
        children = self._replica_children.get(key)
        if children is None:
            children = self._replica_children[key] = tuple(
                c.labels(key) for c in (self._replica_requests, self._replica_retries, self._replica_failures))
        return children

    def _release(self, up: Upstream) -> None:
        self._index.change(up, -1)
        up.gauge.dec()

    def _done(self, route: str, started: float, status: int | str) -> None:
        # prometheus_client's labels() costs more than the observation: its children, once per pair.
        children = self._children.get((route, status))
        if children is None:
            children = self._children[route, status] = (self._latency.labels(route),
                                                         self._requests.labels(route, str(status)))
        children[0].observe(time.perf_counter() - started)
        children[1].inc()

    # ------------------------------------------------------------ the application

    def _app(self) -> FastAPI:
        app = FastAPI(title=f"gymlaunch gateway ({self.service})", docs_url=None, redoc_url=None, openapi_url=None)
        for path, methods in PROXIED.items():
            app.router.routes.append(Route(path, _Endpoint(self._proxy), methods=methods))

        @app.get("/health")
        async def health() -> Response:
            usable = len(self._ring)
            return JSONResponse({"usable_replicas": usable, "known_replicas": len(self.upstreams)},
                                200 if usable else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(generate_latest(self.metrics), media_type=CONTENT_TYPE_LATEST)

        @app.exception_handler(HTTPException)
        async def own_error(request: Request, e: HTTPException) -> Response:
            # No such route (404), or not with that method (405): in OpenAI's shape, as the replicas'.
            kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(e.status_code, "BadRequestError")
            message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
            return _error(e.status_code, message, kind, e.headers)

        return app

    def _connection_limits(self, open_files: int) -> connections.Limits:
        fit = connections.max_connections(open_files)
        cap = self.settings.max_connections or fit
        if cap > fit:
            log.warning("max_connections=%d: only %d fit in %d open files; raise the hard limit (ulimit -Hn)",
                        cap, fit, open_files)
        else:
            log.info("serving at most %d client connections (open-file limit %d)", cap, open_files)
        closed = self._connections_closed
        return connections.Limits(cap, self.settings.header_timeout_s, self.settings.body_timeout_s,
                                  lambda reason: closed.labels(reason).inc())

    async def serve(self, sock: socket.socket, on_started: Callable[[uvicorn.Server], None] | None = None) -> None:
        """Serve on the bound ``sock`` until the uvicorn server exits (SIGINT/SIGTERM when in the
        main thread, or its ``should_exit``); ``on_started`` gets that server once requests are taken."""
        self._usable_event = asyncio.Event()
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            # No read timeout: generations take minutes; a dead replica shows as a reset.
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=None),
            auto_decompress=False,  # bodies pass unchanged
            skip_auto_headers=("Accept-Encoding",),  # the client's own, if any, goes on
        )
        tasks = []
        try:
            self.view.refresh()
            self._sync()
            tasks = [asyncio.create_task(self._every(self.settings.refresh_s, self._refresh)),
                     asyncio.create_task(self._every(self.settings.health_interval_s, self._check_health))]
            # proxy_headers off: nothing here reads the client's address or scheme, and uvicorn's
            # X-Forwarded-* middleware is one more layer per request. A short graceful shutdown: a
            # gateway stops when its run tears down (its replicas stop too, nothing in flight can
            # finish) or after draining (run_job: nothing in flight by then). No WebSockets: none
            # of the routes is one. uvicorn's limit_concurrency is not the cap: it counts idle
            # connections too and answers 503 to a valid request while they hold their descriptors.
            open_files = open_files_limit()
            limits = self._connection_limits(open_files)
            config = uvicorn.Config(self.app, http=functools.partial(connections.BoundedHttp, limits=limits), ws="none",
                                    access_log=False, log_level="warning", server_header=False, lifespan="off",
                                    timeout_keep_alive=self.settings.keep_alive_s,
                                    backlog=connections.backlog(open_files), timeout_graceful_shutdown=1,
                                    proxy_headers=False)
            server = uvicorn.Server(config)
            if threading.current_thread() is threading.main_thread():
                # The process is the gateway's own (its CLI; GatewayThread shares a test's): what
                # exists by now lives as long as it does, so the collector stops re-scanning it.
                # With hundreds of requests in flight, full collections over the modules' objects
                # cost ~15% of the gateway's CPU (benchmarks/bench_gateway.py, concurrency 256).
                gc.collect()
                gc.freeze()
            host, port = sock.getsockname()[:2]
            self.url = f"http://{host}:{port}"
            serving = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not serving.done():
                await asyncio.sleep(0.01)
            if server.started and on_started is not None:
                on_started(server)
            await serving
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._http.close()


class _Endpoint:
    """``handle(scope, receive, send)`` as a Starlette route's application: Starlette wraps a plain
    function or method as ``request -> response`` instead, and treats a class instance as ASGI."""

    __slots__ = ("handle",)

    def __init__(self, handle: Callable) -> None:
        self.handle = handle

    def __call__(self, scope, receive, send):
        return self.handle(scope, receive, send)


class _Refused(Exception):
    """The gateway answers itself (``response``), instead of a replica."""

    def __init__(self, response: Response) -> None:
        self.response = response


@dataclass(slots=True)
class _Answer:
    """A replica's answer: whole (``data``), or an event stream's ``first`` chunk with the open
    ``upstream`` response (the replica ``up`` still counted in flight until the relay ends)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    data: bytes
    up: Upstream
    upstream: aiohttp.ClientResponse | None = None
    first: bytes | None = None


class _Relay:
    """A replica's Server-Sent Events passed on chunk by chunk, each sent (awaited) before the next
    is read. A failure mid-stream aborts the client's response (its connection closes without the
    final chunk): bytes already went out, so no retry. A client that leaves stops the relay at
    once, even while the replica holds its next chunk, and closes the replica's connection, so
    that the engine stops generating. ``on_end(finished)`` runs once, however the response ends."""

    def __init__(self, upstream: aiohttp.ClientResponse, first: bytes, headers: list[tuple[bytes, bytes]],
                 on_end: Callable[[bool], None]) -> None:
        self.upstream, self.first, self.headers, self.on_end = upstream, first, headers, on_end

    async def __call__(self, receive, send) -> None:
        finished = False
        try:
            with _UntilClientLeaves(receive):
                await send({"type": "http.response.start", "status": self.upstream.status, "headers": self.headers})
                if self.first:
                    await send({"type": "http.response.body", "body": self.first, "more_body": True})
                async for chunk in self.upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
        finally:
            if finished:
                self.upstream.release()
            else:  # the client left, or the replica failed: close, so that the engine stops generating
                self.upstream.close()
            self.on_end(finished)


class _UntilClientLeaves:
    """``with _UntilClientLeaves(receive):`` runs its block until the client leaves, then cancels it
    where it waits (for a replica, its answer, its next chunk) and goes on after the block;
    ``cut_short`` says so. Only once the request's body was read: receive() then answers
    http.disconnect when the client left (or the response is complete). A task of its own, as
    Starlette's StreamingResponse does, without its anyio task group per response."""

    __slots__ = ("_receive", "_watcher", "_left", "cut_short")

    def __init__(self, receive) -> None:
        self._receive = receive
        self._left = self.cut_short = False

    def __enter__(self) -> _UntilClientLeaves:
        self._watcher = asyncio.get_running_loop().create_task(self._watch(asyncio.current_task()))
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        self._watcher.cancel()
        if self._left and kind is asyncio.CancelledError:
            asyncio.current_task().uncancel()  # our own watcher's doing: the work ends here
            self.cut_short = True
        return self.cut_short

    async def _watch(self, work: asyncio.Task) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._left = True
        work.cancel()


class GatewayThread:
    """A gateway on a thread of its own (its own uvloop), for tests and benchmarks:

        with GatewayThread(Gateway("policy", "run1", Registry(root))) as gw:
            httpx.get(f"{gw.url}/v1/models")
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._sock = listen(gateway.settings.host, gateway.settings.port)
        self._started = threading.Event()
        self._server: uvicorn.Server | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"gateway-{gateway.service}", daemon=True)

    @property
    def url(self) -> str:
        return self.gateway.url

    def _run(self) -> None:
        try:
            uvloop.run(self.gateway.serve(self._sock, self._on_started))
        except BaseException as e:  # reported by start()
            self._error = e
        finally:
            self._started.set()

    def _on_started(self, server: uvicorn.Server) -> None:
        self._server = server
        self._started.set()

    def start(self) -> GatewayThread:
        self._thread.start()
        self._started.wait()
        if self._server is None:
            raise RuntimeError(f"the gateway did not start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port, known before the server runs)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _parsed(body: bytes) -> object:
    """The request body as JSON; ``_Refused`` (400) when it does not parse: not JSON, or nested
    deeper than the parser recurses (RecursionError, an exception like any other here)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise _Refused(_error(400, f"the request body is not JSON the gateway can parse: {str(e)[:200]}",
                              "BadRequestError")) from None


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, as the replicas answer theirs."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status,
                        headers)


# ---------------------------------------------------------------- as a job of a run


@dataclass(kw_only=True)
class GatewayJob:
    """Everything the gateway job of a run needs; picklable, so it travels through submitit."""

    namespace: str
    service: str
    model: str  # the served name, in the gateway's entry as in the replicas'
    registry: Registry  # where the replicas are, where to publish, the namespace's heartbeat and orphan rules
    settings: GatewaySettings
    advertise_host: str | None = None  # host written into the entry's URL; None: as advertise_interface says
    advertise_interface: str | None = None  # None (and no advertise_host): this node's hostname
    api_key_file: str | None = None  # the namespace's key: what clients must send (``gateway_key``)
    cluster: str = ""  # the cluster kind submitting the job (local | slurm), recorded in the entry

    def orphaned(self) -> bool:
        return self.registry.orphaned(self.namespace)


class _NothingToWatch:
    """``server.job.wait_admitted``'s watch for a gateway job: nothing of its own can die while it
    waits (uvicorn serves in this process, and its end ends the wait); ``job`` names the namespace
    that must keep an owner."""

    def __init__(self, job: GatewayJob) -> None:
        self.job = job

    def __call__(self) -> None:
        pass


def run_job(job: GatewayJob) -> None:
    """Serve until SIGTERM/SIGINT, or until no run owns the namespace any more (as a server job,
    after ``registry.orphan_grace_s``). The entry (service ``<service>@gateway``) turns ``healthy``
    once requests are taken, and ``ready`` (clients are handed its URL) once the launcher's readiness
    gate admitted it, as a replica's (``server.job.wait_admitted``); it heartbeats meanwhile and is
    removed at the end. SIGUSR2 (Slurm's warning before the time limit, or the launcher once this
    gateway's successor is ready) drains: the entry turns ``draining`` so that clients reading the
    registry move to the successor, the gateway keeps serving for ``_DRAIN_SETTLE_S`` (clients
    following an endpoint file re-read it that often) and until nothing is in flight, at most
    ``_DRAIN_GRACE_S``, then ends. ``GatewayKeyError`` before anything is published when the job's
    key file is unreadable or empty, or names none while the replicas' entries do."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_files_limit()
    stop, drain = threading.Event(), threading.Event()
    # The wait for admission ends on a drain too (a gateway told to drain first is never ready), or at the end.
    unadmitted = threading.Event()

    def on_drain(signum: int, frame: object) -> None:
        drain.set()
        unadmitted.set()

    signal.signal(signal.SIGUSR2, on_drain)
    registry = job.registry
    gateway = Gateway(job.service, job.namespace, registry, job.settings, gateway_key(job.api_key_file))
    gateway.refuse_if_keyless()
    host = advertised_host(job.advertise_host, job.advertise_interface)
    sock = listen(job.settings.host or listen_address(host), job.settings.port)
    now = time.time()
    entry = Entry(
        namespace=job.namespace, service=gateway_service(job.service), replica=0, model=job.model,
        host=host, port=sock.getsockname()[1],
        engine=GATEWAY_ENGINE,
        engine_version=f"uvicorn {uvicorn.__version__}", job_id=current_job_id(), node=socket.gethostname(),
        pid=os.getpid(), state="starting", started_at=now, heartbeat_at=now, api_key_file=job.api_key_file,
        cluster=job.cluster,
    )
    registry.publish(entry)

    # Through hiccups of the shared filesystem, as a replica's: a beat that fails is written at the
    # next one; unwritable for longer than registry.ttl_s, no client can find the gateway: it stops.
    beat = EntryHeartbeat(registry, entry)

    def heartbeat(server: uvicorn.Server) -> None:
        log.info("gateway of %s serving at %s; handed out once the launcher admits it", job.service, entry.base_url)
        try:
            wait_admitted(_NothingToWatch(job), beat, unadmitted)
            if unadmitted.is_set() and not drain.is_set():  # the end, or no run owns the namespace any more
                server.should_exit = True
                return
            if not drain.is_set():
                beat(state="ready")
                log.info("gateway of %s ready at %s", job.service, entry.base_url)
            settled_at = deadline = None
            while not stop.wait(_DRAIN_POLL_S if deadline else registry.heartbeat_s):
                if job.orphaned():
                    log.warning("no run using %s heartbeated for %.0fs: stopping", job.namespace,
                                registry.orphan_grace_s)
                    server.should_exit = True
                    return
                if drain.is_set() and deadline is None:
                    log.info("draining: no new clients, up to %.0fs for requests in flight", _DRAIN_GRACE_S)
                    settled_at, deadline = time.monotonic() + _DRAIN_SETTLE_S, time.monotonic() + _DRAIN_GRACE_S
                    entry.state = "draining"
                if deadline is not None and ((time.monotonic() >= settled_at and gateway.in_flight() == 0)
                                             or time.monotonic() >= deadline):
                    log.info("drained (%d requests in flight); stopping", gateway.in_flight())
                    server.should_exit = True
                    return
                beat()
        except EngineFailed as e:
            log.error("stopping: %s", e)
            server.should_exit = True

    def started(server: uvicorn.Server) -> None:
        threading.Thread(target=heartbeat, args=(server,), name="gateway-heartbeat", daemon=True).start()

    try:
        serve_until_stopped(gateway, sock, started)
    finally:
        stop.set()
        unadmitted.set()
        with hiccup_tolerated(f"removing the gateway's entry (job {entry.job_id})"):  # it goes stale anyway
            registry.remove(entry.namespace, entry.service, entry.replica, entry.job_id)


def serve_until_stopped(gateway: Gateway, sock: socket.socket, on_started: Callable[[uvicorn.Server], None]) -> None:
    """Serve in this (the main) thread until SIGTERM/SIGINT; a stop on request, not an error."""
    serving = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # Before uvicorn takes SIGTERM/SIGINT: stop at once. While it serves its own handler stops
        # it; once it stopped it raises the signal again under this handler: ignored, so that the
        # gateway closes its connections and returns.
        if not serving.is_set():
            raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def started(server: uvicorn.Server) -> None:
        serving.set()
        on_started(server)

    uvloop.run(gateway.serve(sock, started))


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", required=True)
    parser.add_argument("--namespace", default=os.environ.get(NAMESPACE_ENV), help=f"default: ${NAMESPACE_ENV}")
    parser.add_argument("--registry-root", default=None, help="default: $GYMLAUNCH_REGISTRY_ROOT or ~/.gymlaunch/registry")
    parser.add_argument("--ttl-s", type=float, default=Registry.ttl_s, help="heartbeat age after which an entry is stale")
    parser.add_argument("--api-key-file", default=None,
                        help=f"the key clients must send (default: ${API_KEY_ENV}; neither: no key, refused while "
                             "the replicas take one)")
    for field in dataclasses.fields(GatewaySettings):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):  # type=bool would read "false" as True
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    if not args.namespace:
        parser.error(f"--namespace is required (or set ${NAMESPACE_ENV})")
    settings = GatewaySettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GatewaySettings)})
    checks = Checks()
    settings.validate(checks)
    try:
        checks.raise_if_any()
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_open_files_limit()
    try:
        key = gateway_key(args.api_key_file) if args.api_key_file else os.environ.get(API_KEY_ENV) or None
        gateway = Gateway(args.service, args.namespace, Registry(args.registry_root, ttl_s=args.ttl_s), settings, key)
        gateway.refuse_if_keyless()
    except GatewayKeyError as e:
        print(e, file=sys.stderr)
        return 2
    sock = listen(settings.host, settings.port)

    def announce(server: uvicorn.Server) -> None:
        print(f"gateway for service {args.service!r} (namespace {args.namespace}) serving at {gateway.url}/v1",
              flush=True)

    serve_until_stopped(gateway, sock, announce)  # a stop on request exits 0, as the stand-in's
    return 0


if __name__ == "__main__":
    sys.exit(main())
