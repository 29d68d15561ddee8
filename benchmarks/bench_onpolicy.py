"""What on-policy splicing (server/onpolicy.py, ``gateway.on_policy``) adds to a request.

    python benchmarks/bench_onpolicy.py [--requests 60] [--max-tokens 8]

One real vLLM (CPU build, the embedded SmolLM2 with its tool template and parser) behind two
gateway processes on one registry: one splices, one passes requests on unchanged
(``--no-on-policy``). The request is a NeMo Gym style second turn: the first turn's forced tool
call with its token ids on the assistant message, the tool's result, greedy decoding of
``--max-tokens`` tokens. Workers alternate the two gateways request by request (both meet the same
engine load and the same moment of the machine's other work) at concurrency 1 and 4. Printed,
each measured in this run: p50 latency of each side and the difference (the added latency per
spliced request; target <= 5 ms), and each gateway's CPU time per request.

The spliced side makes four requests to the engine where the plain side makes one: two renders
(the whole conversation, and the messages up to the last assistant turn: where the splice goes)
at once, then generate from the spliced ids, then derender (tool calls parsed, logprobs). Each is
a round trip through vLLM's API server on the same 2 cores as the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gateway, which puts the checkout on the path
from bench_gateway import MODEL, cpu_s, gateway_process, load, publish, start_vllm  # noqa: E402

from server.engines import EngineSpec  # noqa: E402
from tests.support import CHAT_TEMPLATE  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def second_turn(gateway_url: str, max_tokens: int) -> dict:
    """A conversation's second request as NeMo Gym's training model config sends it."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for _ in range(5):  # the CPU build now and then derails a constrained call (server/verify.py)
        data = httpx.post(f"{gateway_url}/v1/chat/completions", timeout=120, json={
            "model": MODEL, "messages": messages, "tools": TOOLS, "tool_choice": "required", "max_tokens": 48,
            "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
        }).json()
        message = data["choices"][0]["message"]
        if message.get("tool_calls"):
            break
    else:
        raise SystemExit(f"no tool call in 5 forced attempts: {data}")
    assistant = {"role": "assistant", "content": message.get("content") or "", "tool_calls": message["tool_calls"],
                 "prompt_token_ids": data["prompt_token_ids"], "generation_token_ids": data["choices"][0]["token_ids"],
                 "generation_log_probs": [t["logprob"] for t in data["choices"][0]["logprobs"]["content"]]}
    tool = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny, 21 C"}
    return {"model": MODEL, "messages": messages + [assistant, tool], "tools": TOOLS, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 0,
            "return_tokens_as_token_ids": True}


async def measure(plain: tuple[str, int], spliced: tuple[str, int], body: dict, concurrency: int,
                  requests: int) -> dict:
    async with aiohttp.ClientSession() as to_plain, aiohttp.ClientSession() as to_spliced:
        sides = [("plain", plain[0], to_plain), ("spliced", spliced[0], to_spliced)]
        await load(sides, body, concurrency, 4 * concurrency, stream=False)  # warm-up: connections, caches
        cpu = {name: cpu_s(pid) for name, (_, pid) in (("plain", plain), ("spliced", spliced))}
        _, latencies = await load(sides, body, concurrency, requests * 2, stream=False)
        cpu = {name: (cpu_s(pid) - cpu[name]) / requests for name, (_, pid) in (("plain", plain), ("spliced", spliced))}
    p50 = {name: statistics.median(lat) * 1000 for name, lat in latencies.items()}
    return {"p50": p50, "added_ms": p50["spliced"] - p50["plain"], "cpu_ms": {k: v * 1000 for k, v in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="per side and concurrency")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    procs = []
    try:
        spec = EngineSpec(served_name=MODEL, max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
                          tool_call_parser="hermes", tool_strict_level="parameter",
                          chat_template=str(CHAT_TEMPLATE))
        url = start_vllm(procs, spec)
        with tempfile.TemporaryDirectory() as root:
            publish(Path(root), url)
            spliced_gw, spliced_url = gateway_process(Path(root))
            plain_gw, plain_url = gateway_process(Path(root), "--no-on-policy")
            procs += [spliced_gw, plain_gw]
            body = second_turn(spliced_url, args.max_tokens)
            prompt = len(body["messages"][1]["prompt_token_ids"]) + len(body["messages"][1]["generation_token_ids"])
            print(f"on-policy splicing through the gateway vs the same request passed on unchanged: vLLM (CPU "
                  f"build), a {prompt}-token prefix, {args.max_tokens} greedy tokens, {args.requests} requests a side")
            for concurrency in (1, 4):
                r = asyncio.run(measure((plain_url, plain_gw.pid), (spliced_url, spliced_gw.pid), body, concurrency,
                                        args.requests))
                print(f"  c={concurrency}: p50 plain {r['p50']['plain']:7.1f} ms   spliced {r['p50']['spliced']:7.1f} ms"
                      f"   added {r['added_ms']:+6.1f} ms   gateway CPU per request: plain "
                      f"{r['cpu_ms']['plain']:.2f} ms, spliced {r['cpu_ms']['spliced']:.2f} ms", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
