"""On-policy multi-turn token ids on real vLLM (CPU build, the embedded SmolLM2): through the
gateway as NeMo Gym's training model config sends them, and in the built-in collector.

Each comparison runs the same conversations with splicing on and off in the same test, so that a
splice that does nothing fails it: off, a turn after a tool call re-renders the call's text into
other tokens (the demo's 0 of 12 before this existed)."""

from __future__ import annotations

import json

import httpx
import pytest

from jobs.rollouts import DEMO_TASKS, CollectorConfig, SamplingParams, collect
from server import onpolicy
from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry
from tests.support import SERVED_NAME, auth

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# What NeMo Gym's training model config asks for (responses_api_models/vllm_model/app.py).
GYM_TOKEN_FIELDS = {"logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}
# The vLLM CPU build now and then derails grammar-constrained decoding (server/verify.py: its
# tool checks take a second sample for the same reason): a forced tool call gets two tries.
TOOL_ATTEMPTS = 2


@pytest.fixture(scope="module")
def gateways(policy_server, registry_root):
    """The same replica behind a gateway that splices and one that does not."""
    registry = Registry(registry_root, ttl_s=10)
    key = policy_server.read_api_key()
    with GatewayThread(Gateway("policy", policy_server.namespace, registry, GatewaySettings(refresh_s=0.2), key)) as on, \
            GatewayThread(Gateway("policy", policy_server.namespace, registry,
                                  GatewaySettings(refresh_s=0.2, on_policy=False), key)) as off:
        yield on, off, auth(policy_server)


def _chat(url: str, headers: dict, body: dict) -> httpx.Response:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": SERVED_NAME, "max_tokens": 48,
                                                               **GYM_TOKEN_FIELDS, **body},
                          headers=headers, timeout=180)
    assert response.status_code == 200, response.text
    return response


def _forced_call(url: str, headers: dict, messages: list[dict], **body) -> httpx.Response:
    for _ in range(TOOL_ATTEMPTS):
        response = _chat(url, headers, {"messages": messages, "tools": TOOLS, "tool_choice": "required", **body})
        if response.json()["choices"][0]["message"].get("tool_calls"):
            return response
    pytest.fail(f"no tool call parsed in {TOOL_ATTEMPTS} forced attempts: {response.text[:500]}")


def _first_turn(url: str, headers: dict, city: str) -> tuple[list[dict], dict]:
    """A Gym-style first turn: a forced tool call, its ids put on the assistant message as NeMo Gym
    sends them back, and the tool's result."""
    messages = [{"role": "user", "content": f"What is the weather in {city}?"}]
    data = _forced_call(url, headers, messages, return_token_ids=True).json()
    message = data["choices"][0]["message"]
    assistant = {"role": "assistant", "content": message.get("content") or "", "tool_calls": message["tool_calls"],
                 "prompt_token_ids": data["prompt_token_ids"], "generation_token_ids": data["choices"][0]["token_ids"],
                 "generation_log_probs": [t["logprob"] for t in data["choices"][0]["logprobs"]["content"]]}
    tool = {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny, 21 C"}
    return messages + [assistant, tool], assistant


def test_the_gateway_splices_a_gym_style_turn_after_a_tool_call(gateways):
    on, off, headers = gateways
    contiguous = {"on": 0, "off": 0}
    cities = ("Paris", "Lima", "Oslo")
    for city in cities:
        messages, assistant = _first_turn(on.url, headers, city)
        before = assistant["prompt_token_ids"] + assistant["generation_token_ids"]
        for name, gw in (("on", on), ("off", off)):
            # The next turn forces a tool call again: the answer's calls come from the family's
            # parser (derender) after a spliced prompt.
            response = _forced_call(gw.url, headers, messages, return_token_ids=True)
            data = response.json()
            prompt = data["prompt_token_ids"]
            contiguous[name] += prompt[: len(before)] == before
            if name == "off":
                assert onpolicy.HEADER not in response.headers and onpolicy.RESPONSE_FIELD not in data
                continue
            assert response.headers[onpolicy.HEADER] == "spliced"
            assert data[onpolicy.RESPONSE_FIELD] == {"spliced": True, "prefix_tokens": len(before)}
            choice = data["choices"][0]
            ids = choice["token_ids"]
            assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
            # The bundle NeMo Gym reads from the message (no /tokenize call), the ids vLLM's own
            # chat route gives, and one token_id:N logprob per generated id.
            assert choice["message"]["prompt_token_ids"] == prompt and choice["message"]["generation_token_ids"] == ids
            content = choice["logprobs"]["content"]
            assert [t["token"] for t in content] == [f"token_id:{i}" for i in ids]
            assert choice["message"]["generation_log_probs"] == [t["logprob"] for t in content]
            assert data["usage"]["prompt_tokens"] == len(prompt)
            # NeMo Gym reads a turn's prompt ids from /tokenize when the message lacks them: the same ids.
            tokens = httpx.post(f"{gw.url}/tokenize", json={"model": SERVED_NAME, "messages": messages, "tools": TOOLS},
                                headers=headers, timeout=60).json()
            assert tokens["tokens"] == prompt and tokens[onpolicy.RESPONSE_FIELD]["spliced"]
    print(f"\n[on-policy gateway] turn after a tool call contiguous: on {contiguous['on']}/{len(cities)}, "
          f"off {contiguous['off']}/{len(cities)}")
    assert contiguous["on"] == len(cities)
    assert contiguous["off"] < len(cities)


def test_ids_of_another_history_are_said_and_counted_not_spliced(gateways):
    on, _, headers = gateways
    messages, assistant = _first_turn(on.url, headers, "Rome")
    # An earlier assistant turn the ids never saw: the turn ends no longer line up.
    edited = messages[:1] + [{"role": "assistant", "content": "Let me check."}, {"role": "user", "content": "Go on."}] \
        + messages[1:]
    response = _chat(on.url, headers, {"messages": edited, "tools": TOOLS})
    data = response.json()
    assert response.headers[onpolicy.HEADER] == "mismatch"
    assert data[onpolicy.RESPONSE_FIELD]["spliced"] is False
    assert "turn ends" in data[onpolicy.RESPONSE_FIELD]["reason"]
    assert data["choices"][0]["message"]["generation_token_ids"]  # still answered, from the re-rendered prompt
    metrics = httpx.get(f"{on.url}/metrics", headers=headers, timeout=10).text  # every route but /health takes the key
    assert 'gateway_on_policy_total{outcome="mismatch"} 1.0' in metrics, metrics


def test_max_tokens_is_capped_to_what_the_context_leaves(gateways, policy_server):
    on, off, headers = gateways
    messages, _ = _first_turn(on.url, headers, "Kyiv")
    context = httpx.get(f"{policy_server.base_url}/models", headers=headers, timeout=10).json()["data"][0]["max_model_len"]
    body = {"model": SERVED_NAME, "messages": messages, "tools": TOOLS, "max_tokens": context * 2, **GYM_TOKEN_FIELDS}
    # Unspliced, vLLM refuses a request that cannot fit; spliced, it is capped and answered.
    assert httpx.post(f"{off.url}/v1/chat/completions", json=body, headers=headers, timeout=60).status_code == 400
    data = _chat(on.url, headers, {**body, "max_tokens": context * 2, "temperature": 0}).json()
    assert data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"] <= context


def _tool_tasks(tmp_path, count: int):
    lines = [line for line in open(DEMO_TASKS).read().splitlines() if '"tools"' in line][:count]
    path = tmp_path / "tool_tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_collector_splices_its_own_turns_on_the_demo_tool_tasks(policy_server, registry_root, tmp_path):
    tasks = _tool_tasks(tmp_path, 6)
    summaries = {}
    for on_policy in (True, False):
        cfg = CollectorConfig(
            service="policy", tasks=str(tasks), output_dir=str(tmp_path / f"out-{on_policy}"), namespace="itest",
            registry=Registry(registry_root), num_repeats=1, max_concurrency=6, on_policy=on_policy,
            sampling=SamplingParams(temperature=0.7, max_tokens=64),
        )
        summaries[on_policy] = summary = collect(cfg)
        rows = [json.loads(line) for line in open(summary.rollouts_path)]
        # Rewards and tool calls as before: a float per row, calls parsed into the row.
        assert all(isinstance(r["reward"], float) for r in rows)
        assert any(r["tool_calls"] for r in rows)
        assert (summary.prefix_contiguous, summary.prefix_checked) == onpolicy.prefix_contiguity(
            [[(t["prompt_token_ids"], t["generation_token_ids"]) for t in r["turns"]] for r in rows])
    on, off = summaries[True], summaries[False]
    print(f"\n[on-policy collector] demo tool tasks: contiguity on {on.prefix_contiguous}/{on.prefix_checked}, "
          f"off {off.prefix_contiguous}/{off.prefix_checked}; mean reward on {on.mean_reward}, off {off.mean_reward}")
    assert on.prefix_checked > 0 and on.prefix_contiguous == on.prefix_checked
    assert off.prefix_checked > 0 and off.prefix_contiguous < off.prefix_checked
