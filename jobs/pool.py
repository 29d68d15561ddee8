"""Which replica of a service a conversation talks to, and what happens when that replica fails.

The pool reads the service's entries from the registry (at most every ``refresh_s``
seconds, re-parsing only the files that changed: a collector asks once per
request, and re-reading a shared filesystem that often would be slow) and maps a
session key to one replica by a stable hash, so that every turn of a
conversation reaches the same server and its prefix cache.

When that replica is gone, draining, stale or ejected, the conversation moves to
the replica with the fewest requests in flight and stays there. ``post`` sends a
request and, when the replica turns out unreachable or answers 502/503, ejects
it (until it heartbeats again) and retries on another one.

One pool serves one event loop: it keeps no locks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass

import httpx

# NoEndpointError and the failover rules are re-exported: callers of the pool catch them from here.
from server.registry import Entry, Registry
from server.replicas import RETRY_STATUSES, UNREACHABLE_ERRORS, NoEndpointError, ReplicaView, entry_key

__all__ = ["RETRY_STATUSES", "UNREACHABLE_ERRORS", "EndpointPool", "NoEndpointError", "ReplicaStats"]

# Moved conversations remembered; beyond this the oldest moves are forgotten (a conversation that
# long-lived merely risks one prefix-cache miss), so that a job of millions of rollouts stays small.
_MAX_MOVES = 1 << 16


@dataclass
class ReplicaStats:
    requests: int = 0  # attempts sent to this replica, retries included
    failures: int = 0  # attempts that found it unreachable or answering 502/503
    retries: int = 0  # attempts that it took over from a replica that failed
    in_flight: int = 0


class EndpointPool:
    def __init__(
        self,
        service: str,
        namespace: str | None = None,
        registry: Registry | None = None,  # None: the default root and settings
        refresh_s: float = 2.0,
        *,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        wait_s: float = 60.0,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.registry = registry or Registry()
        self.refresh_s = refresh_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.wait_s = wait_s
        self._read_at = -math.inf
        self._view = ReplicaView(service, namespace, self.registry)
        self._usable: dict[int, Entry] = {}  # by replica id: ready, fresh, not ejected
        self._buckets = 0
        self._moves: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._stats: collections.defaultdict[int, ReplicaStats] = collections.defaultdict(ReplicaStats)

    # ------------------------------------------------------------ choosing

    def endpoints(self) -> list[Entry]:
        """Replicas that may take new work (ready, heartbeating, not ejected), sorted by replica id."""
        self._refresh_if_due()
        return sorted(self._usable.values(), key=lambda e: e.replica)

    def pick(self, session_key: str) -> Entry:
        """The replica for ``session_key``; ``NoEndpointError`` at once when none can take it."""
        entry = self._choose(session_key)
        if entry is None:
            raise NoEndpointError(self._view.why_empty(waited_s=0.0))
        return entry

    async def wait_pick(self, session_key: str) -> Entry:
        """``pick``, but an empty pool is given ``wait_s`` to come back (a restart, a heartbeat
        after an ejection) before ``NoEndpointError``: a short gap must not fail every task."""
        deadline = time.monotonic() + self.wait_s
        while (entry := self._choose(session_key)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoEndpointError(self._view.why_empty(waited_s=self.wait_s))
            # Polling faster than the refresh interval would only re-read the same cache.
            await asyncio.sleep(min(max(self.refresh_s, 0.05), left))
        return entry

    def stats(self) -> dict[int, ReplicaStats]:
        """Counters per replica id (copies), for every replica that was sent a request."""
        return {replica: dataclasses.replace(s) for replica, s in sorted(self._stats.items())}

    def _choose(self, session_key: str) -> Entry | None:
        self._refresh_if_due()
        if not self._usable:
            return None
        digest = hashlib.sha256(session_key.encode()).digest()  # hash() is salted per process
        moved = self._moves.get(session_key)
        if moved is None:
            home = self._usable.get(_jump_hash(int.from_bytes(digest[:8], "big"), self._buckets))
            if home is not None:
                return home
        elif moved in self._usable:
            return self._usable[moved]
        # Its replica is gone, draining, stale or ejected: the least busy one takes the
        # conversation over, and keeps it (its prefix cache is there from now on).
        fewest = min(map(self._in_flight, self._usable))
        least = sorted(r for r in self._usable if self._in_flight(r) == fewest)
        # Among equals, the key decides: sessions that move together spread instead of piling on one.
        replica = least[int.from_bytes(digest[8:16], "big") % len(least)]
        self._moves[session_key] = replica
        self._moves.move_to_end(session_key)
        if len(self._moves) > _MAX_MOVES:
            self._moves.popitem(last=False)
        return self._usable[replica]

    def _in_flight(self, replica: int) -> int:
        stats = self._stats.get(replica)  # not [replica]: stats() lists replicas that were sent requests
        return stats.in_flight if stats else 0

    # ------------------------------------------------------------ requests

    async def post(
        self,
        client: httpx.AsyncClient,
        path: str,
        json: dict,
        session_key: str,
        headers: dict | None = None,
        *,
        method: str = "POST",
        root: bool = False,
    ) -> tuple[Entry, httpx.Response]:
        """POST ``json`` to ``{base_url}{path}`` of the session's replica (``root``: to
        ``{root_url}{path}``, for routes outside ``/v1``; ``method``: GET with ``json`` None);
        returns the replica that answered and its answer. Any status other than 502/503 is the
        caller's to judge.

        A non-streaming ``client.post`` reads the whole body before it returns, so it either hands
        the caller a complete response or raises with nothing handed out. Retrying only on raised
        errors and on 502/503 (which carry no generation) therefore never repeats a request whose
        answer the caller already used.
        """
        attempt = 0
        while True:
            entry = await self.wait_pick(session_key)
            stats = self._stats[entry.replica]
            stats.requests += 1
            if attempt:
                stats.retries += 1
            stats.in_flight += 1
            try:
                response = await client.request(
                    method, f"{entry.root_url if root else entry.base_url}{path}", json=json,
                    headers=self._headers(entry, headers),
                )
            except UNREACHABLE_ERRORS:
                self._fail(entry)
                if attempt >= self.max_retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES:
                    return entry, response
                self._fail(entry)
                if attempt >= self.max_retries:
                    return entry, response
            finally:
                stats.in_flight -= 1
            attempt += 1
            await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))

    def _fail(self, entry: Entry) -> None:
        """Eject ``entry`` until its heartbeat is newer than now; its sessions move on their next pick."""
        self._stats[entry.replica].failures += 1
        self._view.eject(entry_key(entry))
        self._usable.pop(entry.replica, None)

    def _headers(self, entry: Entry, headers: dict | None) -> dict:
        """The caller's headers plus the replica's key, unless the caller sent its own."""
        key = self._view.api_key(entry)
        merged = dict(headers or {})
        if key and not any(name.lower() == "authorization" for name in merged):
            merged["Authorization"] = f"Bearer {key}"
        return merged

    # ------------------------------------------------------------ registry

    def _refresh_if_due(self) -> None:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            self._refresh()
            self._read_at = now

    def _refresh(self) -> None:
        self._view.refresh()
        # Replica ids are job-array indices: hashing over 0..max keeps a session's replica when
        # another one's entry comes or goes (a gap is a replica that is gone).
        self._buckets = max(e.replica for e in self._view.known.values()) + 1 if self._view.known else 0
        self._usable = {e.replica: e for e in self._view.usable.values()}

def _jump_hash(key: int, buckets: int) -> int:
    """Lamping and Veach's jump consistent hash: a key keeps its bucket when buckets are added or
    the last one removed, and the choice costs O(log buckets), not a pass over the replicas."""
    bucket, jump = -1, 0
    while jump < buckets:
        bucket = jump
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        jump = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket
