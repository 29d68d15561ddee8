"""The gateway's client connections: how many it holds, and how long one may keep it waiting.

uvicorn's httptools protocol (0.55) closes a connection only when it has been idle for
``timeout_keep_alive`` after a response: one that never sends a byte, or stops half-way through
its headers or its body, is held for ever, a file descriptor each, and at the process's open-file
limit the gateway can neither accept clients nor read the registry. ``BoundedHttp`` adds, per
connection (``Limits``):

- a header deadline (``header_timeout_s``): from the connection's opening, or from the first byte
  of a request after the previous answer, until its headers are complete;
- a body deadline (``body_timeout_s``): from the headers until the body is complete, whether the
  application reads it or not (a request answered before its body arrived, e.g. 401, keeps the
  connection only if the rest comes within the deadline);
- a size cap on the header block (``MAX_HEADER_BYTES``; httptools has none, and the key can be
  checked only once the headers are complete): 431, closed;
- a cap (``max_connections``): beyond it a new connection makes room by closing the one that has
  waited longest among those on which no request is being served (opened and silent, idle between
  requests, or a request not yet received in full); with none such, the newcomer is closed. A
  request received in full is never cut for a newcomer.

A deadline that expires mid-request answers 408 and closes. A connection that sent nothing is
closed silently: a client may open one ahead of its request, and would read a 408 as its answer.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Descriptors the gateway needs besides its client connections: stdio, the listening socket, the
# event loop's own, the registry files a refresh reads (one at a time), a health-check connection
# per replica. Running out of them breaks every client, not just the newest.
FD_RESERVE = 256
# A client's headers here are a few KB (a bearer key, a session id); h11 stops at 16 KB, nginx at
# 4 x 8 KB. Above the per-header caps of the application (e.g. on the session id): those answer
# their own errors.
MAX_HEADER_BYTES = 64 * 1024


def backlog(open_files: int) -> int:
    """The listen backlog: the event loop accepts every pending connection at once before the cap
    can close any, so the backlog is descriptors in use for a moment; 2048 (uvicorn's default) when
    they are plenty."""
    return max(16, min(2048, open_files // 8))


def max_connections(open_files: int) -> int:
    """Client connections that fit in ``open_files`` descriptors: each one serving a request holds a
    replica connection too, hence half of what the reserve and the backlog leave."""
    return max(1, (open_files - FD_RESERVE - backlog(open_files)) // 2)


def _answer(status: int, message: str, kind: str) -> bytes:
    """A whole response in OpenAI's error shape, as the gateway's own, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, http.HTTPStatus(status).phrase.encode(), len(body), body))


_ANSWERS = {
    "header_timeout": _answer(408, "request headers not received in time", "RequestTimeoutError"),
    "body_timeout": _answer(408, "request body not received in time", "RequestTimeoutError"),
    "header_too_large": _answer(431, f"request headers larger than {MAX_HEADER_BYTES} bytes",
                                "RequestHeaderFieldsTooLargeError"),
}


class Limits:
    """What one server's connections share: the cap, the deadlines, and the connections on which
    no request is being served, longest waiting first. ``closed(reason)`` counts each connection
    the gateway closes (``header_timeout``, ``body_timeout``, ``header_too_large``, ``evicted``,
    ``refused``)."""

    def __init__(self, max_connections: int, header_timeout_s: float, body_timeout_s: float,
                 closed: Callable[[str], None]) -> None:
        self.max_connections = max_connections
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.closed = closed
        self.unserved: collections.OrderedDict[BoundedHttp, None] = collections.OrderedDict()

    def make_room(self) -> bool:
        """Close the unserved connection that waited longest; False when there is none."""
        while self.unserved:
            victim = self.unserved.popitem(last=False)[0]
            if not victim.transport.is_closing():
                victim.close("evicted")
                return True
        return False


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with ``Limits`` (module docstring); uvicorn builds one per
    connection from ``functools.partial(BoundedHttp, limits=...)`` given as ``Config(http=)``."""

    def __init__(self, *args, limits: Limits, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._receiving = False  # a request begun and not yet received in full
        self._headers_done = False  # ... and its headers are complete
        self._header_bytes = 0  # received in reads that ended inside the headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if len(self.connections) > limits.max_connections and not limits.make_room():
            self.close("refused")
            return
        limits.unserved[self] = None
        self._deadline = self.loop.call_later(limits.header_timeout_s, self._expired, "header_timeout")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # cancels uvicorn's keep-alive timer
        if self._receiving and not self._headers_done:  # a read that ends inside the headers has no body
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._refuse("header_too_large")
                return
        # Armed once per stage, not pushed back by each byte: a client sending one byte a second
        # is as slow as one sending nothing.
        if self._deadline is None and (self._receiving or self in self.limits.unserved) \
                and not self.transport.is_closing():
            if self._headers_done and self._receiving:
                self._deadline = self.loop.call_later(self.limits.body_timeout_s, self._expired, "body_timeout")
            else:
                self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._expired, "header_timeout")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving, self._headers_done = True, False

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._headers_done, self._header_bytes = True, 0
        self._cancel_deadline()  # the body's is armed after this read, if the body is still to come

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._receiving = False
        self._cancel_deadline()
        if self.cycle is None or not self.cycle.response_complete:
            self.limits.unserved.pop(self, None)  # being served: not closed for a newcomer
        else:  # a body that outlived its answer, now idle: uvicorn re-arms its timer only after answers
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.limits.unserved[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_deadline()
        self.limits.unserved.pop(self, None)

    def close(self, reason: str) -> None:
        self._cancel_deadline()
        self.limits.unserved.pop(self, None)
        self.limits.closed(reason)
        self.transport.close()

    def _expired(self, reason: str) -> None:
        self._deadline = None
        answered = self._headers_done and self.cycle is not None and self.cycle.response_started
        if self._receiving and not answered:
            self._refuse(reason)
        else:
            self.close(reason)

    def _refuse(self, reason: str) -> None:
        self.transport.write(_ANSWERS[reason])
        self.close(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
