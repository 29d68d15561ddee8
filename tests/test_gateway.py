"""The gateway (server/gateway.py) over real HTTP: stand-in servers (server/standin.py, no model)
on 127.0.0.1, published in a registry under tmp_path, in threads or, to be SIGKILLed, in processes
of their own; the gateway on a thread of its own (its own event loop), or as its CLI process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from server import standin
from server.checks import Checks
from server.gateway import (PROXIED, Gateway, GatewayKeyError, GatewaySettings, GatewayThread, LoadIndex, Upstream,
                            gateway_key)
from server.registry import Registry, gateway_service, urls
from server.standin import StandIn
from tests.support import MODEL, NAMESPACE as NS, ROOT, SERVICE, entry, publish

CHAT = "/v1/chat/completions"


def chat(text: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 64, **extra}


def until(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout_s}s")
        time.sleep(0.005)


def header(exchange: standin.Exchange, name: str) -> str | None:
    """A request header as the replica got it (names are case-insensitive; the gateway sends them lower-case)."""
    return next((v for k, v in exchange.headers.items() if k.lower() == name.lower()), None)


def sessions_seen(server: StandIn) -> set[str]:
    return {header(x, "X-Session-ID") for x in server.requests if x.path == CHAT}


@pytest.fixture
def gateway(tmp_path):
    """``start(**settings)``: a gateway of SERVICE in NS over tmp_path's registry, on a thread."""
    started: list[GatewayThread] = []

    def start(api_key: str | None = None, **settings) -> GatewayThread:
        settings = {"refresh_s": 0.05, "health_interval_s": 0.2, "wait_s": 2.0, **settings}
        gw = GatewayThread(Gateway(SERVICE, NS, Registry(tmp_path), GatewaySettings(**settings), api_key)).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def served(tmp_path, standins, gateway):
    """``start(count, faults=None, **settings)``: that many stand-ins (each with ``Faults(**faults)``)
    published as SERVICE's replicas 0, 1, ..., and a gateway over them."""

    def start(count: int, faults: dict | None = None, **settings) -> tuple[list[StandIn], GatewayThread]:
        servers = standins(count, **(faults or {}))
        publish(tmp_path, servers)
        return servers, gateway(**settings)

    return start


def http(gw: GatewayThread, **kw) -> httpx.Client:
    return httpx.Client(base_url=gw.url, timeout=30, trust_env=False, **kw)


# ---------------------------------------------------------------- routes


def test_routes_pass_through_unchanged(served):
    (server,), gw = served(1)
    with http(gw) as c:
        sent = chat("hi", user="u1", temperature=0.5)
        r = c.post(CHAT, json=sent, headers={"X-Trace": "t1"})
        assert r.status_code == 200
        (exchange,) = server.requests
        assert exchange.body == sent and header(exchange, "X-Trace") == "t1"
        assert r.json() == exchange.answer  # the replica's answer, byte for byte as JSON

        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
        direct = httpx.post(f"{server.root_url}/tokenize", json={"prompt": "héllo"}, trust_env=False).json()
        assert c.post("/tokenize", json={"prompt": "héllo"}).json() == direct  # at the root, as NeMo Gym calls it
        assert c.post("/detokenize", json={"tokens": direct["tokens"]}).json() == {"prompt": "héllo"}

        # The replica's own errors pass through (the stand-in has no /v1/completions).
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["message"] == "no route POST /v1/completions"
        r = c.post(CHAT, json=chat("x", model="other"))
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert c.post("/v1/embeddings", json={}).status_code == 404  # not a route of the gateway
        assert [x.path for x in server.requests][-2:] == ["/v1/completions", CHAT]


def test_ids_to_splice_on_an_engine_without_the_routes_pass_on_unchanged_and_say_so(served):
    # The stand-in has no render/generate/derender (server/onpolicy.py needs vLLM's): found out once,
    # then every such request goes as it came, with the header saying why, and is counted.
    (server,), gw = served(1)
    with http(gw) as c:
        for turn in range(2):
            sent = chat(f"turn {turn}", required_prefix_token_ids=[1, 2, 3])
            r = c.post(CHAT, json=sent)
            assert r.status_code == 200 and r.json() == server.requests[-1].answer
            assert server.requests[-1].body == sent
            assert r.headers["x-gymlaunch-on-policy"].startswith("unsupported: the server has no /tokenizer_info")
        metrics = c.get("/metrics").text
    assert 'gateway_on_policy_total{outcome="unsupported"} 2.0' in metrics


def test_the_key_is_required_and_sent_to_the_replicas(tmp_path, standins, gateway):
    registry = Registry(tmp_path)
    key_file = registry.create_api_key(NS)
    key = key_file.read_text()
    (server,) = standins(1, api_key=key)
    registry.publish(entry(0, server.port, api_key_file=str(key_file)))
    gw = gateway(api_key=key)
    with http(gw) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = c.post(CHAT, json=chat("hi"), headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert c.post("/tokenize", json={"prompt": "x"}, headers=headers).status_code == 401
            assert c.get("/metrics", headers=headers).status_code == 401
        assert server.requests == []  # refused at the gateway
        r = c.post(CHAT, json=chat("hi"), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        assert header(server.requests[0], "Authorization") == f"Bearer {key}"
        # The scheme in any case (RFC 9110 11.1), as vLLM's own check takes it.
        assert c.post(CHAT, json=chat("hi"), headers={"Authorization": f"bearer {key}"}).status_code == 200
        assert c.get("/health").status_code == 200  # the one route without the key
        metrics = c.get("/metrics", headers={"Authorization": f"Bearer {key}"}).text
        assert key not in metrics and 'gateway_requests_total{route="/v1/chat/completions",status="401"} 3.0' in metrics


# ---------------------------------------------------------------- the front door: key first, then the body


# Every route a client may try: the proxied ones, the gateway's own, and one it does not have.
ROUTES = [(method, path) for path, methods in PROXIED.items() for method in methods] + [
    ("GET", "/metrics"), ("GET", "/nope"), ("POST", "/v1/embeddings"), ("DELETE", CHAT)]


def keyed(tmp_path) -> tuple[str, str]:
    """The namespace's key and its file, as a run creates them."""
    key_file = Registry(tmp_path).create_api_key(NS)
    return key_file.read_text().strip(), str(key_file)


@pytest.mark.parametrize("replicas", ["none ready", "one ready"])
def test_without_the_key_every_route_but_health_is_401_at_once(tmp_path, standins, gateway, replicas):
    """Refused before routing (unknown routes too), before the body is read, before a replica is
    waited for (wait_s 2 s here) and before a session is recorded: within 50 ms each (the best of
    3 tries: the test's own threads share the gateway's interpreter, and may hold it meanwhile)."""
    key, key_file = keyed(tmp_path)
    (server,) = standins(1, api_key=key)
    registry = Registry(tmp_path)
    registry.publish(entry(0, server.port, api_key_file=key_file,
                           state="ready" if replicas == "one ready" else "starting"))
    gw = gateway(api_key=key)
    body = json.dumps(chat("x", user="u1")).encode()
    with http(gw) as c:
        c.get("/health")  # the connection, opened once
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            for method, path in ROUTES:
                took = []
                for _ in range(3):
                    started = time.perf_counter()
                    r = c.request(method, path, content=body, headers={**headers, "X-Session-ID": "s1"})
                    took.append(time.perf_counter() - started)
                    assert r.status_code == 401, (method, path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == 401 and r.json()["error"]["type"] == "AuthenticationError"
                assert min(took) < 0.05, f"{method} {path}: 401 after {min(took) * 1000:.0f} ms at best"
        assert c.get("/health").status_code == (200 if replicas == "one ready" else 503)
        metrics = c.get("/metrics", headers={"Authorization": f"Bearer {key}"}).text
    assert server.requests == []
    assert "gateway_sessions 0.0" in metrics and "gateway_waiting_requests 0.0" in metrics


def test_a_gateway_without_a_key_refuses_while_its_replicas_take_one(tmp_path, standins, gateway):
    """The key comes from how the gateway is started, never from an entry: an entry naming an empty
    key file (once: no key, so no auth, and 200 to anyone), or an old `starting` entry naming none,
    does not open it."""
    key, key_file = keyed(tmp_path)
    empty = tmp_path / "truncated_key"
    empty.write_text("")
    (server,) = standins(1)
    registry = Registry(tmp_path)
    registry.publish(entry(0, server.port, api_key_file=str(empty)))
    open_gw = gateway()
    with http(open_gw) as c:
        until(lambda: c.get("/health").json()["usable_replicas"] == 1, what="the replica seen")
        for method, path in ROUTES:
            r = c.request(method, path, json=chat("x"))
            assert r.status_code == 503 and "started without an API key" in r.json()["error"]["message"], r.text
    assert server.requests == []  # never proxied
    with pytest.raises(GatewayKeyError, match=re.escape(str(empty))):
        Gateway(SERVICE, NS, registry).refuse_if_keyless()

    (keyed_server,) = standins(1, api_key=key)
    registry.publish(entry(0, 9, state="starting", heartbeat_at=time.time() - 3600))  # names no key file
    registry.publish(entry(1, keyed_server.port, api_key_file=key_file))
    keyed_gw = gateway(api_key=key)
    with http(keyed_gw) as c:
        until(lambda: c.get("/health").json()["known_replicas"] == 2, what="both entries seen")
        assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "s"}).status_code == 401
    assert keyed_server.requests == []


def test_the_key_comes_from_how_the_gateway_is_started(tmp_path, monkeypatch):
    key, key_file = keyed(tmp_path)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert gateway_key(key_file) == key
    for bad, why in ((str(empty), "is empty"), (str(tmp_path / "missing"), "cannot be read")):
        with pytest.raises(GatewayKeyError, match=f"{re.escape(bad)} {why}"):
            gateway_key(bad)
    # A run's job: its key file, or none at all (server.api_key: null: open on purpose); never the
    # environment, which the launcher's own checks of it would not know.
    monkeypatch.setenv("GYMLAUNCH_API_KEY", "from-env")
    assert gateway_key(None) is None and gateway_key(key_file) == key
    # The CLI refuses at once (exit 2): an empty key file, or no key while the replicas take one.
    Registry(tmp_path).publish(entry(0, 9, api_key_file=key_file))
    cli = [sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NS,
           "--registry-root", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "GYMLAUNCH_API_KEY"}
    for extra, said in ((["--api-key-file", str(empty)], f"{empty} is empty"), ([], "started without an API key")):
        out = subprocess.run(cli + extra, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 2 and said in out.stderr, out.stderr


def raw_request(gw: GatewayThread, head: str, body: bytes = b"", wait_s: float = 10.0) -> tuple[int, dict]:
    """One request over a raw socket (a body cut short, a length the client does not keep to):
    the status and JSON body of the answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", answer.lower()).group(1)):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def test_bodies_and_session_keys_are_bounded_after_the_key(tmp_path, standins, gateway):
    key, key_file = keyed(tmp_path)
    (server,) = standins(1, api_key=key)
    Registry(tmp_path).publish(entry(0, server.port, api_key_file=key_file))
    gw = gateway(api_key=key, max_body_bytes=4096, body_timeout_s=0.5)
    auth = {"Authorization": f"Bearer {key}"}
    with http(gw, headers=auth) as c:
        big = json.dumps(chat("x" * 5000)).encode()
        r = c.post(CHAT, content=big)  # said by its Content-Length
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"
        r = c.post(CHAT, content=iter([big[:3000], big[3000:]]))  # chunked: counted as it comes
        assert r.status_code == 413, r.text
        r = c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "s" * 257})
        assert r.status_code == 400 and "X-Session-ID" in r.json()["error"]["message"].replace("x-session-id", "X-Session-ID")
        r = c.post(CHAT, json={**chat("x"), "conversation_params": {"conversation_id": "c" * 257}})
        assert r.status_code == 400, r.text
        assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "s" * 256}).status_code == 200
        # A body that does not come whole within body_timeout_s: 408.
        started = time.monotonic()
        status, answer = raw_request(gw, f"POST {CHAT} HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\n"
                                         "Content-Type: application/json\nContent-Length: 100\n", b'{"model": ')
        assert status == 408 and answer["error"]["code"] == 408 and time.monotonic() - started < 5
        metrics = c.get("/metrics").text
    assert len(server.requests) == 1
    assert "gateway_sessions 1.0" in metrics  # the one session that fit


def test_bodies_the_gateway_cannot_parse_or_use_are_400(tmp_path, standins, gateway):
    """Parsed only where the gateway needs the body (a session field, prior token ids): too deep
    for the parser, not JSON, or token ids that cannot be a prompt's: 400 in OpenAI's shape."""
    (server,) = standins(1)
    publish(tmp_path, [server])
    gw = gateway()
    deep = b'{"user": "u", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    deep_ids = b'{"required_prefix_token_ids": [1], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with http(gw, headers={"Content-Type": "application/json"}) as c:
        for body in (deep, deep_ids, b'{"user": "u", "messages": [}'):
            r = c.post(CHAT, content=body)
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError", r.text[:300]
        for ids, param in ((5, "required_prefix_token_ids"), ([1, -2], "required_prefix_token_ids"),
                           ([1, "2"], "required_prefix_token_ids"), ([True], "required_prefix_token_ids")):
            r = c.post(CHAT, json=chat("x", required_prefix_token_ids=ids))
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "prompt_token_ids": "7",
                                                     "generation_token_ids": [1]}, {"role": "user", "content": "c"}]
        r = c.post(CHAT, json={**chat("x"), "messages": turns})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].prompt_token_ids", r.text
        r = c.post("/tokenize", json={"prompt": "x", "required_prefix_token_ids": {"a": 1}})
        assert r.status_code == 400, r.text
    assert server.requests == []


def test_the_gateways_own_404_and_405_are_in_openai_shape(served):
    _, gw = served(1)
    with http(gw) as c:
        r = c.get("/nope")
        assert r.status_code == 404 and r.json() == {"error": {
            "message": "no route GET /nope", "type": "NotFoundError", "param": None, "code": 404}}
        r = c.get(CHAT)
        assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowedError"


def test_the_refresh_loop_survives_an_entry_it_cannot_use(tmp_path, standins, gateway, caplog):
    """A mistyped entry (`heartbeat_at: "soon"`) once killed the registry refresh, silently: a
    replica published later was never routed to."""
    gw = gateway()
    bad = Registry(tmp_path).publish(entry(5, 9))
    bad.write_text(bad.read_text().replace(re.search(r'"heartbeat_at": [\d.]+', bad.read_text()).group(0),
                                           '"heartbeat_at": "soon"'))
    # Noticed (the loop's own log, or the registry skipping the entry when it reads it).
    until(lambda: any(r.levelno >= logging.WARNING for r in caplog.records), what="the bad entry noticed")
    bad.unlink()
    (server,) = standins(1)
    publish(tmp_path, [server])
    with http(gw) as c:
        until(lambda: c.get("/health").json()["usable_replicas"] == 1, what="the replica published later")
        assert c.post(CHAT, json=chat("x")).status_code == 200


# ---------------------------------------------------------------- streaming


class StreamingStandIn(StandIn):
    """The stand-in's chat answer streamed as vLLM streams it: Server-Sent Events, one event per
    byte-token, each its own HTTP chunk, ending with ``data: [DONE]``. Events carry no random id,
    so two requests get identical streams. After the first event the stream waits for ``go``."""

    def __init__(self) -> None:
        super().__init__(model=MODEL)
        self.RequestHandlerClass = _StreamingHandler
        self.go = threading.Event()


class _StreamingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: StreamingStandIn

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = standin.chat_completion({**body, "stream": False}, self.server.model)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [{"delta": {"content": ch}, "finish_reason": None} for ch in answer["choices"][0]["message"]["content"]]
        events.append({"delta": {}, "finish_reason": "stop"})
        for i, choice in enumerate(events):
            event = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                     "choices": [{"index": 0, **choice}]}
            self._chunk(f"data: {json.dumps(event)}\n\n".encode())
            if i == 0:
                self.server.go.wait(30)
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


def events(stream: httpx.Response) -> list[str]:
    return [e for e in stream.read().decode().split("\n\n") if e]


def test_streaming_passes_through_event_for_event(tmp_path, gateway):
    with StreamingStandIn() as server:
        publish(tmp_path, [server])
        gw = gateway()
        request = chat("stream me", stream=True)
        server.go.set()
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=request, trust_env=False) as r:
            direct = events(r)
        server.go.clear()
        with http(gw) as c, c.stream("POST", CHAT, json=request) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = r.iter_raw()
            first = next(chunks)  # arrives while the replica holds the rest: not buffered
            server.go.set()
            through = [e for e in (first + b"".join(chunks)).decode().split("\n\n") if e]
    assert len(direct) == len("Echo: stream me") + 2 and direct[-1] == "data: [DONE]"
    assert first.decode() == direct[0] + "\n\n"
    assert through == direct


def test_a_client_leaving_mid_stream_frees_its_replica(tmp_path, gateway):
    with StreamingStandIn() as server:
        publish(tmp_path, [server])
        gw = gateway()
        with http(gw) as c:
            with c.stream("POST", CHAT, json=chat("stream me", stream=True)) as r:
                next(r.iter_raw())  # the replica holds the rest; the client leaves
            until(lambda: 'gateway_requests_total{route="/v1/chat/completions",status="aborted"} 1.0'
                  in c.get("/metrics").text, what="the abandoned stream ended")
            assert 'gateway_replica_in_flight{replica="0-test-0"} 0.0' in c.get("/metrics").text
        server.go.set()


# ---------------------------------------------------------------- routing


def test_sessions_stick_to_one_replica(served):
    servers, gw = served(3)
    with http(gw) as c:
        for turn in range(3):
            for i in range(30):
                r = c.post(CHAT, json=chat(f"turn {turn}"), headers={"X-Session-ID": f"s{i}"})
                assert r.status_code == 200
            # OpenAI's `user` is the session key when no header names one.
            assert c.post(CHAT, json=chat(f"turn {turn}", user="by-user")).status_code == 200
    seen = [sessions_seen(s) for s in servers]
    assert all(seen), f"a replica got no session: {seen}"
    for i in range(30):  # every turn of a session on one replica
        assert sum(f"s{i}" in s for s in seen) == 1
    users = [sum(x.body.get("user") == "by-user" for x in s.requests) for s in servers]
    assert sorted(users) == [0, 0, 3]
    # New sessions went least-loaded: sequential requests leave every replica at 0 in flight, so
    # they take turns; 10 each.
    assert [len(s - {None}) for s in seen] == [10, 10, 10]


def gym_chat(text: str, conversation: str, **extra) -> bytes:
    """A chat completion as NeMo Gym's vllm_model server sends it with
    ``forward_session_id_as_conversation_id: true``: its session id (one per rollout) in
    ``conversation_params``, compact JSON (orjson) with that field last."""
    body = {**chat(text), **extra, "conversation_params": {"conversation_id": conversation}}
    return json.dumps(body, separators=(",", ":")).encode()


def conversations_seen(server: StandIn) -> set[str]:
    return {(x.body.get("conversation_params") or {}).get("conversation_id") for x in server.requests
            if x.path == CHAT} - {None}


def test_nemo_gym_conversation_id_is_the_session_key(served):
    servers, gw = served(3)
    with http(gw, headers={"Content-Type": "application/json"}) as c:
        for turn in range(3):
            for i in range(30):
                # Every rollout of one task carries the task's `user`: the conversation id comes first.
                r = c.post(CHAT, content=gym_chat(f"turn {turn}", f"rollout-{i}", user="task-7"))
                assert r.status_code == 200
        # The header comes before both: three conversations of one header session share a replica.
        for i in range(3):
            r = c.post(CHAT, content=gym_chat("x", f"under-header-{i}", user="task-7"),
                       headers={"X-Session-ID": "h"})
            assert r.status_code == 200
    seen = [conversations_seen(s) for s in servers]
    for i in range(30):  # every turn of a rollout on one replica
        assert sum(f"rollout-{i}" in s for s in seen) == 1, seen
    assert sorted(len({x for x in s if x.startswith("rollout-")}) for s in seen) == [10, 10, 10]
    assert sum(any(x.startswith("under-header-") for x in s) for s in seen) == 1
    # The body went on unchanged (vLLM ignores the field it does not know).
    assert all(x.body["conversation_params"]["conversation_id"] for s in servers for x in s.requests)


@pytest.mark.parametrize("policy", ["sticky_least_loaded", "least_loaded"])
def test_least_loaded_spreads_requests_in_flight(served, policy):
    servers, gw = served(3, policy=policy)
    for s in servers:
        s.gate.clear()  # chat completions are held in flight until the gate opens

    async def send() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30, trust_env=False) as c:
            # One session for all: least_loaded ignores it; sticky would pile them on one replica.
            headers = {"X-Session-ID": "one"} if policy == "least_loaded" else {}
            tasks = [asyncio.create_task(c.post(CHAT, json=chat(f"r{i}"), headers=headers)) for i in range(9)]
            deadline = time.monotonic() + 10
            while sum(s.running for s in servers) < 9:
                assert time.monotonic() < deadline, [s.running for s in servers]
                await asyncio.sleep(0.005)
            running = [s.running for s in servers]
            for s in servers:
                s.gate.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))
            return running

    assert asyncio.run(send()) == [3, 3, 3]


def test_round_robin_takes_replicas_in_turn(served):
    servers, gw = served(3, policy="round_robin")
    with http(gw) as c:
        for i in range(9):
            assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "ignored"}).status_code == 200
    assert [len(s.requests) for s in servers] == [3, 3, 3]


def test_the_load_index_keeps_the_least_loaded_first():
    """Its levels grow with the load, not with the replicas (a pick never passes over every
    replica; benchmarks/bench_gateway.py prints the time a pick takes with 1..256)."""
    for n in (1, 16, 256):
        index = LoadIndex()
        ups = [Upstream(str(i), entry(i), {}, None) for i in range(n)]
        for up in ups:
            index.add(up)
        held = []
        for _ in range(4 * n):  # every replica at 4 in flight, taken in turns
            up = index.least()
            index.change(up, +1)
            held.append(up)
        assert sorted(up.in_flight for up in ups) == [4] * n
        for up in held[: max(1, n // 2)]:
            index.change(up, -1)
        assert index.least().in_flight == 3
        assert len(index._levels) == 5  # levels 0..4: the structure grows with load, not with replicas


# ---------------------------------------------------------------- failover


def test_a_killed_replica_fails_no_request(tmp_path, gateway):
    procs = [standin.start_process(MODEL, "--seconds-per-token", "0.02") for _ in range(2)]
    try:
        registry = Registry(tmp_path)
        for replica, (_, port) in enumerate(procs):
            registry.publish(entry(replica, port))
        gw = gateway(health_interval_s=60)  # no active check: the passive one alone ejects
        killed_port = procs[0][1]

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, trust_env=False) as c:
                # 16 sessions, 8 per replica; each answer takes ~0.4 s ("Echo: session N" at 0.02 s/token).
                tasks = [asyncio.create_task(c.post(CHAT, json=chat(f"session {i}"), headers={"X-Session-ID": f"s{i}"}))
                         for i in range(16)]
                # Kill replica 0 while its requests are in flight and no byte of theirs was sent.
                async with httpx.AsyncClient(trust_env=False) as probe:
                    deadline = time.monotonic() + 10
                    while not re.search(r"num_requests_running\{[^}]*\} [1-9]",
                                        (await probe.get(f"http://127.0.0.1:{killed_port}/metrics")).text):
                        assert time.monotonic() < deadline, "no request in flight on replica 0"
                        await asyncio.sleep(0.005)
                os.kill(procs[0][0].pid, signal.SIGKILL)
                first = await asyncio.gather(*tasks)
                later = [await c.post(CHAT, json=chat("after"), headers={"X-Session-ID": f"s{i}"}) for i in range(16)]
                return first + later

        answers = asyncio.run(run())
        assert [r.status_code for r in answers] == [200] * 32
        assert procs[0][0].wait(timeout=10) == -signal.SIGKILL
        with http(gw) as c:
            metrics = c.get("/metrics").text
            retries = float(re.search(r"^gateway_retries_total ([1-9]\d*\.0)$", metrics, re.M).group(1))
            assert 'gateway_ejections_total{replica="0-test-0"} 1.0' in metrics
            # Per replica job, what each was sent: the dead one's in-flight requests failed there and
            # were retried on the other (the run's per-replica figures, launcher/gateways.py per_replica).
            sent = {name: {m[1]: float(m[2]) for m in re.finditer(
                        rf'^gateway_replica_{name}_total{{replica="([^"]+)"}} (\S+)$', metrics, re.M) if float(m[2])}
                    for name in ("requests", "retries", "failures")}
            assert sent["failures"] == {"0-test-0": retries} and sent["retries"] == {"1-test-1": retries}, sent
            assert sum(sent["requests"].values()) == 32 + retries and sent["requests"]["0-test-0"] >= retries, sent
            assert c.get("/health").json()["usable_replicas"] == 1
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()


def test_503_and_resets_are_retried_elsewhere(served):
    servers, gw = served(3, max_retries=2, health_interval_s=60, wait_s=0.2)
    servers[0].faults.status = 503
    servers[1].faults.drop_connection = True  # half an answer, then the connection closes
    with http(gw) as c:
        answers = [c.post(CHAT, json=chat("x"), headers={"X-Session-ID": f"s{i}"}) for i in range(6)]
        assert [r.status_code for r in answers] == [200] * 6
        assert len(servers[0].requests) == 1 and len(servers[1].requests) == 1  # ejected after one failure each
        servers[2].faults.status = 503
        r = c.post(CHAT, json=chat("x"))
    # Every replica failed: with none usable, the wait ends in the gateway's own 503.
    assert r.status_code == 503 and "Retry-After" in r.headers


def test_retries_are_bounded(served):
    servers, gw = served(3, {"status": 503}, max_retries=1, health_interval_s=60)
    with http(gw) as c:
        r = c.post(CHAT, json=chat("x"))
    assert r.status_code == 503 and "Retry-After" not in r.headers  # the last replica's answer
    assert r.json()["error"]["message"] == "stand-in told to answer 503"
    assert sum(len(s.requests) for s in servers) == 2


def test_an_ejected_replica_returns_when_its_health_check_passes(served):
    servers, gw = served(2, health_interval_s=0.1)
    servers[0].faults.status = 503  # chat fails, /health still answers
    with http(gw) as c:
        until(lambda: c.post(CHAT, json=chat("x")).status_code == 200 and len(servers[0].requests) == 1,
              what="replica 0 tried")
        servers[0].faults.status = 200
        until(lambda: c.get("/health").json()["usable_replicas"] == 2, what="replica 0 readmitted")
        assert c.get("/metrics").text.count("gateway_ejections_total{") == 1


def test_no_replica_waits_then_503_with_retry_after(tmp_path, standins, gateway):
    gw = gateway(wait_s=0.3)
    with http(gw) as c:
        assert c.get("/health").status_code == 503
        started = time.monotonic()
        r = c.post(CHAT, json=chat("x"))
        assert time.monotonic() - started >= 0.3
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        error = r.json()["error"]
        assert error["code"] == 503 and "no usable replica of service 'policy'" in error["message"]

    # A replica that turns up while a request waits takes it.
    slow = gateway(wait_s=30)
    (server,) = standins(1)
    results: list[httpx.Response] = []
    with http(slow) as c:
        waiting = threading.Thread(target=lambda: results.append(c.post(CHAT, json=chat("x"))))
        waiting.start()
        until(lambda: "gateway_waiting_requests 1.0" in c.get("/metrics").text, what="request waiting")
        # Counted as in flight: a draining gateway sees it through instead of cancelling it at shutdown.
        assert slow.gateway.in_flight() == 1
        publish(tmp_path, [server])
        waiting.join(timeout=30)
    assert [r.status_code for r in results] == [200]


def test_a_draining_replica_gets_no_new_sessions_and_finishes_its_requests(tmp_path, standins, gateway):
    servers = standins(2)
    entries = publish(tmp_path, servers)
    gw = gateway()
    with http(gw) as c:
        assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "old"}).status_code == 200
        home = next(i for i, s in enumerate(servers) if "old" in sessions_seen(s))
        servers[home].gate.clear()
        held: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: held.append(
            httpx.post(f"{gw.url}{CHAT}", json=chat("held"), headers={"X-Session-ID": "old"}, trust_env=False,
                       timeout=30)))
        holder.start()
        until(lambda: servers[home].running == 1, what="request held on its replica")
        Registry(tmp_path).heartbeat(entries[home], state="draining")
        until(lambda: c.get("/health").json()["usable_replicas"] == 1, what="drain seen")
        for i in range(6):
            assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": f"new{i}"}).status_code == 200
        assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": "old"}).status_code == 200  # moved
        servers[home].gate.set()
        holder.join(timeout=10)
    assert [r.status_code for r in held] == [200]  # the in-flight request finished on the draining replica
    assert sessions_seen(servers[home]) == {"old"}
    assert sessions_seen(servers[1 - home]) == {"old"} | {f"new{i}" for i in range(6)}


# ---------------------------------------------------------------- metrics, settings, CLI


def test_metrics_are_exposed(served):
    servers, gw = served(2)
    with http(gw) as c:
        for i in range(4):
            assert c.post(CHAT, json=chat("x"), headers={"X-Session-ID": f"s{i}"}).status_code == 200
        c.get("/v1/models")
        metrics = c.get("/metrics").text
    assert 'gateway_requests_total{route="/v1/chat/completions",status="200"} 4.0' in metrics
    assert 'gateway_requests_total{route="/v1/models",status="200"} 1.0' in metrics
    assert 'gateway_request_seconds_count{route="/v1/chat/completions"} 4.0' in metrics
    assert 'gateway_replica_in_flight{replica="0-test-0"} 0.0' in metrics
    assert "gateway_sessions 4.0" in metrics and "gateway_usable_replicas 2.0" in metrics
    assert "gateway_retries_total 0.0" in metrics


def test_settings_name_the_key_that_is_wrong():
    checks = Checks("gateway")
    GatewaySettings(policy="random", max_retries=-1, refresh_s=0, port=70000).validate(checks)
    assert checks.errors == [
        "gateway.port: must be in [0, 65535], got 70000",
        "gateway.policy: must be one of sticky_least_loaded, least_loaded, round_robin, got random",
        "gateway.max_retries: must be >= 0, got -1",
        "gateway.refresh_s: must be > 0, got 0",
    ]
    checks = Checks()
    GatewaySettings().validate(checks)
    assert checks.errors == []


def test_the_cli_prints_its_url_and_stops_on_sigterm(tmp_path, standins):
    (server,) = standins(1)
    publish(tmp_path, [server])
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NS,
         "--registry-root", str(tmp_path), "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"serving at (http://\S+/v1)$", line.strip())
        assert url, line + proc.stderr.read()
        r = httpx.post(f"{url.group(1)}/chat/completions", json=chat("cli"), trust_env=False, timeout=30)
        assert r.json()["choices"][0]["message"]["content"] == "Echo: cli"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "Unclosed" not in proc.stderr.read()  # it closed its connections to the replicas
    finally:
        proc.kill()
        proc.wait()
    bad = subprocess.run([sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NS,
                          "--policy", "random"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "policy: must be one of" in bad.stderr


# ---------------------------------------------------------------- handed out only when it serves


GATEWAY = gateway_service(SERVICE)


def registry_cli(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.registry", "--root", str(root), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_urls_and_wait_never_hand_out_a_gateway_with_no_ready_replica(tmp_path):
    registry = Registry(tmp_path)
    gateway = entry(0, 4000, service=GATEWAY)
    registry.publish(gateway)
    replica = entry(0, 4001, state="healthy")  # not yet through the launcher's gate
    registry.publish(replica)
    assert urls(registry, SERVICE, NS) == [] and registry.handed_out(GATEWAY, NS) == []
    out = registry_cli(tmp_path, "urls", SERVICE)
    assert out.returncode == 1 and out.stdout == "", out.stdout
    out = registry_cli(tmp_path, "--namespace", NS, "wait", GATEWAY, "--timeout", "0.3")
    assert out.returncode == 1 and out.stdout == "" and "0/1" in out.stderr, out.stdout + out.stderr

    registry.heartbeat(replica, state="ready")
    assert urls(registry, SERVICE, NS) == [gateway.base_url]
    assert registry_cli(tmp_path, "urls", SERVICE).stdout.strip() == gateway.base_url
    assert registry_cli(tmp_path, "--namespace", NS, "wait", GATEWAY, "--timeout", "5").stdout.strip() == gateway.base_url
    # A replica ready in another namespace backs no gateway here.
    registry.remove(NS, SERVICE, 0)
    registry.publish(entry(0, 4002, namespace="other"))
    assert urls(registry, SERVICE, NS) == []


@pytest.fixture
def gateway_job(tmp_path):
    """``run_job`` of SERVICE's gateway in NS, as a run's gateway job runs it, in a process of its own."""
    code = textwrap.dedent(f"""
        from server.gateway import GatewayJob, GatewaySettings, run_job
        from server.registry import Registry
        run_job(GatewayJob(namespace={NS!r}, service={SERVICE!r}, model={MODEL!r}, advertise_host="127.0.0.1",
                           registry=Registry({str(tmp_path)!r}, heartbeat_s=0.2, ttl_s=5, orphan_grace_s=None),
                           settings=GatewaySettings(refresh_s=0.05)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_the_gateway_job_stays_healthy_until_the_launcher_admits_it(tmp_path, standins, gateway_job):
    registry = Registry(tmp_path)
    (server,) = standins(1)
    (replica,) = publish(tmp_path, [server])

    def gateway_entry():
        found = registry.entries(NS, GATEWAY)
        return found[0] if found else None

    until(lambda: (e := gateway_entry()) is not None and e.state != "starting", timeout_s=30, what="the gateway serving")
    first = gateway_entry()
    assert first.state == "healthy"
    # Still healthy (not handed out) across heartbeats, while the replica is ready behind it.
    until(lambda: gateway_entry().heartbeat_at > first.heartbeat_at + 0.5, what="three heartbeats")
    assert gateway_entry().state == "healthy"
    # Neither the gateway nor, behind its back, the replica: the service's one URL comes once it serves.
    assert urls(registry, SERVICE, NS) == [] and urls(registry, SERVICE, NS, replicas=True) == [replica.base_url]

    registry.admit(NS, GATEWAY, 0, first.job_id)
    until(lambda: gateway_entry().state == "ready", what="ready once admitted")
    assert urls(registry, SERVICE, NS) == [first.base_url]
    gateway_job.send_signal(signal.SIGTERM)
    out, _ = gateway_job.communicate(timeout=30)
    assert gateway_job.returncode == 0, out
    assert gateway_entry() is None
