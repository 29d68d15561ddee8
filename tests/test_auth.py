"""server.auth.RequireKey, the engines' key check (loaded into vLLM with --middleware), on a tiny
Starlette app served by a real uvicorn on loopback: no vLLM needed to see what it lets through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from server.auth import ENGINE_KEY_ENV, UNAUTHORIZED_BODY, RequireKey, is_health

KEY = "sk-engine-key"
ROUTES = [("GET", "/metrics"), ("POST", "/tokenize"), ("POST", "/invocations"), ("POST", "/v1/chat/completions"),
          ("GET", "/health/"), ("GET", "/health_generate"), ("GET", "/no/such/route"), ("OPTIONS", "/tokenize"),
          ("POST", "/health")]  # POST: not a probe


class TinyEngine:
    """An app with an engine's kinds of routes that records every request it sees (bodies read)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.started = False

        async def answer(request: Request) -> JSONResponse:
            self.seen.append(f"{request.method} {request.url.path}")
            body = await request.body()
            return JSONResponse({"path": request.url.path, "bytes": len(body)})

        async def health(request: Request) -> PlainTextResponse:
            return PlainTextResponse("")

        async def talk(ws) -> None:
            self.seen.append("WS /v1/realtime")
            await ws.accept()
            await ws.send_text("hello")
            await ws.close()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.started = True  # vLLM builds its engine client here: the middleware must let it through
            yield

        paths = {path for _, path in ROUTES if path not in ("/health/", "/no/such/route")}
        self.app = Starlette(
            routes=[Route("/health", health), WebSocketRoute("/v1/realtime", talk)]
            + [Route(p, answer, methods=["GET", "POST", "OPTIONS"]) for p in paths],
            lifespan=lifespan)


@pytest.fixture
def engine():
    """(the app, its base URL): the tiny engine behind RequireKey, served by uvicorn on 127.0.0.1."""
    tiny = TinyEngine()
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(RequireKey(tiny.app, KEY), lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    yield tiny, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}],
                         ids=["none", "wrong", "no scheme", "other scheme", "longer"])
def test_every_route_but_health_needs_the_key(engine, headers):
    tiny, url = engine
    for method, path in ROUTES:
        r = httpx.request(method, url + path, headers=headers, json={"messages": []})
        assert (r.status_code, r.content) == (401, UNAUTHORIZED_BODY), (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
    assert tiny.seen == []  # nothing reached the app
    assert httpx.get(f"{url}/health", headers=headers).status_code == 200
    assert tiny.started


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_with_the_key_every_route_is_the_apps(engine, scheme):
    tiny, url = engine
    for method, path in ROUTES:
        r = httpx.request(method, url + path, headers={"Authorization": f"{scheme} {KEY}"}, content=b"12345")
        # The app's own answers: Starlette redirects /health/ to /health (307) and has no /no/such/route.
        assert r.status_code == {"/health/": 307, "/no/such/route": 404}.get(path, 200), (method, path)
    assert len(tiny.seen) == len(ROUTES) - 2


def test_a_refused_request_is_answered_before_its_body_is_read(engine):
    # 50 MB announced, none sent: the 401 comes at once, so nothing waited for (or read) the body.
    _, url = engine
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 52428800\r\n\r\n")
        answer = b""
        while not answer.endswith(UNAUTHORIZED_BODY) and (chunk := s.recv(4096)):  # head and body: two writes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(UNAUTHORIZED_BODY)


def test_a_websocket_without_the_key_is_refused_with_401(engine):
    tiny, url = engine
    ws_url = url.replace("http", "ws") + "/v1/realtime"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(ws_url, additional_headers=headers, open_timeout=5)
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body) == json.loads(UNAUTHORIZED_BODY)
    assert tiny.seen == []
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=5) as ws:
        assert ws.recv(timeout=5) == "hello"


def test_a_websocket_server_without_denial_responses_gets_a_close_before_accept():
    # Servers without ASGI's websocket.http.response extension answer a close before accept with 403.
    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("reached the app")

    asyncio.run(RequireKey(app, KEY)({"type": "websocket", "path": "/ws", "headers": []}, None, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_the_key_comes_from_vllms_variable_and_an_empty_one_refuses_to_start(monkeypatch):
    monkeypatch.setenv(ENGINE_KEY_ENV, KEY)
    assert RequireKey(None).key == KEY.encode()  # vLLM builds it with the app alone
    for empty in ("", "  "):
        monkeypatch.setenv(ENGINE_KEY_ENV, empty)
        with pytest.raises(RuntimeError, match=ENGINE_KEY_ENV):
            RequireKey(None)
    monkeypatch.delenv(ENGINE_KEY_ENV)
    with pytest.raises(RuntimeError, match="refusing to serve open"):
        RequireKey(None)


@pytest.mark.parametrize("path, root, exempt", [
    ("/health", "", True), ("/api/health", "/api", True), ("/health", "/api", True),
    ("/health/", "", False), ("/healthz", "", False), ("/health_generate", "", False), ("/api/healthx", "/api", False),
    ("/v1/health", "", False), ("//health", "", False),
])
def test_only_the_exact_health_route_is_exempt(path, root, exempt):
    assert is_health({"type": "http", "method": "GET", "path": path, "root_path": root}) is exempt


@pytest.mark.parametrize("scope", [{"type": "http", "method": "POST"}, {"type": "http", "method": "DELETE"},
                                   {"type": "websocket"}], ids=["POST", "DELETE", "websocket"])
def test_only_a_probe_of_the_health_route_is_exempt(scope):
    assert is_health({**scope, "path": "/health"}) is False


# ---------------------------------------------------------------- the stand-in engine checks it the same way

STANDIN_ROUTES = [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                  ("POST", "/detokenize"), ("GET", "/no/such/route"), ("POST", "/health")]  # POST: no probe


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["none", "wrong", "no scheme"])
def test_the_standin_needs_the_key_on_every_route_but_health(standins, headers):
    (server,) = standins(api_key=KEY)
    for method, path in STANDIN_ROUTES:
        r = httpx.request(method, server.root_url + path, headers=headers, json={"messages": []})
        assert (r.status_code, r.content) == (401, UNAUTHORIZED_BODY), (method, path)
    assert server.requests == []  # nothing recorded: no body was read
    assert httpx.get(f"{server.root_url}/health", headers=headers).status_code == 200


def test_the_standin_serves_with_the_key(standins):
    (server,) = standins(api_key=KEY)
    with httpx.Client(base_url=server.root_url, headers={"Authorization": f"bearer {KEY}"}) as client:
        assert client.get("/metrics").text.startswith("vllm:num_requests_running")
        assert client.post("/tokenize", json={"prompt": "hi"}).json()["tokens"] == [104, 105]
        assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code == 200


def test_the_standin_answers_a_refused_request_before_reading_its_body(standins):
    (server,) = standins(api_key=KEY)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n")
        answer = b""
        while chunk := s.recv(4096):  # it closes the connection: the unread body cannot be taken for a request
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and answer.endswith(UNAUTHORIZED_BODY)
