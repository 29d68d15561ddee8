"""The gateway's client connections (server/connections.py): silent, half-sent and slow connections
at a low open-file limit neither starve the clients with the key nor stay open; a non-streaming
client that leaves stops its generation on the replica (real vLLM)."""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.process import raise_open_files_limit
from server.registry import Registry
from server.standin import StandIn
from tests.support import MODEL, NAMESPACE, ROOT, SERVED_NAME, SERVICE, auth, entry

# The gateway's own limit, soft below hard: it raises the soft one to the hard one at start.
SOFT_LIMIT, HARD_LIMIT = 512, 1024
# Per kind: together about twice what 1,024 descriptors hold (on main ~1,000 of them stopped the
# gateway serving anyone).
FLOOD = 600
TIMEOUTS = {"header_timeout_s": 2.0, "body_timeout_s": 3.0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _lowered_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT_LIMIT, HARD_LIMIT))


@pytest.fixture
def gateway_process(tmp_path):
    """A stand-in replica with the namespace's key, and ``python -m server.gateway`` in front of it
    with a 1,024 open-file limit; yields (gateway URL, its pid, the key, the registry, a stand-in
    factory), then stops both."""
    registry = Registry(tmp_path)
    key_file = registry.create_api_key(NAMESPACE)
    key = key_file.read_text().strip()
    replica = StandIn(api_key=key, record=False).start()
    registry.publish(entry(0, replica.port, api_key_file=str(key_file)))
    log = tmp_path / "gateway.log"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in TIMEOUTS.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NAMESPACE,
         "--registry-root", str(tmp_path), "--port", "0", "--refresh-s", "0.2", "--api-key-file", str(key_file),
         *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=(err := log.open("w")), text=True,
        preexec_fn=_lowered_fd_limit, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    err.close()  # the gateway has its own
    others = []
    try:
        line = proc.stdout.readline()
        url = re.search(r"serving at (http://\S+)/v1$", line.strip())
        assert url, line + log.read_text()
        yield url.group(1), proc.pid, key, registry, key_file, others
    finally:
        proc.kill()
        proc.wait()
        assert "Too many open files" not in log.read_text()
        for server in [replica, *others]:
            server.stop()


def _chat(url: str, key: str) -> str:
    """A valid request on a new connection; the model's answer."""
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                   trust_env=False, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _open(address: tuple[str, int], kind: str) -> socket.socket:
    """A connection that sends nothing, half its headers, or its headers and a trickle of its body."""
    sock = socket.create_connection(address, timeout=5)
    start = {"silent": b"",
             "partial_header": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Ty",
             "slow_body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n{\"model\": "}[kind]
    try:
        sock.sendall(start)
    except OSError:  # the gateway closed it already (over its cap): what the test waits for anyway
        pass
    sock.setblocking(False)
    return sock


def _wait_closed(socks: dict[socket.socket, str], deadline: float) -> dict[str, int]:
    """Reads every connection until the gateway closes it (EOF or reset) or ``deadline``; returns the
    count still open per kind, and closes them all."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    open_ = dict(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            try:
                data = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                del open_[key.fileobj]
    selector.close()
    for sock in socks:
        sock.close()
    left = {}
    for kind in open_.values():
        left[kind] = left.get(kind, 0) + 1
    return left


def _metric(url: str, name: str, key: str) -> dict[str, float]:
    """A metric's samples, by their labels' text (the gateway's /metrics takes the key)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, trust_env=False, timeout=10).text
    return {m[1] or "": float(m[2]) for m in re.finditer(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.M)}


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_silent_and_slow_connections_at_a_low_fd_limit_neither_starve_clients_nor_stay(gateway_process):
    url, pid, key, registry, key_file, others = gateway_process
    assert _open_files(pid) < 100
    limits = open(f"/proc/{pid}/limits").read()
    assert re.search(rf"Max open files\s+{HARD_LIMIT}\s+{HARD_LIMIT}\s", limits), limits  # soft raised to hard
    assert raise_open_files_limit() > 4 * FLOOD  # this test's own sockets
    host, port = url.removeprefix("http://").split(":")
    socks: dict[socket.socket, str] = {}
    answered, most_fds = 0, 0
    started = time.monotonic()
    kinds = ("silent", "partial_header", "slow_body")  # interleaved: the last held are of every kind
    for i in range(len(kinds) * FLOOD):
        socks[_open((host, int(port)), kinds[i % len(kinds)])] = kinds[i % len(kinds)]
        if i % 100 == 99:  # a client with the key, on a new connection, in the middle of it
            assert _chat(url, key) == "Echo: hi"
            answered += 1
            most_fds = max(most_fds, _open_files(pid))
    flooded_s = time.monotonic() - started
    # A replica added while the flood is held: the registry refresh still has descriptors.
    late = StandIn(api_key=key, record=False).start()
    others.append(late)
    registry.publish(entry(1, late.port, api_key_file=str(key_file)))
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/health", trust_env=False, timeout=10).json()["usable_replicas"] < 2:
        assert time.monotonic() < deadline, "the replica added during the flood not seen in 5 s"
        time.sleep(0.1)
    for _ in range(10):
        assert _chat(url, key) == "Echo: hi"
        answered += 1
    # Every flood connection closed by the gateway, within the slowest deadline of the last one opened.
    left = _wait_closed(socks, time.monotonic() + TIMEOUTS["body_timeout_s"] + 3)
    closed = _metric(url, "gateway_connections_closed_total", key)
    print(f"\n[connections] {len(socks)} opened in {flooded_s:.1f} s, {answered} valid requests answered, "
          f"gateway fds at most {most_fds} of {HARD_LIMIT}, closed by reason {closed}, still open {left}")
    assert left == {}
    assert most_fds < HARD_LIMIT - 128
    for reason in ("header_timeout", "body_timeout", "evicted"):
        assert closed.get(f'reason="{reason}"', 0) > 0, closed


# ---------------------------------------------------------------- a client that leaves (real vLLM)


def _running(replica, gw_url: str) -> tuple[float, float]:
    """Requests running on the engine (vLLM's /metrics) and in flight through the gateway."""
    text = httpx.get(f"{replica.root_url}/metrics", headers=auth(replica), trust_env=False, timeout=10).text
    engine = sum(float(m[1]) for m in re.finditer(r"^vllm:num_requests_running\{.*\} (\S+)$", text, re.M))
    return engine, sum(_metric(gw_url, "gateway_replica_in_flight", replica.read_api_key()).values())


def test_a_non_streaming_client_that_leaves_stops_its_generation(policy_server, registry_root):
    replica = policy_server
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    with GatewayThread(Gateway("policy", replica.namespace, Registry(registry_root, ttl_s=10),
                               GatewaySettings(refresh_s=0.2), replica.read_api_key())) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        client = socket.create_connection((host, int(port)), timeout=10)
        payload = json.dumps(body).encode()
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                       b"Authorization: " + auth(replica)["Authorization"].encode() +
                       b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 60
        while _running(replica, gw.url) != (1, 1):
            assert time.monotonic() < deadline, f"the generation did not start: {_running(replica, gw.url)}"
            time.sleep(0.1)
        client.close()
        left = time.monotonic()
        while (running := _running(replica, gw.url)) != (0, 0) and time.monotonic() - left < 10:
            time.sleep(0.1)
        took = time.monotonic() - left
        print(f"\n[client left] engine and gateway back to {running} in {took:.2f} s")
        assert running == (0, 0) and took < 2.5
