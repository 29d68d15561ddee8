"""What a caller without the key costs the gateway: nothing that grows with what it sends. The
gateway runs as its own process (``python -m server.gateway``), its memory read from /proc; a
stand-in replica that takes the namespace's key is ready behind it. Each case bounded in count
and time. And token ids no engine would take, refused by a gateway in front of real vLLM."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry
from tests.support import MODEL, NAMESPACE as NS, ROOT, SERVICE, entry

CHAT = "/v1/chat/completions"
# RSS the gateway may gain over a whole case: its own allocator's noise, not the traffic's size.
GROWTH_BOUND_MB = 40


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM: no sampling misses a short peak)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 1024


@pytest.fixture
def gateway_process(tmp_path, standins):
    """(url, pid, key): the gateway of SERVICE in NS as its CLI runs it, its key given through
    $GYMLAUNCH_API_KEY, in front of one ready stand-in replica taking the same key."""
    registry = Registry(tmp_path)
    key_file = registry.create_api_key(NS)
    key = key_file.read_text().strip()
    (server,) = standins(1, api_key=key)
    registry.publish(entry(0, server.port, api_key_file=str(key_file)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NS,
         "--registry-root", str(tmp_path), "--port", "0", "--refresh-s", "0.2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GYMLAUNCH_API_KEY": key},
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"serving at (http://\S+)/v1$", line.strip())
        assert url, line + proc.stderr.read()
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "warm"}], "max_tokens": 8}
        # Warm: the first request's imports and buffers are not what the cases measure.
        for _ in range(20):
            assert httpx.post(f"{url.group(1)}{CHAT}", json=body, headers=auth, timeout=30).status_code == 200
        yield url.group(1), proc.pid, key
    finally:
        proc.kill()
        proc.communicate()


async def unauthenticated_upload(host: str, port: int, size: int) -> tuple[int, int]:
    """POST ``size`` bytes without a key, all of them unless the gateway closes the connection
    first (the client does not stop at the answer): the answer's status, the bytes sent."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode())
    answer = asyncio.create_task(reader.readuntil(b"\r\n\r\n"))
    chunk, sent = b"x" * (1 << 20), 0
    try:
        while sent < size:
            writer.write(chunk[: size - sent])
            await writer.drain()
            sent += len(chunk)
    except ConnectionError:  # the gateway may stop reading once it answered: fine
        pass
    head = await asyncio.wait_for(answer, 60)
    writer.close()
    return int(head.split(b" ", 2)[1]), min(sent, size)


def test_20_concurrent_50_mb_bodies_without_the_key_cost_no_memory(gateway_process):
    url, pid, _ = gateway_process
    host, port = url.removeprefix("http://").split(":")
    before = peak_rss_mb(pid)

    async def uploads() -> list[tuple[int, int]]:
        return await asyncio.wait_for(asyncio.gather(
            *(unauthenticated_upload(host, int(port), 50 << 20) for _ in range(20))), 180)

    answers = asyncio.run(uploads())
    after = peak_rss_mb(pid)
    sent = sum(n for _, n in answers) / (1 << 20)
    print(f"\n[50 MB bodies] 20 at once, statuses {set(s for s, _ in answers)}, {sent:.0f} MB sent; "
          f"gateway peak RSS {before:.0f} -> {after:.0f} MB")
    assert [status for status, _ in answers] == [401] * 20
    assert after - before < GROWTH_BOUND_MB


def test_3000_requests_with_a_60_kb_session_id_without_the_key_store_nothing(gateway_process):
    url, pid, key = gateway_process
    before = peak_rss_mb(pid)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 8}

    async def requests() -> list[int]:
        statuses = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def worker(first: int) -> None:  # 16 connections, each request its own session id
                for i in range(first, 3000, 16):
                    session = f"{i:06d}" + "s" * (60 * 1024 - 6)
                    statuses.append((await c.post(CHAT, json=body, headers={"X-Session-ID": session})).status_code)

            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(16))), 300)
        return statuses

    statuses = asyncio.run(requests())
    after = peak_rss_mb(pid)
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    sessions = re.search(r"^gateway_sessions (\S+)$", metrics, re.M).group(1)
    print(f"\n[60 KB session ids] 3,000 requests, statuses {set(statuses)}, sessions stored {sessions}; "
          f"gateway peak RSS {before:.0f} -> {after:.0f} MB")
    assert statuses == [401] * 3000
    assert float(sessions) == 0
    assert after - before < GROWTH_BOUND_MB


# ---------------------------------------------------------------- token ids against real vLLM


def test_token_ids_beyond_the_vocabulary_are_400_not_a_mismatch(policy_server, registry_root):
    """The vocabulary's end as vLLM's own check draws it (server/onpolicy.py ``_vocab_size``):
    SmolLM2's 49,152 ids. Ids beyond it were spliced or, not matching the turns, answered 200
    `mismatch` from the re-rendered prompt."""
    key = policy_server.read_api_key()
    settings = GatewaySettings(refresh_s=0.2)
    with GatewayThread(Gateway("policy", policy_server.namespace, Registry(registry_root, ttl_s=10), settings,
                               key)) as gw:
        turns = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."},
                 {"role": "user", "content": "Again."}]

        def chat(**extra) -> httpx.Response:
            return httpx.post(f"{gw.url}{CHAT}", headers={"Authorization": f"Bearer {key}"}, timeout=180, json={
                "model": policy_server.model, "messages": turns, "max_tokens": 4, **extra})

        for ids in ([1, 49152], [1, 10**9]):
            r = chat(required_prefix_token_ids=ids)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "required_prefix_token_ids" and "49152 ids" in error["message"], error
        with_ids = [*turns[:1], {**turns[1], "prompt_token_ids": [1, 2], "generation_token_ids": [49152]}, turns[2]]
        r = httpx.post(f"{gw.url}/tokenize", headers={"Authorization": f"Bearer {key}"}, timeout=180,
                       json={"model": policy_server.model, "messages": with_ids})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].generation_token_ids", r.text
        # The last id of the vocabulary is one: not refused for its value (a mismatch of turns at most).
        assert chat(required_prefix_token_ids=[1, 49151]).status_code == 200
