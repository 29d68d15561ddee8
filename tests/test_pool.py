"""The endpoint pool over real HTTP: stand-in servers (server/standin.py, no model) on 127.0.0.1,
published in a registry under tmp_path, in threads or, to be SIGKILLed, in processes of their own."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

import server.registry as registry_module
from jobs.pool import EndpointPool, NoEndpointError, ReplicaStats
from server import standin
from server.job import free_port
from server.registry import API_KEY_ENV, Entry, Registry
from tests.support import MODEL, NAMESPACE as NS, SERVICE, entry, publish

CHAT = "/chat/completions"


def key_homed_at(root: Path, replica: int, prefix: str = "conv") -> str:
    """A session key whose hashed replica is ``replica`` (asked of a throwaway pool, so no move is remembered)."""
    probe = EndpointPool(SERVICE, NS, Registry(root), refresh_s=0)
    return next(k for k in (f"{prefix}-{i}" for i in range(1000)) if probe.pick(k).replica == replica)


def chat(text: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 64}


async def until_async(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout_s}s")
        await asyncio.sleep(0.005)


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, trust_env=False)


def post_once(pool: EndpointPool, key: str = "conv", headers: dict | None = None) -> tuple[Entry, httpx.Response]:
    """One chat request through ``pool`` for session ``key``, on a client of its own."""

    async def post() -> tuple[Entry, httpx.Response]:
        async with client() as c:
            return await pool.post(c, CHAT, chat("hi"), key, headers=headers)

    return asyncio.run(post())


# ---------------------------------------------------------------- affinity


def test_turns_of_a_conversation_reach_one_replica(tmp_path, standins):
    servers = standins(3)
    publish(tmp_path, servers)
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path))

    async def converse() -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {}
        async with client() as c:
            for turn in range(3):
                for i in range(30):
                    e, r = await pool.post(c, CHAT, chat(f"turn {turn}"), f"conv-{i}")
                    assert r.status_code == 200 and r.url.port == e.port
                    seen.setdefault(f"conv-{i}", []).append(e.replica)
        return seen

    seen = asyncio.run(converse())
    assert all(len(set(replicas)) == 1 for replicas in seen.values())
    assert {replicas[0] for replicas in seen.values()} == {0, 1, 2}
    assert sum(len(s.requests) for s in servers) == 90
    assert {r: s.requests for r, s in pool.stats().items()} == {r: len(s.requests) for r, s in enumerate(servers)}


def test_a_replica_leaving_moves_only_its_own_conversations(tmp_path, standins):
    publish(tmp_path, standins(4))
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0)
    before = {k: pool.pick(k).replica for k in (f"conv-{i}" for i in range(200))}
    Registry(tmp_path).remove(NS, SERVICE, 1)
    after = {k: pool.pick(k).replica for k in before}
    assert {k: r for k, r in after.items() if before[k] != 1} == {k: r for k, r in before.items() if r != 1}
    assert 1 not in after.values()


# ---------------------------------------------------------------- fallback


def test_fallback_goes_to_the_least_busy_replica_and_stays(tmp_path, standins):
    servers = standins(3)
    entries = publish(tmp_path, servers)
    registry = Registry(tmp_path)
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0)
    key = key_homed_at(tmp_path, 0)
    busy_keys = [key_homed_at(tmp_path, 1, prefix=f"busy{i}") for i in range(3)]

    async def scenario() -> None:
        async with client() as c:
            servers[1].gate.clear()  # replica 1 holds 3 requests in flight
            held = [asyncio.create_task(pool.post(c, CHAT, chat("hold"), k)) for k in busy_keys]
            await until_async(lambda: pool.stats().get(1, ReplicaStats()).in_flight == 3, what="3 in flight on 1")
            registry.heartbeat(entries[0], state="draining")
            e, r = await pool.post(c, CHAT, chat("moved"), key)
            assert (e.replica, r.status_code) == (2, 200)  # 2 has nothing in flight, 1 has 3
            servers[1].gate.set()
            assert all(r.status_code == 200 for _, r in await asyncio.gather(*held))
            # Replica 0 back to ready and 1 idle again: the conversation stays where its cache is.
            registry.heartbeat(entries[0], state="ready")
            assert pool.pick(key).replica == 2
            # Its new replica removed: it moves once more, to the only one that is idle... and not draining.
            registry.heartbeat(entries[0], state="draining")
            registry.remove(NS, SERVICE, 2)
            e, r = await pool.post(c, CHAT, chat("moved again"), key)
            assert (e.replica, r.status_code) == (1, 200)

    asyncio.run(scenario())
    assert pool.stats()[1].in_flight == 0


def test_stale_replica_is_not_picked(tmp_path, standins):
    servers = standins(2)
    registry = Registry(tmp_path)
    registry.publish(entry(0, servers[0].port, heartbeat_at=time.time() - 3600))
    registry.publish(entry(1, servers[1].port))
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path))
    assert [e.replica for e in pool.endpoints()] == [1]
    assert {pool.pick(f"conv-{i}").replica for i in range(20)} == {1}


# ---------------------------------------------------------------- failover


def test_killed_replica_mid_collection_fails_over_and_conversations_stay_moved(tmp_path):
    procs = []
    try:
        for _ in range(2):
            procs.append(standin.start_process(MODEL, "--seconds-per-token", "0.0005"))
        registry = Registry(tmp_path)
        for replica, (_, port) in enumerate(procs):
            registry.publish(entry(replica, port))
        pool = EndpointPool(SERVICE, NS, Registry(tmp_path), backoff_s=0.01)
        turns: dict[str, list[int]] = {}
        done, killed = 0, False

        async def conversation(c: httpx.AsyncClient, key: str, semaphore: asyncio.Semaphore) -> None:
            nonlocal done, killed
            async with semaphore:
                for turn in range(4):
                    e, r = await pool.post(c, CHAT, chat(f"{key} turn {turn}"), key)
                    assert r.status_code == 200, r.text
                    turns.setdefault(key, []).append(e.replica)
                    done += 1
                    # Mid-collection, with other requests in flight, and mid-conversation on replica 0.
                    if done >= 40 and not killed and e.replica == 0 and turn < 3:
                        os.kill(procs[0][0].pid, signal.SIGKILL)
                        killed = True

        async def collection() -> None:
            semaphore = asyncio.Semaphore(8)
            async with client() as c:
                await asyncio.gather(*(conversation(c, f"conv-{i}", semaphore) for i in range(40)))

        asyncio.run(collection())
        assert procs[0][0].wait(timeout=10) == -signal.SIGKILL
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()

    assert len(turns) == 40 and all(len(t) == 4 for t in turns.values())  # every conversation finished
    moved = [t for t in turns.values() if t[0] == 0 and t[-1] == 1]
    assert moved, f"no conversation was on replica 0 when it died: {turns}"
    for t in turns.values():  # once on 1, never back
        assert t == sorted(t), t
    stats = pool.stats()
    assert stats[0].failures >= 1 and stats[1].retries >= 1 and stats[1].failures == 0
    assert stats[0].in_flight == stats[1].in_flight == 0
    assert [e.replica for e in pool.endpoints()] == [1]  # ejected: its entry still heartbeats "ready"


def test_503_is_retried_elsewhere_and_500_is_returned(tmp_path, standins):
    servers = standins(2)
    publish(tmp_path, servers)
    key = key_homed_at(tmp_path, 0)

    servers[0].faults.status = 503
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), backoff_s=0.01)
    e, r = post_once(pool, key)
    assert (e.replica, r.status_code) == (1, 200)
    assert pool.stats() == {0: ReplicaStats(requests=1, failures=1), 1: ReplicaStats(requests=1, retries=1)}
    assert pool.pick(key).replica == 1  # the session moved

    servers[0].faults.status = 500
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path))
    e, r = post_once(pool, key)
    assert (e.replica, r.status_code) == (0, 500) and "stand-in told to answer 500" in r.text
    assert pool.stats() == {0: ReplicaStats(requests=1)}
    assert pool.pick(key).replica == 0 and len(servers[1].requests) == 1  # the 503 round's retry only


def test_a_replica_dropping_the_connection_mid_answer_is_left_for_another(tmp_path, standins):
    servers = standins(2)
    publish(tmp_path, servers)
    key = key_homed_at(tmp_path, 0)
    servers[0].faults.drop_connection = True  # half an answer, then the connection closes
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), backoff_s=0.01)
    e, r = post_once(pool, key)
    assert (e.replica, r.status_code) == (1, 200) and r.json()["choices"][0]["message"]["content"] == "Echo: hi"
    assert [x.status for x in servers[0].requests] == [None]  # received, never wholly answered
    assert pool.stats() == {0: ReplicaStats(requests=1, failures=1), 1: ReplicaStats(requests=1, retries=1)}
    assert pool.pick(key).replica == 1


def test_retries_are_bounded(tmp_path, standins):
    servers = standins(3)
    for server in servers:
        server.faults.status = 503
    publish(tmp_path, servers)
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), max_retries=2, backoff_s=0.01)
    _, r = post_once(pool)
    assert r.status_code == 503  # the last answer, for the caller to report
    assert sum(len(s.requests) for s in servers) == 3
    assert sum(s.retries for s in pool.stats().values()) == 2


def test_ejected_replica_comes_back_with_its_next_heartbeat(tmp_path, standins):
    servers = standins(2)
    entries = publish(tmp_path, servers)
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0, backoff_s=0.01)
    key = key_homed_at(tmp_path, 0)

    def answered_by(k: str) -> int:
        e, r = post_once(pool, k)
        assert r.status_code == 200
        return e.replica

    servers[0].faults.status = 503
    assert answered_by(key) == 1
    servers[0].faults.status = 200  # healthy again, but the pool waits for proof of life
    assert [e.replica for e in pool.endpoints()] == [1]
    Registry(tmp_path).heartbeat(entries[0])
    assert [e.replica for e in pool.endpoints()] == [0, 1]
    assert answered_by(key) == 1  # the moved conversation stays
    assert answered_by(key_homed_at(tmp_path, 0, prefix="new")) == 0


# ---------------------------------------------------------------- an empty pool


def test_empty_pool_waits_for_a_replica(tmp_path, standins):
    (server,) = standins(1)
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0.05, wait_s=30)
    with pytest.raises(NoEndpointError):
        pool.pick("conv")

    async def scenario() -> tuple[Entry, httpx.Response]:
        async with client() as c:
            task = asyncio.create_task(pool.post(c, CHAT, chat("hi"), "conv"))
            await asyncio.sleep(0)  # the task runs until it waits for a replica
            assert not task.done()
            Registry(tmp_path).publish(entry(0, server.port))
            return await asyncio.wait_for(task, timeout=10)

    e, r = asyncio.run(scenario())
    assert (e.replica, r.status_code) == (0, 200)


def test_empty_pool_gives_up_after_wait_s_and_says_why(tmp_path, standins):
    (server,) = standins(1)
    server.faults.status = 503
    publish(tmp_path, [server])
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0.05, wait_s=0.3, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(NoEndpointError) as info:
        post_once(pool)
    assert 0.3 <= time.monotonic() - start < 5
    message = str(info.value)
    assert "after waiting 0.3s" in message and "1 replica ejected after a failure (back at its next heartbeat), retry" in message and str(tmp_path) in message
    assert pool.stats() == {0: ReplicaStats(requests=1, failures=1)}


def test_unreachable_replica_and_nothing_else_raises_the_transport_error(tmp_path):
    Registry(tmp_path).publish(entry(0, free_port("127.0.0.1")))  # nobody listens there
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), max_retries=0)
    with pytest.raises(httpx.ConnectError):
        post_once(pool)
    assert pool.stats() == {0: ReplicaStats(requests=1, failures=1)}


# ---------------------------------------------------------------- API keys


def test_the_replica_key_is_sent_and_read_once(tmp_path, standins, monkeypatch):
    key_file = Registry(tmp_path).create_api_key(NS)
    (server,) = standins(1, api_key=key_file.read_text())
    Registry(tmp_path).publish(entry(0, server.port, api_key_file=str(key_file)))
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path))
    assert post_once(pool, headers={"X-Trace": "1"})[1].status_code == 200
    key_file.write_text("rotated")  # cached: the pool does not read it per request
    assert post_once(pool)[1].status_code == 200
    assert post_once(pool, headers={"authorization": "Bearer wrong"})[1].status_code == 401  # the caller's own wins


def test_without_a_key_file_the_environment_key_is_used(tmp_path, standins, monkeypatch):
    (server,) = standins(1, api_key="from-env")
    Registry(tmp_path).publish(entry(0, server.port))
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path))
    assert post_once(pool)[1].status_code == 200


# ---------------------------------------------------------------- refresh cost


def test_refresh_parses_only_files_that_changed(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    entries = [entry(replica, 9) for replica in range(64)]
    for e in entries:
        registry.publish(e)
    parsed: list[Path] = []
    real_read = registry_module.read_entry
    monkeypatch.setattr(registry_module, "read_entry", lambda path: parsed.append(path) or real_read(path))
    pool = EndpointPool(SERVICE, NS, Registry(tmp_path), refresh_s=0)

    assert len(pool.endpoints()) == 64 and len(parsed) == 64
    parsed.clear()
    assert len(pool.endpoints()) == 64 and parsed == []
    registry.heartbeat(entries[5])
    registry.heartbeat(entries[9], state="draining")
    assert len(pool.endpoints()) == 63 and sorted(p.name for p in parsed) == ["5-test-5.json", "9-test-9.json"]
    parsed.clear()
    registry.remove(NS, SERVICE, 7)
    (tmp_path / NS / SERVICE / "70-test-70.json").write_text("{not json")
    assert len(pool.endpoints()) == 62 and [p.name for p in parsed] == ["70-test-70.json"]
    parsed.clear()
    assert len(pool.endpoints()) == 62 and parsed == []  # a broken file is not parsed (nor logged) again


def test_refresh_waits_for_refresh_s(tmp_path, monkeypatch):
    registry = Registry(tmp_path)
    registry.publish(entry(0, 9))
    scans = []
    real_scan = registry.scan
    monkeypatch.setattr(registry, "scan", lambda *a: scans.append(1) or real_scan(*a))
    pool = EndpointPool(SERVICE, NS, registry, refresh_s=3600)
    for i in range(100):
        pool.pick(f"conv-{i}")
    assert len(scans) == 1


def test_without_a_namespace_the_pool_keeps_the_one_it_found(tmp_path):
    registry = Registry(tmp_path)
    registry.publish(entry(0, 9))
    pool = EndpointPool(SERVICE, None, Registry(tmp_path), refresh_s=0)
    assert pool.pick("conv").namespace == NS
    registry.publish(Entry(**{**entry(0, 9).__dict__, "namespace": "run2"}))  # another run, same service
    assert [e.namespace for e in pool.endpoints()] == [NS]
