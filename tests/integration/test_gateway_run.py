"""The gateway as a run starts it (``gateway.enabled``, the default) and in front of real vLLM:
collection through its one URL with an engine SIGKILLed, a stream identical to the replica's,
the key, /tokenize at the root, /v1/models; its job replaced when it dies; gateway=off."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from jobs.pool import EndpointPool
from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry, gateway_service
from tests.support import ROOT, SERVED_NAME, STANDIN_SERVER, auth, launcher_env, serve_standin, start_launcher

NUM_REPEATS = 2
# vLLM's request log line (--enable-log-requests) for a chat completion whose X-Request-Id the
# collector set to <task id>/<repeat>/<turn>-<6 hex>.
RECEIVED = re.compile(r"Received request chatcmpl-(?P<session>\S+)/(?P<turn>\d+)-[0-9a-f]{6}: ")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _turns(log: str, instance: str, into: dict[str, list[tuple[int, str]]]) -> None:
    for m in RECEIVED.finditer(log):
        into[m["session"]].append((int(m["turn"]), instance))


def test_collection_through_the_gateway_survives_a_killed_engine(tmp_path):
    """Two real vLLM replicas behind the run's gateway; replica 0's engine SIGKILLed mid-collection:
    every rollout written once, and each conversation's turns on one engine unless that engine died
    (read from the engines' own request logs, not from the gateway)."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc = start_launcher(
        root, f"hydra.run.dir={run_dir}", "server.replicas=2", "server.extra_args=[--enable-log-requests]",
        f"job.num_repeats={NUM_REPEATS}", "job.max_concurrency=8", "job.sampling.max_tokens=64",
    )
    rollouts, log0 = run_dir / "rollouts.jsonl", run_dir / "logs" / "policy-0.engine.log"
    try:
        deadline = time.monotonic() + 900
        while len(_rows(rollouts)) < 8:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "8 rollouts not written in 900 s"
            time.sleep(0.2)
        victim = next(e for e in Registry(root).entries(service="policy") if e.replica == 0)
        rows_at_kill, killed_at = len(_rows(rollouts)), log0.stat().st_size
        os.killpg(victim.engine_pid, signal.SIGKILL)  # the engine is its own process group
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=120)
    print(out)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _rows(rollouts)
    keys = [(r["task_id"], r["repeat"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (task, repeat) was written twice"
    assert summary["collection"]["failures"] == 0 and len(rows) == summary["collection"]["tasks"] * NUM_REPEATS
    assert rows_at_kill < len(rows), "killed after the collection: nothing tested"
    assert summary["servers"][0]["restarts"] == 1  # the fleet replaced the engine meanwhile

    turns: dict[str, list[tuple[int, str]]] = defaultdict(list)
    text0 = log0.read_bytes()
    _turns(text0[:killed_at].decode(errors="replace"), "0 (killed)", turns)
    _turns(text0[killed_at:].decode(errors="replace"), "0 (replacement)", turns)
    _turns((run_dir / "logs" / "policy-1.engine.log").read_text(errors="replace"), "1", turns)
    assert {f"{r['task_id']}/{r['repeat']}" for r in rows} <= set(turns)  # every conversation is in the logs
    moved = 0
    for session, seen in turns.items():
        engines = {instance for _, instance in seen}
        if len(engines) == 1:
            continue
        # It moved: only off the killed engine (a turn in flight there may be seen twice), and once.
        assert "0 (killed)" in engines and len(engines) == 2, (session, sorted(seen))
        last_on_killed = max(t for t, i in seen if i == "0 (killed)")
        assert all(t >= last_on_killed for t, i in seen if i != "0 (killed)"), (session, sorted(seen))
        moved += 1
    print(f"\n[gateway failover] {len(rows)} rollouts, rows at kill {rows_at_kill}, conversations "
          f"{len(turns)}, moved off the killed engine {moved}, gateway {summary['gateway']}")


@pytest.fixture
def vllm_gateway(policy_server, registry_root):
    with GatewayThread(Gateway("policy", policy_server.namespace, Registry(registry_root, ttl_s=10),
                               GatewaySettings(refresh_s=0.2), policy_server.read_api_key())) as gw:
        yield gw, policy_server


def _events(response: httpx.Response) -> list[str]:
    """The stream's events as sent (bytes decoded), the ``created`` timestamp (seconds) blanked: the
    one field two identical requests may differ in."""
    return [re.sub(r'"created":\s*\d+', '"created":0', line) for line in response.iter_lines() if line]


def test_a_stream_through_the_gateway_is_the_replicas_event_for_event(vllm_gateway):
    gw, replica = vllm_gateway
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Count from one to ten."}],
            "max_tokens": 32, "temperature": 0, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}
    # Same request id: vLLM derives each chunk's "id" from it (chatcmpl-<id>).
    headers = {**auth(replica), "X-Request-Id": "same-request"}
    pairs = []
    # vLLM puts two tokens into one event when its API server falls behind the engine (a busy
    # machine), so two direct requests may differ in where events split: a pair is compared until
    # one ran with the same split; the tokens must agree in every pair.
    for _ in range(5):
        pair = []
        for base in (replica.base_url, f"{gw.url}/v1"):
            with httpx.stream("POST", f"{base}/chat/completions", json=body, headers=headers, timeout=120) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                pair.append(_events(r))
        pairs.append(pair)
        direct, through = pair
        assert _text(direct) == _text(through)
        if through == direct:
            break
    print(f"\n[stream] {len(direct)} events; identical in pair {len(pairs)} of {len(pairs)}")
    assert len(direct) > 5 and through == direct, f"no identical pair in {len(pairs)}"


def _text(events: list[str]) -> str:
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_key_tokenize_and_models_through_the_gateway(vllm_gateway):
    gw, replica = vllm_gateway
    assert httpx.get(f"{gw.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{gw.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    models = httpx.get(f"{gw.url}/v1/models", headers=auth(replica), timeout=30)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [SERVED_NAME]
    body = {"model": SERVED_NAME, "prompt": "Hello world"}
    through = httpx.post(f"{gw.url}/tokenize", json=body, headers=auth(replica), timeout=30)
    direct = httpx.post(f"{replica.root_url}/tokenize", json=body, headers=auth(replica), timeout=30)
    assert through.status_code == 200 and through.json() == direct.json() and through.json()["tokens"]


# ---------------------------------------------------------------- the gateway's job (stand-in replicas)


def _urls(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "server.registry", "--root", str(root), "urls", "policy", *args],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_a_killed_gateway_is_replaced_and_the_endpoint_file_follows(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, url = serve_standin(run_dir, root, "server.replicas=2")
    try:
        registry = Registry(root)
        (gateway,) = registry.entries(service=gateway_service("policy"))
        assert url == gateway.base_url == _urls(root) == (run_dir / "policy.url").read_text().strip()
        replicas = _urls(root, "--replicas").split(",")
        assert sorted(replicas) == sorted(e.base_url for e in registry.entries(service="policy"))
        key = {"Authorization": f"Bearer {gateway.read_api_key()}"}
        assert httpx.get(f"{url}/models", headers=key, timeout=10).status_code == 200

        os.kill(gateway.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (new := (run_dir / "policy.url").read_text().strip()) == url:
            assert proc.poll() is None and time.monotonic() < deadline, "no replacement gateway in 60 s"
            time.sleep(0.2)
        (successor,) = registry.entries(service=gateway_service("policy"))
        assert successor.job_id != gateway.job_id and successor.base_url == new == _urls(root)
        assert httpx.get(f"{new}/models", headers=key, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gateway"]["restarts"] == 1 and summary["gateway"]["deaths"][0]["job_id"] == gateway.job_id
    assert Registry(root).entries() == []


def test_gateway_off_hands_out_the_replicas(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, urls = serve_standin(run_dir, root, "server.replicas=2", "gateway=off")
    try:
        registry = Registry(root)
        assert registry.entries(service=gateway_service("policy")) == []
        assert sorted(urls.split(",")) == sorted(e.base_url for e in registry.entries(service="policy"))
        assert sorted(_urls(root).split(",")) == sorted(urls.split(","))
        assert not (run_dir / "policy.url").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert json.loads((run_dir / "summary.json").read_text())["gateway"] is None


def test_rollouts_through_the_gateway_record_the_replica_that_answered(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *STANDIN_SERVER, "server.replicas=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=launcher_env(root),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _rows(run_dir / "rollouts.jsonl")
    by_replica = defaultdict(int)
    for row in rows:
        by_replica[row["replica"]] += 1
    # sticky_least_loaded: new sessions go to the least loaded, so both replicas serve.
    assert set(by_replica) == {0, 1}, by_replica
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["collection"]["replicas"].keys() == {"0"}  # the collector saw one endpoint: the gateway
    assert summary["gateway"]["base_url"].endswith("/v1") and summary["gateway"]["restarts"] == 0
    # Its /metrics (scraped at teardown, with the key) counted every rollout's model calls.
    assert summary["gateway"]["counts"]["requests"].get("200", 0) >= len(rows), summary["gateway"]["counts"]


def test_a_gateway_near_its_time_limit_hands_over_to_a_successor_with_no_failed_request(tmp_path):
    """gateway.timeout_min=1: its successor is submitted 40 s before the limit, takes over once it
    passed the checks (endpoint file, registry) and the old one drains; a client following the
    registry (the collector's pool) sends requests all along, and none fails."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, url = serve_standin(run_dir, root, "gateway.timeout_min=1", "server.rollover_lead_s=40",
                              "cluster.signal_delay_s=15")
    registry = Registry(root)
    (first,) = registry.entries(service=gateway_service("policy"))
    pool = EndpointPool(gateway_service("policy"), registry=registry, refresh_s=0.5)
    body = {"model": first.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    answered, by_gateway = 0, defaultdict(int)

    async def client() -> None:
        """Requests all along, until the old gateway drained and ended (its entry gone) and the
        successor answered since."""
        nonlocal answered
        async with httpx.AsyncClient(timeout=30) as http:
            deadline = time.monotonic() + 150
            gone_at = None
            while gone_at is None or answered < gone_at + 20:
                assert time.monotonic() < deadline, f"the first gateway still serves after 150 s: {dict(by_gateway)}"
                entry, response = await pool.post(http, "/chat/completions", body, session_key=str(answered))
                assert response.status_code == 200, response.text
                answered += 1
                by_gateway[entry.job_id] += 1
                if gone_at is None and registry.entry(first.namespace, first.service, 0, first.job_id) is None:
                    gone_at = answered

    try:
        asyncio.run(client())
        assert (run_dir / "policy.url").read_text().strip() != url
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    gateway = json.loads((run_dir / "summary.json").read_text())["gateway"]
    print(f"\n[gateway rollover] {answered} requests, none failed, by gateway job {dict(by_gateway)}; {gateway}")
    assert gateway["restarts"] == 0 and [r["job_id"] for r in gateway["rollovers"]] == [first.job_id]
    assert by_gateway[first.job_id] > 0 and len(by_gateway) == 2
