"""The run's API key as every process we start checks it: the gateway, and the engines (vLLM
through ``--middleware``), on every route but the health route.

The check reads one header of the ASGI scope and nothing else: it runs before a request's body
is read, parsed or stored, so a caller without the key costs the server nothing but the header.
Imports only the standard library: it is loaded inside the engine's own process.
"""

from __future__ import annotations

import json
import os
import secrets

# The one route that answers without the key: schedulers, load balancers and our own liveness
# checks poll it, and it says nothing but "up".
HEALTH_PATH = "/health"
# OpenAI's error shape, as vLLM answers its own 401.
UNAUTHORIZED_BODY = json.dumps({"error": {
    "message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
    "type": "AuthenticationError", "param": None, "code": 401}}).encode()
# Where an engine's process finds the key: the variable vLLM itself reads (its own ``--api-key``
# check, kept on behind ours), so the key never appears in an argv or a logged command line.
ENGINE_KEY_ENV = "VLLM_API_KEY"


def authorization(scope: dict) -> bytes | None:
    """The request's ``Authorization`` header value (ASGI header names are lower-case bytes)."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value
    return None


def carries_key(authorization_value: bytes | None, key: bytes) -> bool:
    """Whether the header value is ``Bearer <key>``; the scheme matches in any case (RFC 9110
    11.1: auth schemes are case-insensitive, and vLLM's own check accepts ``bearer``)."""
    if not authorization_value:
        return False
    scheme, _, token = authorization_value.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key)


# What a health probe sends; anything else on the health path needs the key like any other route.
HEALTH_METHODS = ("GET", "HEAD")


def is_health(scope: dict) -> bool:
    """Whether the request is a probe of the health route, its path as Starlette's router would
    see it (``root_path`` taken off, as in ``starlette.routing.get_route_path``). Only this exact
    path is exempt: anything else, ``/health/`` or ``/health_generate`` included, needs the key."""
    if scope.get("type") != "http" or scope.get("method") not in HEALTH_METHODS:
        return False
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    return path == HEALTH_PATH


class RequireKey:
    """Pure ASGI middleware: every HTTP request and websocket handshake but the health route
    needs ``Authorization: Bearer <key>``, else 401 with ``UNAUTHORIZED_BODY`` (a websocket: the
    same 401 as a denial response where the server offers one, else closed before it is
    accepted, which servers answer with 403). Lifespan events pass through.

    vLLM loads it with ``--middleware server.auth.RequireKey`` and builds it with no argument
    (vllm/entrypoints/serve/middleware/register.py: ``app.add_middleware(cls)``), so the key comes
    from ``$VLLM_API_KEY``; an empty one refuses to start rather than serve open. Added last, it is
    the outermost layer of vLLM's app: no other middleware or route sees a request without the key.
    vLLM's own check guards only ``/v1``, ``/v2``, ``/inference`` and ``/cohere``; this one
    guards everything else too (``/invocations``, ``/tokenize``, ``/metrics``, the dev routes)."""

    def __init__(self, app, key: str | None = None) -> None:
        self.app = app
        key = os.environ.get(ENGINE_KEY_ENV, "") if key is None else key
        if not key.strip():
            raise RuntimeError(f"server.auth.RequireKey: no key (${ENGINE_KEY_ENV} is empty); refusing to serve open")
        self.key = key.strip().encode()

    async def __call__(self, scope: dict, receive, send) -> None:
        kind = scope["type"]
        if kind == "lifespan" or is_health(scope):
            await self.app(scope, receive, send)
        elif kind in ("http", "websocket") and carries_key(authorization(scope), self.key):
            await self.app(scope, receive, send)
        else:
            await refuse(scope, send)


# RFC 9110 11.6.1: a 401 names the scheme the server takes.
_UNAUTHORIZED_HEADERS = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                         (b"content-length", b"%d" % len(UNAUTHORIZED_BODY))]


async def refuse(scope: dict, send) -> None:
    """The answer to a request without the key: 401 with ``UNAUTHORIZED_BODY``; a websocket
    handshake gets the same 401 as a denial response where the server offers one, else is closed
    before it is accepted (1008, policy violation). Any other scope type reaches nothing."""
    kind = scope["type"]
    if kind == "websocket" and "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    prefix = {"http": "http.response", "websocket": "websocket.http.response"}.get(kind)
    if prefix is not None:
        await send({"type": f"{prefix}.start", "status": 401, "headers": _UNAUTHORIZED_HEADERS})
        await send({"type": f"{prefix}.body", "body": UNAUTHORIZED_BODY})
