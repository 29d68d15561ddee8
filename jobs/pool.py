"""Which replica of a service a conversation talks to.

The pool reads ready entries from the registry (at most every ``refresh_s``
seconds: a collector picks an endpoint per conversation, and re-listing a
shared filesystem that often would be slow) and maps a session key to one
replica by a stable hash, so that every turn of a conversation reaches the same
server and its prefix cache.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

from server.registry import DEFAULT_TTL_S, Entry, Registry


class NoEndpointError(RuntimeError):
    """No ready replica of the service is registered."""


class EndpointPool:
    def __init__(
        self,
        service: str,
        namespace: str | None = None,
        root: str | Path | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        refresh_s: float = 2.0,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.registry = Registry(root, ttl_s=ttl_s)
        self.refresh_s = refresh_s
        self._entries: list[Entry] = []
        self._read_at = -math.inf

    def endpoints(self) -> list[Entry]:
        """Ready replicas, sorted by replica id."""
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            entries = self.registry.ready(self.service, self.namespace)
            namespaces = sorted({e.namespace for e in entries})
            if len(namespaces) > 1:
                # Two runs may serve different models under the same service name.
                raise NoEndpointError(
                    f"service {self.service!r} is ready in several namespaces {namespaces} of registry "
                    f"{self.registry.root}: pass a namespace"
                )
            self._entries = sorted(entries, key=lambda e: e.replica)
            self._read_at = now
        return list(self._entries)

    def pick(self, session_key: str) -> Entry:
        """The replica for ``session_key``: the same one as long as the set of ready replicas holds."""
        entries = self.endpoints()
        if not entries:
            raise NoEndpointError(
                f"no ready replica of service {self.service!r} in registry {self.registry.root} "
                f"(namespace {self.namespace or 'any'}, heartbeat TTL {self.registry.ttl_s:g}s): start the "
                f"servers, or check the registry root and namespace (python -m server.registry list)"
            )
        # Python's hash() is salted per process; sha256 keeps the choice stable across jobs.
        digest = hashlib.sha256(session_key.encode()).digest()
        return entries[int.from_bytes(digest[:8], "big") % len(entries)]
