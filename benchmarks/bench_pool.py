"""What the endpoint pool costs: ``pool.post`` against a direct httpx client, and registry lookups.

    python benchmarks/bench_pool.py                      # against a stand-in server it starts
    python benchmarks/bench_pool.py --base-url http://127.0.0.1:18300/v1 --model smollm2 \\
        --requests 48 --rounds 4 --max-tokens 8          # against a running vLLM

Both clients talk to ONE server at the same concurrency, with the same AsyncClient settings.
Throughput: rounds alternate (direct, pool), (pool, direct), ... and the ratio is the median of
the rounds' ratios, so that a server warming up or a neighbour's burst does not favour one side.
Latency: every worker switches side at each request. The same comparison with the network
replaced by an in-process answer isolates the pool's own cost. Targets: throughput ratio
>= 0.97, added p50 latency < 1 ms. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

from jobs.pool import EndpointPool  # noqa: E402
from server import standin  # noqa: E402
from server.registry import Entry, Registry  # noqa: E402

NAMESPACE, SERVICE = "bench", "policy"
TARGET_RATIO, TARGET_ADDED_MS = 0.97, 1.0


@dataclass
class Side:
    name: str
    latencies_s: list[float] = field(default_factory=list)  # from the interleaved phase
    rates: list[float] = field(default_factory=list)  # requests per second, one per alternating round

    @property
    def throughput(self) -> float:
        return statistics.median(self.rates)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies_s) * 1000


@dataclass
class Comparison:
    direct: Side
    pool: Side

    @property
    def ratio(self) -> float:
        # Per round, then the median: a burst of a neighbour's load spoils one round, not the result.
        return statistics.median(p / d for p, d in zip(self.pool.rates, self.direct.rates))

    @property
    def added_ms(self) -> float:
        return self.pool.p50_ms - self.direct.p50_ms


# ---------------------------------------------------------------- server


def register(root: Path, base_url: str, model: str, api_key_file: str | None) -> Entry:
    url = urlsplit(base_url)
    if url.path.rstrip("/") != "/v1" or not url.hostname or not url.port:
        raise SystemExit(f"--base-url {base_url!r}: expected http://HOST:PORT/v1, as entries publish it")
    entry = Entry(
        namespace=NAMESPACE, service=SERVICE, replica=0, model=model, host=url.hostname, port=url.port,
        engine="bench", engine_version="0", job_id="bench", node="localhost", pid=0,
        state="ready", heartbeat_at=time.time(), api_key_file=api_key_file,
    )
    Registry(root).publish(entry)
    return entry


# ---------------------------------------------------------------- requests


Send = Callable[[int], Awaitable[httpx.Response]]


async def load(sides: list[tuple[Side, Send]], requests: int, concurrency: int, timed: bool) -> float:
    """``requests`` calls by ``concurrency`` workers, each worker switching sides at every request
    (not by request number: workers finishing in order would each keep one side, and whichever side
    is sent first in a burst is answered first); returns the wall time. ``timed``: each request's
    latency goes to its side."""
    next_index = iter(range(requests))

    async def worker(turn: int) -> None:
        for i in next_index:
            side, send = sides[turn % len(sides)]
            turn += 1
            start = time.perf_counter()
            response = await send(i)
            if timed:
                side.latencies_s.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise SystemExit(f"{side.name}: HTTP {response.status_code}: {response.text[:300]}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(turn) for turn in range(concurrency)))
    return time.perf_counter() - start


async def compare(
    args: argparse.Namespace, root: Path, entry: Entry, transport: httpx.AsyncBaseTransport | None = None
) -> Comparison:
    """Throughput from rounds that alternate (direct, pool), (pool, direct), ...; latency from a
    phase where every worker alternates request by request, so both sides meet the same server
    state. ``transport``: replace the network (to isolate the pool's own cost)."""
    pool = EndpointPool(SERVICE, NAMESPACE, Registry(root, ttl_s=math.inf))  # no server job heartbeats the entry
    key = entry.read_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{entry.base_url}/chat/completions"

    def body(i: int) -> dict:
        return {"model": entry.model, "messages": [{"role": "user", "content": f"Say hello ({i})"}],
                "max_tokens": args.max_tokens, "temperature": 0}

    def make_client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        return httpx.AsyncClient(timeout=args.timeout, limits=limits, trust_env=False, transport=transport)

    result = Comparison(Side("direct"), Side("pool"))
    async with make_client() as direct_client, make_client() as pool_client:
        async def send_direct(i: int) -> httpx.Response:
            return await direct_client.post(url, json=body(i), headers=headers)

        async def send_pooled(i: int) -> httpx.Response:
            return (await pool.post(pool_client, "/chat/completions", body(i), f"session-{i}"))[1]

        sides = [(result.direct, send_direct), (result.pool, send_pooled)]
        for side in sides:  # warm-up: open every connection on both sides; not measured
            await load([side], args.concurrency * 2, args.concurrency, timed=False)
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else reversed(sides):
                side[0].rates.append(args.requests / await load([side], args.requests, args.concurrency, timed=False))
        # As many as the rounds sent: at saturation a latency is mostly queueing, a wide spread.
        await load(sides, args.rounds * args.requests * 2, args.concurrency, timed=True)
    failed = {r: s for r, s in pool.stats().items() if s.failures}
    if failed:
        raise SystemExit(f"the pool saw failures, the numbers would not compare: {failed}")
    return result


def answer_locally(model: str) -> httpx.MockTransport:
    """An answer made in-process, the same for every request: what is left is the client's own cost."""
    content = json.dumps({"id": "x", "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}).encode()
    return httpx.MockTransport(lambda request: httpx.Response(200, content=content))


# ---------------------------------------------------------------- registry lookups


def per_second(call: Callable[[int], object], budget_s: float) -> float:
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s:
        call(calls)
        calls += 1
    return calls / elapsed


def lookups(sizes: list[int], budget_s: float) -> list[tuple[int, float, float, float]]:
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-registry-") as root:
            registry = Registry(root)
            for replica in range(size):
                registry.publish(Entry(
                    namespace=NAMESPACE, service=SERVICE, replica=replica, model="m", host="127.0.0.1",
                    port=10000 + replica, engine="bench", engine_version="0", job_id=str(replica),
                    node="localhost", pid=0, state="ready", heartbeat_at=time.time(),
                ))
            cached = EndpointPool(SERVICE, NAMESPACE, Registry(root))  # the default refresh_s
            every_pick = EndpointPool(SERVICE, NAMESPACE, Registry(root), refresh_s=0)  # a stat per file per pick
            rows.append((
                size,
                per_second(lambda i: cached.pick(f"session-{i}"), budget_s),
                per_second(lambda i: every_pick.pick(f"session-{i}"), budget_s),
                per_second(lambda i: registry.ready(SERVICE, NAMESPACE), budget_s),
            ))
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server's http://HOST:PORT/v1 (default: start a stand-in)")
    parser.add_argument("--model", default="stand-in-model", help="the served model name")
    parser.add_argument("--api-key-file", help="the server's API key, as entries point at it")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=100, help="per side and round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--sizes", default="1,64,1024", help="registry sizes for the lookup rates")
    parser.add_argument("--lookup-seconds", type=float, default=0.5, help="time per lookup measurement")
    args = parser.parse_args(argv)

    proc = None
    if args.base_url is None:
        proc, port = standin.start_process(args.model)  # a process of its own: it does not share our GIL
        args.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pool-") as root:
            entry = register(Path(root), args.base_url, args.model, args.api_key_file)
            network = asyncio.run(compare(args, Path(root), entry))
            local = asyncio.run(compare(args, Path(root), entry, answer_locally(args.model)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()

    print(f"server: {'a stand-in' if proc is not None else args.base_url}; concurrency {args.concurrency}; "
          f"throughput: {args.rounds} alternating rounds x {args.requests} requests per side; "
          f"latency: {args.rounds * args.requests * 2} requests, sides alternating")
    print(f"{'':12}{'direct req/s':>13}{'pool req/s':>11}{'ratio':>7}{'direct p50':>13}{'pool p50':>13}{'added p50':>12}")
    for name, c in (("server", network), ("in-process", local)):
        print(f"{name:12}{c.direct.throughput:13.1f}{c.pool.throughput:11.1f}{c.ratio:7.3f}"
              f"{c.direct.p50_ms:11.3f}ms{c.pool.p50_ms:11.3f}ms{c.added_ms:+10.3f}ms")
    print(f"targets against the server: ratio >= {TARGET_RATIO} "
          f"({'ok' if network.ratio >= TARGET_RATIO else 'MISSED'}), added p50 < {TARGET_ADDED_MS:g} ms "
          f"({'ok' if network.added_ms < TARGET_ADDED_MS else 'MISSED'})")
    print()
    print(f"{'entries':>8}{'pick/s (refresh 2 s)':>22}{'pick/s (refresh 0)':>20}{'Registry.ready/s (cold)':>25}")
    for size, cached, every_pick, cold in lookups([int(s) for s in args.sizes.split(",")], args.lookup_seconds):
        print(f"{size:8}{cached:22,.0f}{every_pick:20,.0f}{cold:25,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
