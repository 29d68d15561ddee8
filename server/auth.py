"""The run's API key as every process we start checks it: the gateway, and the engines (vLLM
through ``--middleware``), on every route but the health route.

The check reads one header of the ASGI scope and nothing else: it runs before a request's body
is read, parsed or stored, so a caller without the key costs the server nothing but the header.
Imports only the standard library: it is loaded inside the engine's own process.
"""

from __future__ import annotations

import json
import secrets

# The one route that answers without the key: schedulers, load balancers and our own liveness
# checks poll it, and it says nothing but "up".
HEALTH_PATH = "/health"
# OpenAI's error shape, as vLLM answers its own 401.
UNAUTHORIZED_BODY = json.dumps({"error": {
    "message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
    "type": "AuthenticationError", "param": None, "code": 401}}).encode()


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
