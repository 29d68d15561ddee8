"""What the gateway (server/gateway.py) costs, and why it talks to replicas with aiohttp.

    python benchmarks/bench_gateway.py [--rounds 3] [--requests 400] [--vllm]

Every server is a process of its own: the backend (the stand-in, ``server/standin.py``, with a
simulated decode time; or an "instant" backend, below), the gateway (``python -m server.gateway``)
and this script, the client (aiohttp, concurrency 16 and 256). Printed, each measured in this run:

1. gateway vs direct to one replica: throughput ratio (median over rounds that alternate which
   side goes first) and added p50 latency (a phase where every worker alternates sides request by
   request), against the stand-in (not streaming: the stand-in does not stream) and against the
   instant backend (streaming and not). Targets: ratio >= 0.97 and added p50 <= 1 ms against the
   stand-in. Against the instant backend the gateway, not the backend, is the bottleneck: its
   own capacity is its requests per CPU-second (``/proc/PID/stat``; target >= 5,000 on one core),
   which, unlike its requests/s there, the client and the backend sharing the cores hardly lower.
2. the gateway's RSS with 1,000 streams open at once (target <= 200 MB).
3. the routing decision's cost with 1, 16 and 256 replicas (should stay flat).
4. the upstream client choice: aiohttp vs httpx.AsyncClient, the same requests against the
   instant backend from one process (the gateway's situation: one event loop, one core).
5. with ``--vllm``: gateway vs direct against one real vLLM (CPU build, the embedded SmolLM2),
   concurrency 16 and 256, streaming and not, 16 greedy tokens per answer (target: within
   noise; several minutes on a 2-core machine).

The instant backend (``--serve-instant``, aiohttp.web) answers at once: a fixed chat completion,
or with ``"stream": true`` 16 Server-Sent Events and ``data: [DONE]`` (after ``hold_s`` seconds
when the body says so). On a 2-core machine the client, the gateway and the backend share the
cores: the direct side has one process less to feed, so ratios are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

from server import standin  # noqa: E402
from server.engines import EngineSpec, build_launch  # noqa: E402
from server.gateway import Gateway, GatewaySettings  # noqa: E402
from server.registry import Entry, Registry  # noqa: E402

NAMESPACE, SERVICE, MODEL = "bench", "policy", "bench-model"
CHAT = "/v1/chat/completions"
STREAM_EVENTS = 16


# ---------------------------------------------------------------- the instant backend


def serve_instant() -> None:
    from aiohttp import web

    answer = json.dumps(standin.chat_completion({"messages": [{"role": "user", "content": "bench"}]}, MODEL)).encode()
    event = b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                                    "model": MODEL, "choices": [{"index": 0, "delta": {"content": "x"}}]}).encode()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=answer, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event + b"\n\n")
        if body.get("hold_s"):
            await asyncio.sleep(body["hold_s"])
        for _ in range(STREAM_EVENTS - 1):
            await response.write(event + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post(CHAT, chat)
    app.router.add_get("/health", health)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        print(f"instant backend at http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    import uvloop
    uvloop.run(run())


def start(argv: list[str], marker: str) -> tuple[subprocess.Popen, str]:
    """A server process; returns it and the URL its first line names after ``marker``."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    if marker not in line:
        proc.kill()
        raise SystemExit(f"{argv}: did not start: {line!r}")
    return proc, line.strip().split(marker, 1)[1].strip().removesuffix("/v1")


def publish(root: Path, url: str, replica: int = 0) -> None:
    host, port = url.removeprefix("http://").split(":")
    Registry(root).publish(Entry(
        namespace=NAMESPACE, service=SERVICE, replica=replica, model=MODEL, host=host, port=int(port),
        engine="bench", engine_version="0", job_id=f"bench-{replica}", node="localhost", pid=os.getpid(),
        state="ready", heartbeat_at=time.time() + 3600,  # no heartbeats during the benchmark
    ))


def gateway_process(root: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    return start([sys.executable, "-m", "server.gateway", "--service", SERVICE, "--namespace", NAMESPACE,
                  "--registry-root", str(root), "--port", "0", "--health-interval-s", "60", *flags], "serving at ")


# ---------------------------------------------------------------- load


Side = tuple[str, str, aiohttp.ClientSession]  # name, URL, the client's connections to it


async def load(sides: list[Side], body: dict, concurrency: int, requests: int,
               stream: bool) -> tuple[float, dict[str, list[float]]]:
    """``requests`` chat requests from ``concurrency`` workers, each worker taking ``sides`` in
    turn, request by request; requests/s and the latencies (s) by side."""
    latencies: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    left = requests
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}

    async def worker(turn: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            name, url, session = sides[turn % len(sides)]
            turn += 1
            t = time.perf_counter()
            async with session.post(url + CHAT, data=data, headers=headers) as r:
                if stream:
                    async for _ in r.content.iter_any():
                        pass
                else:
                    await r.read()
                assert r.status == 200, r.status
            latencies[name].append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return requests / (time.perf_counter() - started), latencies


def cpu_s(pid: int) -> float:
    """CPU time process ``pid``'s threads used so far: schedstat counts nanoseconds, where
    /proc/PID/stat counts 10 ms ticks, too coarse for a short round."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


async def compare(direct: str, gateway: str, gateway_pid: int, body: dict, concurrency: int, requests: int,
                  rounds: int, stream: bool) -> dict:
    """Throughput from rounds that alternate which side goes first; latency from a phase where
    every worker alternates sides request by request (both meet the same backend load and the
    same moment of the machine's other work); the gateway's requests per CPU-second of its own
    (its capacity on one core, which the other processes sharing the cores hardly lower). Each
    side keeps its connections across warm-up and rounds, as a client's pool does: no round pays
    ``concurrency`` connects at once."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as to_direct, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as to_gateway:
        sides = {"direct": ("direct", direct, to_direct), "gateway": ("gateway", gateway, to_gateway)}
        rates: dict[str, list[float]] = {"direct": [], "gateway": []}
        per_cpu_s: list[float] = []
        for side in sides.values():  # warm-up: every connection open
            await load([side], body, concurrency, max(4 * concurrency, 100), stream)
        for i in range(rounds):
            for name in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                cpu_before = cpu_s(gateway_pid)
                rate, _ = await load([sides[name]], body, concurrency, requests, stream)
                rates[name].append(rate)
                if name == "gateway":
                    per_cpu_s.append(requests / max(cpu_s(gateway_pid) - cpu_before, 1e-3))
        _, latencies = await load(list(sides.values()), body, concurrency, requests * 2, stream)
    p50 = {name: statistics.median(lat) * 1000 for name, lat in latencies.items()}
    return {
        "ratio": statistics.median(g / d for g, d in zip(rates["gateway"], rates["direct"])),
        "direct_rps": statistics.median(rates["direct"]), "gateway_rps": statistics.median(rates["gateway"]),
        "gateway_per_cpu_s": statistics.median(per_cpu_s),
        "p50_direct_ms": p50["direct"], "added_p50_ms": p50["gateway"] - p50["direct"],
    }


def row(label: str, r: dict) -> None:
    print(f"  {label:<30} ratio {r['ratio']:.3f}   direct {r['direct_rps']:6.0f} req/s   "
          f"gateway {r['gateway_rps']:6.0f} req/s ({r['gateway_per_cpu_s']:5.0f} per CPU-s)   "
          f"p50 direct {r['p50_direct_ms']:6.2f} ms   added p50 {r['added_p50_ms']:+.2f} ms", flush=True)


# ---------------------------------------------------------------- RSS, routing, clients


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def open_streams(url: str, count: int, hold_s: float, pid: int) -> tuple[float, float]:
    """``count`` streams held open at once; the gateway's RSS before and while they are open."""
    before = rss_mb(pid)
    data = json.dumps({"model": MODEL, "messages": [], "stream": True, "hold_s": hold_s}).encode()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        opened = asyncio.Event()
        first_seen = 0
        peak = before

        async def one() -> None:
            nonlocal first_seen
            async with session.post(url + CHAT, data=data, headers={"Content-Type": "application/json"}) as r:
                await r.content.readany()
                first_seen += 1
                if first_seen == count:
                    opened.set()
                await r.read()

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        await asyncio.wait_for(opened.wait(), 120)
        peak = max(peak, rss_mb(pid))
        await asyncio.gather(*tasks)
    return before, peak


def routing_cost(replicas: int, picks: int = 20000) -> tuple[float, float]:
    """Microseconds per routing decision: a new session, and a known session's next turn."""
    with tempfile.TemporaryDirectory() as tmp:
        for replica in range(replicas):
            publish(Path(tmp), f"http://127.0.0.1:{20000 + replica}", replica)
        gw = Gateway(SERVICE, NAMESPACE, Registry(Path(tmp)), GatewaySettings())
        gw.view.refresh()
        gw._sync()
        keys = [f"s{i}" for i in range(picks)]
        t = time.perf_counter()
        for key in keys:
            gw._pick(key)
        new = (time.perf_counter() - t) / picks * 1e6
        t = time.perf_counter()
        for key in keys:
            gw._pick(key)
        known = (time.perf_counter() - t) / picks * 1e6
    return new, known


async def client_rate(kind: str, url: str, concurrency: int, requests: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "bench"}]}
    left = requests
    if kind == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        data = json.dumps(body).encode()

        async def one() -> None:
            async with session.post(url + CHAT, data=data, headers={"Content-Type": "application/json"}) as r:
                await r.read()
    else:
        session = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
                                    trust_env=False, timeout=60)

        async def one() -> None:
            (await session.post(url + CHAT, json=body)).raise_for_status()

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)
    finally:
        await (session.close() if kind == "aiohttp" else session.aclose())


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=400, help="per round and side (x4 at concurrency 256)")
    parser.add_argument("--seconds-per-token", type=float, default=0.005, help="the stand-in's simulated decode")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--vllm", action="store_true", help="also against a real vLLM (CPU build): minutes")
    parser.add_argument("--serve-instant", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_instant:
        serve_instant()
        return

    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as standin_root, tempfile.TemporaryDirectory() as instant_root:
            stand_proc, stand_port = standin.start_process(MODEL, "--seconds-per-token", str(args.seconds_per_token))
            procs.append(stand_proc)
            stand_url = f"http://127.0.0.1:{stand_port}"
            instant_proc, instant_url = start([sys.executable, __file__, "--serve-instant"], "instant backend at ")
            procs.append(instant_proc)
            publish(Path(standin_root), stand_url)
            publish(Path(instant_root), instant_url)
            gw_stand, gw_stand_url = gateway_process(Path(standin_root))
            gw_instant, gw_instant_url = gateway_process(Path(instant_root))
            procs += [gw_stand, gw_instant]

            chat = {"model": MODEL, "messages": [{"role": "user", "content": "bench"}]}
            print(f"gateway vs direct, {args.rounds} alternating rounds each (the stand-in: "
                  f"{args.seconds_per_token} s/token, ~{len('Echo: bench')} tokens per answer)")
            for concurrency in (16, 256):
                n = args.requests * (4 if concurrency == 256 else 1)
                row(f"stand-in, c={concurrency}", asyncio.run(
                    compare(stand_url, gw_stand_url, gw_stand.pid, chat, concurrency, n, args.rounds, stream=False)))
                for stream in (False, True):
                    body = {**chat, "stream": True} if stream else chat
                    row(f"instant, c={concurrency}, {'streaming' if stream else 'not streaming'}",
                        asyncio.run(compare(instant_url, gw_instant_url, gw_instant.pid, body, concurrency, n * 2,
                                            args.rounds, stream)))

            before, peak = asyncio.run(open_streams(gw_instant_url, args.streams, 2.0, gw_instant.pid))
            print(f"gateway RSS: {before:.0f} MB idle, {peak:.0f} MB with {args.streams} streams open")

            print("routing decision (in process, no HTTP): new session / known session")
            for replicas in (1, 16, 256):
                new, known = routing_cost(replicas)
                print(f"  {replicas:>3} replicas: {new:.2f} us / {known:.2f} us")

            print("upstream client, one process against the instant backend (requests/s)")
            for concurrency in (16, 256):
                n = args.requests * 5
                rates: dict[str, float] = {}
                for kind in ("aiohttp", "httpx", "httpx", "aiohttp"):  # best of two, in alternating order
                    rates[kind] = max(rates.get(kind, 0.0), asyncio.run(client_rate(kind, instant_url, concurrency, n)))
                print(f"  c={concurrency}: aiohttp {rates['aiohttp']:.0f}   httpx {rates['httpx']:.0f}   "
                      f"(aiohttp / httpx {rates['aiohttp'] / rates['httpx']:.2f})")
            if args.vllm:
                vllm_rows(procs, args.rounds)
    finally:
        stop(procs)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to every process started, SIGKILL to one not gone within 10 s."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vllm_rows(procs: list[subprocess.Popen], rounds: int) -> None:
    """Gateway vs direct against one real vLLM replica (its own registry and gateway)."""
    # The embedded default's engine flags (conf/server/vllm_cpu.yaml), no tool parser needed here.
    url = start_vllm(procs, EngineSpec(served_name=MODEL, max_model_len=2048, kv_cache_memory_bytes=268435456,
                                       enforce_eager=True, enable_auto_tool_choice=False))
    with tempfile.TemporaryDirectory() as root:
        publish(Path(root), url)
        gateway, gateway_url = gateway_process(Path(root))
        procs.append(gateway)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to twenty."}], "max_tokens": 16,
                "temperature": 0, "ignore_eos": True}
        print(f"gateway vs direct against vLLM (CPU build), 16 tokens per answer, {rounds} alternating rounds")
        for concurrency in (16, 256):
            for stream in (False, True):
                row(f"vLLM, c={concurrency}, {'streaming' if stream else 'not streaming'}", asyncio.run(compare(
                    url, gateway_url, gateway.pid, {**body, "stream": stream}, concurrency, concurrency * 2, rounds,
                    stream)))


def start_vllm(
    procs: list[subprocess.Popen], spec: EngineSpec, api_key: str | None = None, without: tuple[str, ...] = (),
) -> str:
    """A real vLLM (CPU build) serving the embedded SmolLM2 (appended to ``procs``); its root URL once
    healthy. ``without``: words of the project's command line left out (a baseline without a flag)."""
    from server.job import free_port
    from server.models import prepare

    port = free_port("127.0.0.1")
    launch = build_launch(spec, str(prepare("smollm2_135m")), "127.0.0.1", port, api_key)
    argv = [word for word in launch.argv if word not in without]
    log = tempfile.NamedTemporaryFile(prefix="bench-vllm-", suffix=".log", delete=False)
    engine = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **launch.env})
    procs.append(engine)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + launch.health_path, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if engine.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"vLLM did not start; its log: {log.name}")
        time.sleep(1)
    return url


if __name__ == "__main__":
    main()
