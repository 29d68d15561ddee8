"""The whole server-job lifecycle without a GPU: ``server.job.run`` supervising the stand-in
(server/standin.py) as ``engine=openai_command``, in a process of its own as a submitted job runs."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from server.engines import EngineSpec
from server.job import ServerJob, in_flight_requests, run
from server.process import log_tail
from server.registry import Entry, Registry
from server.verify import readiness_checks

SERVED_NAME = "standin-model"
NAMESPACE, SERVICE = "itest-command", "standin"
COMMAND = "{python} -m server.standin --host {host} --port {port} --model {served_name} --health-path /healthz"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}


@contextmanager
def server_job(
    tmp_path: Path, api_key: str | None = None, command: str = COMMAND, **overrides
) -> Iterator[tuple[multiprocessing.Process, Entry, ServerJob]]:
    """A server job running the stand-in, once its registry entry is ready (``healthy`` for a job the
    launcher gates); stopped on exit."""
    key_file = None
    if api_key:
        key_file = tmp_path / "api_key"
        key_file.write_text(api_key)
        key_file.chmod(0o600)
    job = ServerJob(
        namespace=NAMESPACE, service=SERVICE, replica=0,
        registry=Registry(tmp_path / "registry", heartbeat_s=0.3, orphan_grace_s=None),
        engine=EngineSpec(served_name=SERVED_NAME, engine="openai_command", command=command, health_path="/healthz"),
        log_dir=str(tmp_path / "logs"), model_path="/models/unused by the stand-in", advertise_host="127.0.0.1",
        startup_timeout_s=60, stop_grace_s=5, api_key_file=str(key_file) if key_file else None,
    )
    job = dataclasses.replace(job, **overrides)
    # spawn, not fork: a fresh interpreter whose main thread is the job's, as under submitit.
    process = multiprocessing.get_context("spawn").Process(target=run, args=(job,), name="server-job")
    process.start()
    try:
        yield process, wait_for(process, job, "healthy" if job.gated else "ready"), job
    finally:
        if process.is_alive():
            process.terminate()
            process.join(30)
        if process.is_alive():
            process.kill()


def wait_for(process: multiprocessing.Process, job: ServerJob, state: str, timeout_s: float = 60) -> Entry:
    """The job's entry once it is in ``state``; fails if the job exits first."""
    registry = Registry(job.registry.root, ttl_s=10)
    deadline = time.monotonic() + timeout_s
    while not (found := [e for e in registry.entries(NAMESPACE, SERVICE) if e.state == state]):
        if not process.is_alive():
            pytest.fail(f"server job exited with {process.exitcode}:\n{log_tail(job.engine_log)}")
        assert time.monotonic() < deadline, f"no {state} entry in {timeout_s:g} s:\n{log_tail(job.engine_log)}"
        time.sleep(0.02)
    return found[0]


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_lifecycle_start_publish_heartbeat_stop(tmp_path):
    key = "sk-itest-4f1c"
    with server_job(tmp_path, api_key=key) as (process, entry, job):
        engine_log = job.engine_log
        assert (entry.namespace, entry.service, entry.replica, entry.model) == (NAMESPACE, SERVICE, 0, SERVED_NAME)
        assert entry.state == "ready" and entry.engine == "openai_command"
        assert entry.base_url == f"http://127.0.0.1:{entry.port}/v1"
        assert entry.pid == process.pid and parent_pid(entry.engine_pid) == process.pid
        cmdline = Path(f"/proc/{entry.engine_pid}/cmdline").read_bytes().split(b"\0")
        assert b"server.standin" in cmdline and cmdline[cmdline.index(b"--port") + 1] == str(entry.port).encode()

        # The key went to the stand-in's environment, not its command line nor the log.
        assert key.encode() not in b" ".join(cmdline) and key not in engine_log.read_text()
        assert httpx.get(f"{entry.base_url}/models").status_code == 401
        models = httpx.get(f"{entry.base_url}/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [SERVED_NAME]

        registry = Registry(tmp_path / "registry")
        beats = {registry.entries(NAMESPACE)[0].heartbeat_at}
        deadline = time.monotonic() + 10
        while len(beats) < 3:
            assert time.monotonic() < deadline, "fewer than 2 heartbeats in 10 s (heartbeat_s=0.3)"
            time.sleep(0.1)
            beats.add(registry.entries(NAMESPACE)[0].heartbeat_at)

        process.terminate()  # SIGTERM, as the launcher stops a job
        process.join(30)
        assert process.exitcode == 0, log_tail(engine_log)
        assert registry.entries(NAMESPACE) == []
        with pytest.raises(ProcessLookupError):
            os.kill(entry.engine_pid, 0)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{entry.port}/healthz")


def test_a_gated_replica_is_handed_out_only_once_the_gate_admits_it(tmp_path):
    """The launcher gates every replica (replacements too): until its checks pass, the entry is
    ``healthy``, which no client takes; admitted, it turns ``ready`` at the job's next look (0.1 s)."""
    with server_job(tmp_path, gated=True) as (process, entry, job):
        registry = Registry(job.registry.root, ttl_s=10)
        assert readiness_checks(entry.base_url, entry.model, tools=True, logprobs=True)  # it does answer
        # Several of its heartbeats (0.3 s) later it is still not handed out.
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            assert registry.ready(SERVICE, NAMESPACE) == [] and registry.entry(NAMESPACE, SERVICE, 0, entry.job_id).state == "healthy"
            time.sleep(0.05)
        t0 = time.monotonic()
        registry.admit(NAMESPACE, SERVICE, 0, entry.job_id)
        ready = wait_for(process, job, "ready", timeout_s=5)
        print(f"admitted -> ready in {time.monotonic() - t0:.2f}s")
        assert ready.job_id == entry.job_id and registry.ready(SERVICE, NAMESPACE) == [ready]


def test_the_standin_answers_as_vllm_would(tmp_path):
    with server_job(tmp_path) as (_, entry, _):
        checks = readiness_checks(entry.base_url, entry.model)
        assert all(c.ok for c in checks), checks
        with httpx.Client(base_url=entry.root_url, timeout=10) as client:
            messages = [{"role": "user", "content": "Say hello"}]
            data = client.post("/v1/chat/completions", json={
                "model": SERVED_NAME, "messages": messages, "max_tokens": 8,
                "logprobs": True, "top_logprobs": 2, "return_token_ids": True,
            }).json()
            choice = data["choices"][0]
            assert choice["message"]["content"] == "Echo: Sa" and choice["finish_reason"] == "length"
            assert len(choice["token_ids"]) == len(choice["logprobs"]["content"]) == 8
            assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])
            assert data["usage"]["completion_tokens"] == 8
            tokenized = client.post("/tokenize", json={"model": SERVED_NAME, "messages": messages}).json()
            assert tokenized["tokens"] == data["prompt_token_ids"] and tokenized["count"] == len(data["prompt_token_ids"])

            for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
                data = client.post("/v1/chat/completions", json={
                    "model": SERVED_NAME, "messages": [{"role": "user", "content": "Weather in Paris?"}],
                    "tools": [WEATHER_TOOL], "tool_choice": tool_choice,
                }).json()
                choice = data["choices"][0]
                assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
                (call,) = choice["message"]["tool_calls"]
                assert call["type"] == "function" and call["function"]["name"] == "get_weather"
                assert json.loads(call["function"]["arguments"]) == {"city": "stand-in", "unit": "celsius"}

            auto = client.post("/v1/chat/completions", json={
                "model": SERVED_NAME, "messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "auto",
            }).json()["choices"][0]
            assert auto["finish_reason"] == "stop" and "tool_calls" not in auto["message"]

            unknown = client.post("/v1/chat/completions", json={"model": "other", "messages": messages})
            assert unknown.status_code == 404 and "other" in unknown.json()["error"]["message"]


def test_usr2_drains_in_flight_requests_then_stops(tmp_path):
    """Slurm's pre-timeout signal: the entry turns `draining`, the request in flight still gets its
    whole answer, and the job stops once nothing is in flight, well before the grace period ends. The
    engine's /metrics needs the key, as every route but health does: the job sends it."""
    slow = COMMAND + " --seconds-per-token 0.05"
    key = "sk-itest-drain"
    with server_job(tmp_path, api_key=key, command=slow, drain_grace_s=60) as (process, entry, _):
        registry = Registry(tmp_path / "registry")
        body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "x" * 80}]}  # ~4 s to answer
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{entry.base_url}/chat/completions", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})
            while in_flight_requests(entry, "127.0.0.1") != 1:
                assert not answer.done(), "the request ended before it could be seen in flight"
                time.sleep(0.05)
            signalled = time.monotonic()
            os.kill(process.pid, signal.SIGUSR2)
            while registry.entries(NAMESPACE)[0].state != "draining":
                assert time.monotonic() - signalled < 5, "the entry did not turn draining"
                time.sleep(0.05)
            assert registry.ready(SERVICE, NAMESPACE) == []  # clients start nothing new on it
            response = answer.result(timeout=60)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "Echo: " + "x" * 80
        process.join(30)
        assert process.exitcode == 0
        assert time.monotonic() - signalled < 20  # stopped when drained, not at drain_grace_s
        assert registry.entries(NAMESPACE) == []
