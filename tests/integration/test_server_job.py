"""A real vLLM replica started by server.job, checked as Gym would use it."""

import json
import os
import subprocess
import time

import httpx

from jobs.rollouts import DEMO_TASKS, CollectorConfig, SamplingParams, collect
from server.job import in_flight_requests
from server.registry import Registry
from server.verify import readiness_checks
from tests.support import SERVED_NAME, auth, engine_pids


def test_entry_carries_the_registry_contract(policy_server, registry_root):
    e = policy_server
    assert (e.namespace, e.service, e.replica, e.model, e.state) == ("itest", "policy", 0, SERVED_NAME, "ready")
    assert e.base_url == f"http://{e.host}:{e.port}/v1"
    assert e.engine == "vllm" and e.engine_version.startswith("0.32")
    os.kill(e.engine_pid, 0)  # the engine is alive and is the job's child
    assert open(f"/proc/{e.engine_pid}/stat").read().split()[3] == str(e.pid)
    first = e.heartbeat_at
    deadline = time.monotonic() + 10
    while Registry(registry_root).entries("itest")[0].heartbeat_at == first:
        assert time.monotonic() < deadline, "no heartbeat within 10 s (heartbeat_s=1)"
        time.sleep(0.2)


def test_readiness_checks_pass(policy_server):
    results = readiness_checks(
        policy_server.base_url, policy_server.model, api_key=policy_server.read_api_key(), tools=True, logprobs=True
    )
    assert {"models", "chat", "logprobs", "tokenize", "tool_required", "tool_named"} <= {r.name for r in results}
    assert all(r.ok for r in results), results


def test_requests_without_the_key_are_refused_and_the_key_stays_secret(policy_server, tmp_path_factory):
    body = {"model": policy_server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    url = f"{policy_server.base_url}/chat/completions"
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    assert httpx.post(url, json=body, timeout=60, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=body, timeout=60, headers=auth(policy_server)).status_code == 200
    key = policy_server.read_api_key()
    assert all(key not in cmd for cmd in engine_pids().values())  # not in any process's argv
    ps = subprocess.run(["ps", "auxww"], capture_output=True, text=True).stdout
    assert key not in ps
    logs = [p for p in tmp_path_factory.getbasetemp().rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert logs and all(key not in p.read_text(errors="replace") for p in logs)


def test_chat_returns_token_ids_and_logprobs(policy_server):
    body = {
        "model": policy_server.model, "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "return_token_ids": True,
    }
    data = httpx.post(
        f"{policy_server.base_url}/chat/completions", json=body, timeout=60, headers=auth(policy_server)
    ).json()
    choice = data["choices"][0]
    assert data["prompt_token_ids"] and choice["token_ids"]
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2


def test_collector_runs_text_and_tool_tasks_against_real_vllm(policy_server, registry_root, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    picked = [l for l in open(DEMO_TASKS).read().splitlines() if '"arith-00"' in l or '"calc-00"' in l or '"weather-00"' in l]
    assert len(picked) == 3
    tasks.write_text("\n".join(picked) + "\n")
    cfg = CollectorConfig(
        service="policy", tasks=str(tasks), output_dir=str(tmp_path / "out"), namespace="itest",
        registry=Registry(registry_root), num_repeats=2, max_concurrency=4,
        sampling=SamplingParams(temperature=0.7, max_tokens=64),
    )
    summary = collect(cfg)
    assert summary.rollouts_written + summary.failures == 6
    assert summary.rollouts_written >= 5
    rows = [json.loads(l) for l in open(summary.rollouts_path)]
    assert sorted((r["task_id"], r["repeat"]) for r in rows) == sorted({(r["task_id"], r["repeat"]) for r in rows})
    for row in rows:
        for turn in row["turns"]:
            assert turn["prompt_token_ids"] and turn["generation_token_ids"]
            assert len(turn["generation_logprobs"]) == len(turn["generation_token_ids"])
    tool_rows = [r for r in rows if r["task_id"] in ("calc-00", "weather-00")]
    assert tool_rows and all(r["tool_calls"] and r["turns"][0]["finish_reason"] == "tool_calls" for r in tool_rows)
    # A 135M model sometimes writes nonsense arguments; the tool answers with an error string then.
    results = [c["result"] for r in tool_rows for c in r["tool_calls"]]
    assert all(isinstance(x, str) and x for x in results)
    assert any("error" not in x for x in results), results


def test_in_flight_requests_reads_vllm_metrics(policy_server):
    # Draining waits for this to reach 0; an idle engine reports exactly 0, not "unknown".
    assert in_flight_requests(policy_server, "127.0.0.1") == 0
