"""Real NeMo Gym (tests/gym/provision.py: 0.4.x and 0.7.x, cached outside the clone) as ``job=gym``:
``python -m launcher job=gym`` serving the embedded SmolLM2 on real vLLM, Gym's
``example_single_tool_call`` resources server and its ``vllm_model_for_training`` config, through
the gateway. Tool calls are forced (``tool_choice: required``) and the agent capped at
``MAX_STEPS`` steps, so each rollout makes several model calls.

One run with ``gateway.on_policy=true``, two replicas, one engine SIGKILLed mid-collection: Gym's
own ``ng_collect_rollouts`` (which exits 1 when one rollout's model call fails) completes with
every row, each carrying token ids and logprobs, and no failed rollout (those Gym 0.4 writes to
``gym_rollouts_failures.jsonl``, not among the rows); every multi-call rollout is prefix-contiguous (the
next call's prompt ids begin with the previous prompt + generation ids). A second, smaller run with
``gateway.on_policy=false`` measures the same figure, below 100%: the test can tell them apart.

Gym 0.7 with its own ``vllm_model_supply_prefix.yaml``: it sends ``required_prefix_token_ids`` (the
NeMo RL extension the gateway implements) and fails any call whose ``prompt_token_ids`` do not
begin with them; the run completes, every multi-call rollout contiguous."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from jobs.command import gym_model_calls
from server.onpolicy import prefix_contiguity
from server.registry import Registry
from tests.support import start_launcher

CONFIGS = (
    "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml",
    "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
)
# Gym 0.6+: send required_prefix_token_ids, check the answer's prompt ids begin with them.
SUPPLY_PREFIX = "responses_api_models/vllm_model/configs/vllm_model_supply_prefix.yaml"
AGENT = "example_single_tool_call_simple_agent"
MAX_STEPS = 3  # model calls per rollout: every call makes a tool call (forced), so the agent stops here
RECEIVED = re.compile(r"Received request chatcmpl-")


def gym_tasks(nemo_gym, path: Path, count: int) -> Path:
    """``count`` tasks: Gym's own examples for the resources server (5, repeated as needed), with
    tool calls forced."""
    [example] = nemo_gym.bin.parent.glob("lib/python3.*/site-packages/resources_servers/example_single_tool_call/"
                                         "data/example.jsonl")
    rows = [json.loads(line) for line in example.read_text().splitlines() if line.strip()]
    with path.open("w") as f:
        for i in range(count):
            row = rows[i % len(rows)]
            row["responses_create_params"]["tool_choice"] = "required"
            f.write(json.dumps(row) + "\n")
    return path


def gym_run(nemo_gym, tmp_path: Path, name: str, limit: int, *overrides: str, configs: tuple = CONFIGS,
            ng_run_args: tuple = ()):
    """``python -m launcher job=gym`` in the background: (process, run dir, registry root)."""
    run_dir, root, cwd = tmp_path / name, tmp_path / f"{name}-registry", tmp_path / f"{name}-gym"
    cwd.mkdir()
    tasks = gym_tasks(nemo_gym, tmp_path / f"{name}-tasks.jsonl", limit)
    ng_run_args = [*nemo_gym.ng_run_args, f"++{AGENT}.responses_api_agents.simple_agent.max_steps={MAX_STEPS}",
                   *ng_run_args]
    proc = start_launcher(
        root, f"hydra.run.dir={run_dir}", "job=gym", f"job.gym_bin={nemo_gym.bin}", f"job.cwd={cwd}",
        *(f"++job.env.{k}={v}" for k, v in nemo_gym.env.items()),
        f"job.config_paths=[{','.join(configs)}]", f"job.agent_name={AGENT}", f"job.input_jsonl={tasks}",
        f"job.limit={limit}", f"job.num_samples_in_parallel={limit}", "job.stop_grace_s=30",
        f"job.ng_run_args=[{','.join(repr(a) for a in ng_run_args)}]",
        "job.collect_args=['+responses_create_params.max_output_tokens=64']", *overrides,
    )
    return proc, run_dir, root


def finish(proc, timeout_s: float = 900) -> str:
    """The launcher's output once it ended (interrupted, as Ctrl-C would, if it outlives ``timeout_s``)."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        interrupt(proc)
    print(out)
    return out


def interrupt(proc) -> None:
    """A launcher still running gets Ctrl-C: it stops its jobs (vLLM, gateway, Gym) before it ends."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)


def gym_rows(run_dir: Path, name: str = "gym_rollouts") -> list[dict]:
    """The rows of Gym's output (``gym_rollouts_failures``: its failed rollouts, which Gym keeps apart)."""
    path = run_dir / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_token_information(rows: list[dict]) -> list[list[tuple[list[int], list[int]]]]:
    """Every row's model calls carry prompt ids, generation ids and one logprob per generated id."""
    calls_per_rollout = []
    for row in rows:
        items = [item for item in row["response"]["output"] if "prompt_token_ids" in item]
        assert items, f"a row without token ids: {json.dumps(row)[:2000]}"
        for item in items:
            assert item["prompt_token_ids"] and item["generation_token_ids"], item
            assert len(item["generation_log_probs"]) == len(item["generation_token_ids"]), item
            assert all(isinstance(lp, float) and lp <= 0 for lp in item["generation_log_probs"]), item
        calls_per_rollout.append(gym_model_calls(row))
    return calls_per_rollout


def contiguity(calls_per_rollout) -> tuple[int, int]:
    contiguous, checked = prefix_contiguity(calls_per_rollout)
    assert checked, "no rollout made several model calls: nothing to check"
    return contiguous, checked


def test_real_gym_through_the_gateway_on_policy_and_off_with_an_engine_killed(nemo_gym, tmp_path):
    """On-policy (the default, said explicitly): two replicas, replica 0's engine SIGKILLed
    mid-collection; every row written, each multi-call rollout prefix-contiguous. Off: one replica,
    fewer tasks; Gym's re-tokenized turns break contiguity (so the first half can fail)."""
    limit = 10
    t0 = time.monotonic()
    proc, run_dir, root = gym_run(nemo_gym, tmp_path, "on", limit, "server.replicas=2",
                                  "server.extra_args=[--enable-log-requests]", "gateway.on_policy=true")
    collect_log, engine0 = run_dir / "logs" / "ng_collect_rollouts.log", run_dir / "logs" / "policy-0.engine.log"
    try:
        deadline = time.monotonic() + 900
        # Mid-collection: Gym's collection has started and replica 0 has answered some of its calls.
        while not (collect_log.exists() and engine0.exists()
                   and len(RECEIVED.findall(engine0.read_text(errors="replace"))) >= 6):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "replica 0 got no collection requests in 900 s"
            time.sleep(0.2)
        rows_at_kill = len(gym_rows(run_dir))  # Gym appends each finished row
        assert rows_at_kill < limit, "killed after the collection: nothing tested"
        victim = next(e for e in Registry(root).entries(service="policy") if e.replica == 0)
        killed_at = time.monotonic() - t0
        os.killpg(victim.engine_pid, signal.SIGKILL)  # the engine is its own process group
        out = finish(proc)
    finally:
        interrupt(proc)
    assert proc.returncode == 0, out
    rows = gym_rows(run_dir)
    assert len(rows) == limit and not gym_rows(run_dir, "gym_rollouts_failures")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["collection"]["rollouts_written"] == limit
    on = contiguity(check_token_information(rows))
    assert (summary["collection"]["prefix_contiguous"], summary["collection"]["prefix_checked"]) == on
    on_s = time.monotonic() - t0
    print(f"\n[gym real] on-policy, 2 replicas, engine 0 killed at {killed_at:.0f} s ({rows_at_kill} rows then): "
          f"{len(rows)} rows, prefix contiguity {on[0]}/{on[1]}, run {on_s:.0f} s")

    t1 = time.monotonic()
    proc, run_dir, _ = gym_run(nemo_gym, tmp_path, "off", 4, "gateway.on_policy=false")
    out = finish(proc)
    assert proc.returncode == 0, out
    rows = gym_rows(run_dir)
    assert len(rows) == 4
    off = contiguity(check_token_information(rows))
    print(f"[gym real] on-policy off, 1 replica: {len(rows)} rows, prefix contiguity {off[0]}/{off[1]}, "
          f"run {time.monotonic() - t1:.0f} s; test {time.monotonic() - t0:.0f} s")
    assert on[0] == on[1], f"on-policy: {on[0]} of {on[1]} consecutive calls contiguous"
    assert off[0] < off[1], f"on-policy off: all {off[1]} consecutive calls contiguous; the test cannot tell on from off"


def test_real_gym_07_supplies_prefix_token_ids_and_the_gateway_keeps_them(nemo_gym_07, tmp_path):
    """Gym 0.7's prefix supply (its training capture on, as it needs) through the splicing gateway:
    Gym checks each answer's prompt ids begin with the ids it supplied and fails the rollout
    otherwise; here every rollout is written, none failed, each multi-call one contiguous."""
    t0 = time.monotonic()
    proc, run_dir, _ = gym_run(
        nemo_gym_07, tmp_path, "gym07", 4, configs=(*CONFIGS, SUPPLY_PREFIX),
        ng_run_args=("++token_id_capture.enabled=true", "++token_id_capture.all_agents=true",
                     f"++token_id_capture.dir={tmp_path / 'token-capture'}"))
    out = finish(proc)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job"]["gym_version"] == nemo_gym_07.version
    rows = gym_rows(run_dir)
    assert len(rows) == 4 and not gym_rows(run_dir, "gym_rollouts_failures")
    on = contiguity(check_token_information(rows))
    print(f"\n[gym real 0.7] supply_prefix_token_ids through the gateway: {len(rows)} rows, prefix contiguity "
          f"{on[0]}/{on[1]}, run {time.monotonic() - t0:.0f} s")
    assert on[0] == on[1], f"{on[0]} of {on[1]} consecutive calls contiguous"
    # Gym's own capture records say it supplied the prefix on every follow-on call (not merely
    # the ids on the messages, which the gateway splices too).
    records = [json.loads(line) for f in (tmp_path / "token-capture").glob("*.tokens.jsonl")
               for line in f.read_text().splitlines() if line.strip()]
    assert sum(r.get("prefix_supplied") is True for r in records) == on[1], records
