"""The gateway's hold on its client connections (server/connections.py) over real sockets, on a
gateway thread with deadlines of a fraction of a second; the open-file limit raised at start
(server/process.py). The flood at a low open-file limit is tests/integration/test_gateway_connections.py."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server import connections
from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry
from tests.support import MODEL, NAMESPACE, ROOT, SERVICE, publish

DEADLINES = {"header_timeout_s": 0.3, "body_timeout_s": 0.3, "keep_alive_s": 0.3}
CHAT = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()


@pytest.fixture
def gateway(tmp_path, standins):
    """``start(**settings)``: one stand-in replica and a gateway over it, on a thread."""
    started: list[GatewayThread] = []

    def start(**settings) -> GatewayThread:
        (server,) = standins(1)
        publish(tmp_path, [server])
        gw = GatewayThread(Gateway(SERVICE, NAMESPACE, Registry(tmp_path),
                                   GatewaySettings(refresh_s=0.05, **{**DEADLINES, **settings}))).start()
        started.append(gw)
        gw.replica = server
        return gw

    yield start
    for gw in started:
        gw.stop()


def _connect(gw: GatewayThread, sent: bytes = b"") -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(sent)
    return sock


def _request(path: str = "/v1/chat/completions", body: bytes = CHAT, length: int | None = None) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(body) if length is None else length, body))


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection (a reset: data it never read),
    and how long that took."""
    started, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):  # the socket's 5 s timeout fails a connection left open
            got += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return got, time.monotonic() - started


def _closed(gw: GatewayThread) -> dict[str, float]:
    counter = gw.gateway._connections_closed
    return {s.labels["reason"]: s.value for s in next(iter(counter.collect())).samples if s.name.endswith("_total")}


def test_a_silent_connection_is_closed_after_the_header_deadline_with_nothing_sent(gateway):
    gw = gateway()
    got, took = _until_closed(_connect(gw))
    assert got == b"" and DEADLINES["header_timeout_s"] - 0.05 <= took < 2
    assert _closed(gw) == {"header_timeout": 1}


@pytest.mark.parametrize("sent, what, reason", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Le", "headers", "header_timeout"),
    (_request(body=CHAT[:10], length=len(CHAT)), "body", "body_timeout"),
])
def test_a_request_sent_too_slowly_gets_408_and_is_closed(gateway, sent, what, reason):
    gw = gateway()
    sock = _connect(gw, sent)
    for byte in b"xy":  # a trickle does not push the deadline back
        time.sleep(0.1)
        sock.sendall(bytes([byte]))
    got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 408 ") and f"request {what} not received in time".encode() in got
    assert took < 2 and _closed(gw) == {reason: 1}


def test_a_body_answered_before_it_arrived_closes_the_connection_at_its_deadline(gateway):
    gw = gateway()
    sock = _connect(gw, _request("/nowhere", body=b"{", length=1000))  # 404 without reading the body
    got, took = _until_closed(sock)
    assert got.startswith(b"HTTP/1.1 404 ") and b"408" not in got  # answered: no second answer
    assert _closed(gw) == {"body_timeout": 1}


def test_a_connection_between_requests_is_closed_after_keep_alive_s_and_not_before(gateway):
    gw = gateway(header_timeout_s=5, keep_alive_s=0.5)
    sock = _connect(gw, _request())
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    got, took = _until_closed(sock)
    assert got == b"" and 0.45 <= took < 2
    assert _closed(gw) == {}  # uvicorn's own keep-alive timer


def test_at_max_connections_a_newcomer_closes_the_longest_waiting_unserved_connection(gateway):
    gw = gateway(max_connections=3, header_timeout_s=5)
    oldest, *others = [_connect(gw) for _ in range(3)]  # accepted before the newcomer: the backlog is FIFO
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=5) as client:
        assert client.post("/v1/chat/completions", content=CHAT).status_code == 200
    assert _until_closed(oldest)[0] == b""
    assert _closed(gw) == {"evicted": 1}
    for sock in others:
        sock.close()


def test_requests_being_served_are_never_cut_for_a_newcomer(gateway):
    gw = gateway(max_connections=2)
    gw.replica.gate.clear()  # the replica holds its answers
    served = [_connect(gw, _request()) for _ in range(2)]
    deadline = time.monotonic() + 5
    while gw.replica.running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    newcomer = _connect(gw, _request())
    assert _until_closed(newcomer)[0] == b""  # refused: nothing to evict
    gw.replica.gate.set()
    for sock in served:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.close()
    assert _closed(gw) == {"refused": 1}


def test_the_cap_leaves_the_reserve_and_the_backlog_free_at_any_open_file_limit():
    assert connections.max_connections(1024) == 320
    for open_files in (64, 256, 1024, 4096, 65536, 1 << 20):
        cap = connections.max_connections(open_files)
        assert cap >= 1
        if open_files > 512:
            assert 2 * cap + connections.FD_RESERVE + connections.backlog(open_files) <= open_files


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    def lowered():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1000))

    done = subprocess.run(
        [sys.executable, "-c", "import resource; from server.process import raise_open_files_limit as r; "
                               "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
        cwd=ROOT, capture_output=True, text=True, preexec_fn=lowered, check=True)
    assert done.stdout.split() == ["1000", "1000"]


def test_bad_connection_settings_are_refused_by_name():
    flags = {"header_timeout_s": "0", "body_timeout_s": "-1", "keep_alive_s": "0", "max_connections": "-1"}
    done = subprocess.run([sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NAMESPACE,
                           *(f"--{name.replace('_', '-')}={value}" for name, value in flags.items())],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    for name in flags:
        assert f"{name}: must be" in done.stderr, done.stderr


def test_a_header_block_over_the_cap_gets_431_and_is_closed_before_it_ends(gateway):
    gw = gateway(header_timeout_s=5)
    sock = _connect(gw, b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Filler: ")
    try:
        for _ in range(2 * connections.MAX_HEADER_BYTES // 4096):
            sock.sendall(b"a" * 4096)
    except OSError:  # closed while sending: the answer may be lost to the reset, the count is not
        pass
    got, took = _until_closed(sock)
    assert got == b"" or got.startswith(b"HTTP/1.1 431 "), got[:100]
    assert took < 2 and _closed(gw) == {"header_too_large": 1}
