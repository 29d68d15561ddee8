"""What the engines' key check (server.auth.RequireKey, loaded into vLLM with --middleware) adds to a request.

    python benchmarks/bench_engine_auth.py [--requests 200] [--control]

Two real vLLM engines (CPU build, the embedded SmolLM2, the embedded default's flags), the same
key in both (vLLM's own check on in both): one as the project starts it (``--middleware
server.auth.RequireKey``), one without the middleware. One client sends each request to both, in
alternating order, one at a time (no queueing: what is measured is a request's own latency):

1. a small chat completion (greedy, ``max_tokens`` 1 and 8) and ``POST /tokenize``: p50 and p90
   of each engine, the ratio with/without and the added milliseconds (p50 difference).
2. the middleware's own cost, in process: a request through ``RequireKey`` into a bare ASGI app
   vs into that app directly (microseconds, free of the engines' noise).

On a 2-core machine the engines share the cores with the client: compare the p50 differences with
the noise floor, which ``--control`` measures (both engines without the middleware: an A/A run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

from bench_gateway import start_vllm, stop  # noqa: E402
from server.auth import RequireKey  # noqa: E402
from server.engines import VLLM_KEY_MIDDLEWARE, EngineSpec  # noqa: E402

MODEL = "bench-model"
KEY = "sk-bench-engine-auth"


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p90, in milliseconds."""
    cuts = statistics.quantiles(samples, n=10)
    return statistics.median(samples) * 1000, cuts[8] * 1000


def measure(urls: dict[str, str], path: str, body: dict, requests: int) -> dict[str, list[float]]:
    """Each request to every engine, the order alternating: latencies in seconds, by engine."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
               for name, url in urls.items()}
    try:
        for name, client in clients.items():  # warm-up: connections, first-request paths
            for _ in range(3):
                client.post(path, json=body).raise_for_status()
        names = list(urls)
        for i in range(requests):
            for name in names if i % 2 == 0 else reversed(names):
                started = time.perf_counter()
                clients[name].post(path, json=body).raise_for_status()
                times[name].append(time.perf_counter() - started)
    finally:
        for client in clients.values():
            client.close()
    return times


def row(label: str, times: dict[str, list[float]]) -> None:
    (guarded_p50, guarded_p90), (bare_p50, bare_p90) = percentiles(times["with"]), percentiles(times["without"])
    print(f"  {label:<22} with {guarded_p50:7.2f} / {guarded_p90:7.2f} ms   without {bare_p50:7.2f} / "
          f"{bare_p90:7.2f} ms   ratio p50 {guarded_p50 / bare_p50:.3f}   added p50 {guarded_p50 - bare_p50:+.2f} ms")


def in_process_cost(requests: int = 20000) -> tuple[float, float]:
    """Microseconds per request into a bare ASGI app: through RequireKey, and directly."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
             "headers": [(b"host", b"x"), (b"content-type", b"application/json"), (b"user-agent", b"bench"),
                         (b"authorization", f"Bearer {KEY}".encode())]}

    async def run(target) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            await target(scope, None, send)
        return (time.perf_counter() - started) / requests * 1e6

    guarded = RequireKey(app, KEY)
    best = {"with": float("inf"), "without": float("inf")}
    for _ in range(5):  # best of 5, alternating
        best["with"] = min(best["with"], asyncio.run(run(guarded)))
        best["without"] = min(best["without"], asyncio.run(run(app)))
    return best["with"], best["without"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per engine and kind of request")
    parser.add_argument("--control", action="store_true", help="both engines without the middleware (noise floor)")
    args = parser.parse_args()

    guarded, bare = in_process_cost()
    print(f"in process: {guarded:.2f} us through RequireKey vs {bare:.2f} us direct: +{guarded - bare:.2f} us a request")

    # The embedded default's engine flags (conf/server/vllm_cpu.yaml), no tool parser needed here.
    spec = EngineSpec(served_name=MODEL, max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
                      enable_auto_tool_choice=False)
    procs: list[subprocess.Popen] = []
    try:
        # One after the other: two starting at once on 2 cores take twice as long each.
        bare = ("--middleware", VLLM_KEY_MIDDLEWARE)
        urls = {"with": start_vllm(procs, spec, KEY, without=bare if args.control else ()),
                "without": start_vllm(procs, spec, KEY, without=bare)}
        print(f"vLLM (CPU build) with / without the middleware{' (control: neither has it)' if args.control else ''}, "
              f"{args.requests} requests each, alternating, p50 / p90")
        for tokens in (1, 8):
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}],
                    "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            row(f"chat, {tokens} token(s)", measure(urls, "/v1/chat/completions", chat, args.requests))
        row("/tokenize", measure(urls, "/tokenize", {"model": MODEL, "prompt": "Count to twenty."}, args.requests))
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
