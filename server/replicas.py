"""A service's replicas as a client sees them, and the failover rules every client shares.

``jobs.pool.EndpointPool`` (the Python client) and ``server.gateway`` (the HTTP proxy) both
route requests over the same view: the service's registry entries (``Registry.scan``, which
re-parses only the files that changed), those that may take new work (``ready``, heartbeating
and not ejected), and which failures send a request elsewhere. A replica that failed is ejected
until its entry heartbeats after the failure (or, in the gateway, until its health route
answers again).

One view serves one event loop: it keeps no locks.
"""

from __future__ import annotations

import collections
import os
import time

import httpx

# The registry reads the files (and logs and skips those it cannot parse); the view decides when.
from server.registry import API_KEY_ENV, Entry, Registry, Scanned

# The header naming a request's conversation: a gateway keeps its turns on one replica.
SESSION_HEADER = "x-session-id"
# On every answer the gateway relays: which replica's job (``<replica>-<job id>``) gave it, for logs
# and for clients that record where each turn went (the collector's rows).
REPLICA_HEADER = "x-gymlaunch-replica"

# Answers that say "this replica cannot take requests now" (a proxy without upstream, an engine
# that is overloaded or shutting down) and carry no generation: safe to send elsewhere.
RETRY_STATUSES = frozenset({502, 503})

# Errors raised before any response arrived: nothing was handed to the caller, so the request
# can go elsewhere. Not ReadTimeout (the replica is alive but slow: a retry doubles its work and
# spends the caller's timeout twice) nor PoolTimeout (this client is saturated, not the replica).
UNREACHABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                      httpx.RemoteProtocolError)


class NoEndpointError(RuntimeError):
    """No replica of the service can take requests."""


def entry_key(entry: Entry) -> str:
    """One replica's job: a replica's successor (a time-limit rollover) is routed to on its own."""
    return f"{entry.replica}-{entry.job_id}"


class ReplicaView:
    """The entries of ``service`` in ``namespace`` (None: the one namespace found serving it, kept
    from then on), by ``entry_key``."""

    def __init__(self, service: str, namespace: str | None, registry: Registry) -> None:
        self.service = service
        self.registry = registry
        self.pinned: str | None = namespace
        self.known: dict[str, Entry] = {}  # every entry of the service, whatever its state
        self.usable: dict[str, Entry] = {}  # ready, fresh, not ejected
        self.ejected: dict[str, float] = {}  # entry key -> when it failed (wall clock, as heartbeats)
        self._files: dict[str, Scanned] = {}
        self._keys: dict[str | None, str | None] = {}  # api_key_file -> key, read once

    def refresh(self) -> None:
        self.apply(self.scan())

    def scan(self) -> dict[str, Scanned]:
        """The filesystem part of ``refresh`` (no state changes: the gateway runs it on a thread)."""
        namespaces = [self.pinned] if self.pinned else self.registry.namespaces()
        files: dict[str, Scanned] = {}
        for namespace in namespaces:
            files.update(self.registry.scan(namespace, self.service, self._files))
        return files

    def apply(self, files: dict[str, Scanned]) -> None:
        self._files = files
        entries = [p.entry for p in files.values() if p.entry is not None]
        now = time.time()
        ready = [e for e in entries if e.state == "ready" and e.is_fresh(self.registry.ttl_s, now)]
        if not self.pinned:
            serving = sorted({e.namespace for e in ready})
            if len(serving) > 1:
                # Two runs may serve different models under the same service name.
                raise NoEndpointError(
                    f"service {self.service!r} is ready in several namespaces {serving} of registry "
                    f"{self.registry.root}: pass a namespace"
                )
            # A collection must not drift to another run's servers later: keep the first one found.
            self.pinned = serving[0] if serving else None
            entries = [e for e in entries if e.namespace == self.pinned]
            ready = [e for e in ready if e.namespace == self.pinned]
        self.known = {entry_key(e): e for e in entries}
        self.usable = {}
        for e in ready:
            key = entry_key(e)
            ejected_at = self.ejected.get(key)
            if ejected_at is not None:
                if e.heartbeat_at <= ejected_at:
                    continue
                del self.ejected[key]  # it heartbeated after it failed: alive again
            self.usable[key] = e
        for key in [k for k in self.ejected if k not in self.known]:  # gone: nothing to remember
            del self.ejected[key]

    def eject(self, key: str) -> None:
        """Not usable until its heartbeat is newer than now (or ``readmit``)."""
        # Wall clock, as the replica's heartbeat_at: cluster nodes keep NTP time, and a skew only
        # shifts re-admission by that much.
        self.ejected[key] = time.time()
        self.usable.pop(key, None)

    def readmit(self, key: str) -> None:
        """An ejected replica proved alive (its health route answered): usable again if ready and fresh."""
        self.ejected.pop(key, None)
        entry = self.known.get(key)
        if entry is not None and entry.state == "ready" and entry.is_fresh(self.registry.ttl_s):
            self.usable[key] = entry

    def api_key(self, entry: Entry) -> str | None:
        """The key ``entry`` takes: its key file's (read once), else ``$GYMLAUNCH_API_KEY``."""
        if entry.api_key_file not in self._keys:
            self._keys[entry.api_key_file] = entry.read_api_key() or os.environ.get(API_KEY_ENV)
        return self._keys[entry.api_key_file]

    def why_empty(self, waited_s: float) -> str:
        """Why no replica is usable, saying what the fleet is doing: ``1 replica starting, retry``
        while replicas come up, drain or are ejected for a moment; ``start the servers`` only when
        none is registered."""
        now = time.time()
        counts = collections.Counter(
            "ejected after a failure (back at its next heartbeat)" if k in self.ejected
            else _DOING.get(e.state, e.state) if e.is_fresh(self.registry.ttl_s, now) else "stale (no heartbeat)"
            for k, e in self.known.items()
        )
        doing = ", ".join(f"{n} replica{'s' if n > 1 else ''} {state}" for state, n in sorted(counts.items()))
        if not counts:
            advice = "no replica registered: start the servers, or check the registry root and namespace " \
                     "(python -m server.registry list)"
        elif set(counts) == {"stale (no heartbeat)"}:
            advice = f"{doing}: their servers stopped heartbeating; check their jobs"
        else:
            advice = f"{doing}, retry"
        waited = f" after waiting {waited_s:g}s" if waited_s else ""
        return (f"no usable replica of service {self.service!r}{waited}: {advice} (registry {self.registry.root}, "
                f"namespace {self.pinned or 'any'}, heartbeat TTL {self.registry.ttl_s:g}s)")


# What a replica's registry state means to a caller waiting for it.
_DOING = {"starting": "starting", "healthy": "passing its readiness checks", "draining": "draining"}
