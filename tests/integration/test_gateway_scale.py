"""64 stand-in replicas behind one gateway (issue 11): sessions spread evenly, and 8 replicas
SIGKILLed while requests are in flight fail no request that had not started streaming.

The replicas are stand-in processes (server/standin.py), each serving its own model name, so
that every answer names the replica that wrote it: the counts below come from the replicas'
answers, not from the gateway's metrics. Requests carry no ``model`` (a stand-in answers any
request without one with its own name)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import httpx

from server import standin
from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry
from tests.support import NAMESPACE as NS, SERVICE, entry

REPLICAS, KILLED, SESSIONS = 64, 8, 640
CHAT = "/v1/chat/completions"


def turn(session: int, n: int) -> dict:
    # ~20 byte-tokens at 0.01 s each: a turn is in flight for ~0.2 s.
    return {"messages": [{"role": "user", "content": f"session {session} turn {n}"}], "max_tokens": 64}


async def conversations(url: str, turns: range, meanwhile=None) -> list[tuple[int, int, int | str, str | None]]:
    """Every session's ``turns``, one after another, all sessions at once (and ``meanwhile()``):
    (session, turn, status or error, the replica that answered). The client is aiohttp: httpx's
    async client costs several times its CPU per request (benchmarks/bench_gateway.py), and this
    machine has two cores for the client, the gateway and 64 replicas."""
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=SESSIONS),
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one(session: int) -> list:
            done = []
            for n in turns:
                try:
                    async with client.post(CHAT, json=turn(session, n), headers={"X-Session-ID": f"s{session}"}) as r:
                        answer = await r.json() if r.status == 200 else None
                        done.append((session, n, r.status, answer and answer["model"]))
                except aiohttp.ClientError as e:  # the gateway closed the connection: counted as failed
                    done.append((session, n, type(e).__name__, None))
            return done

        tasks = [asyncio.create_task(one(s)) for s in range(SESSIONS)]
        if meanwhile is not None:
            await meanwhile(client)
        return [answer for task in tasks for answer in await task]


async def running(client: aiohttp.ClientSession, port: int) -> int:
    async with client.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return int(float(re.search(r"num_requests_running\{[^}]*\} (\S+)", text).group(1)))


def test_64_replicas_spread_sessions_evenly_and_8_killed_fail_no_request(tmp_path):
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # each start waits for its process to listen
        procs = list(pool.map(lambda i: standin.start_process(f"replica-{i}", "--seconds-per-token", "0.01"),
                              range(REPLICAS)))
    try:
        registry = Registry(tmp_path)
        for replica, (_, port) in enumerate(procs):
            registry.publish(entry(replica, port))
        print(f"\n{REPLICAS} stand-in processes up in {time.monotonic() - started:.1f} s")
        # A TTL that outlives the test: the entries are published once, never heartbeat.
        gateway = Gateway(SERVICE, NS, Registry(tmp_path, ttl_s=600),
                          GatewaySettings(refresh_s=0.5, health_interval_s=2.0, wait_s=10.0))
        with GatewayThread(gateway) as gw:
            # 1. Every session's first three turns, all sessions at once.
            t0 = time.monotonic()
            first = asyncio.run(conversations(gw.url, range(3)))
            print(f"phase 1: {len(first)} requests in {time.monotonic() - t0:.1f} s")
            assert [a for a in first if a[2] != 200] == []
            home: dict[int, str] = {}
            for session, _, _, replica in first:
                assert home.setdefault(session, replica) == replica, f"session {session} moved"
            per_replica = collections.Counter(home.values())
            requests = collections.Counter(replica for *_, replica in first)
            even = SESSIONS / REPLICAS
            spread = max(abs(per_replica[f"replica-{i}"] - even) for i in range(REPLICAS)) / even
            print(f"sessions per replica: min {min(per_replica.values())} max {max(per_replica.values())} "
                  f"(even {even:g}, worst {spread:.0%} off); requests per replica: min {min(requests.values())} "
                  f"max {max(requests.values())}")
            assert len(per_replica) == REPLICAS and spread <= 0.10, sorted(per_replica.values())

            # 2. Two more turns each; 8 replicas are SIGKILLed once each has requests in flight.
            victims = list(range(KILLED))
            in_flight: dict[int, int] = {}  # victim -> requests running on it when it was killed

            async def kill_each_when_busy(client: aiohttp.ClientSession) -> None:
                deadline = time.monotonic() + 30
                while len(in_flight) < KILLED:
                    assert time.monotonic() < deadline, f"victims never busy: {in_flight}"
                    for v in victims:
                        if v not in in_flight and (n := await running(client, procs[v][1])):
                            os.kill(procs[v][0].pid, signal.SIGKILL)
                            in_flight[v] = n
                    await asyncio.sleep(0.005)

            t0 = time.monotonic()
            second = asyncio.run(conversations(gw.url, range(3, 5), kill_each_when_busy))
            print(f"phase 2: {len(second)} requests in {time.monotonic() - t0:.1f} s; killed {KILLED} replicas "
                  f"each with requests in flight ({sum(in_flight.values())} in all: {sorted(in_flight.values())})")
            metrics = httpx.get(f"{gw.url}/metrics", trust_env=False).text
            retries = re.search(r"^gateway_retries_total (\S+)$", metrics, re.M).group(1)
        # No request streams here (NeMo Gym does not stream either): none had started streaming when
        # its replica died, so every one must have succeeded.
        failed = [a for a in second if a[2] != 200]
        print(f"failed: {len(failed)} of {len(second)} (mid-stream: 0, none streamed); gateway retries: {retries}")
        assert failed == []
        assert all(procs[v][0].wait(timeout=10) == -signal.SIGKILL for v in victims)
        dead = {f"replica-{v}" for v in victims}
        later: dict[int, set[str]] = collections.defaultdict(set)
        for session, _, _, replica in second:
            later[session].add(replica)
        moved = [s for s in home if home[s] in dead]
        for session, replicas in later.items():
            if session in moved:  # turns before the kill answered at home; after it, one new home (if any was left)
                assert len(replicas - dead) <= 1, (session, replicas)
            else:  # its replica lived: it never moved
                assert replicas == {home[session]}, (session, home[session], replicas)
        print(f"{len(moved)} sessions moved off the killed replicas, each to one new replica")
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()
