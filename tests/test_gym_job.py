"""job=gym as a user meets it, without Gym: the programs' PATH (from a real venv), and the model calls read
from a Gym output row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.command import Endpoints, GymConfig, _Runner, _Stop, gym_model_calls, gym_prefix_contiguity, venv_base_dir
from server.registry import Registry


def gym_config(gym_bin: Path | None) -> GymConfig:
    return GymConfig(
        service="policy", env={}, cwd=None, setup=[], stop_grace_s=5, config_paths=["x.yaml"], agent_name="x",
        input_jsonl="tasks.jsonl", limit=None, num_samples_in_parallel=None,
        gym_bin=None if gym_bin is None else str(gym_bin), startup_timeout_s=60, ng_run_args=[], collect_args=[],
    )


def runner_path(cfg: GymConfig, tmp_path: Path) -> list[str]:
    """The PATH the job starts Gym's programs with."""
    cfg.run_dir = str(tmp_path / "run")
    cfg.endpoints = Endpoints(service="policy", namespace="n", registry=Registry(tmp_path / "registry"),
                              base_urls=["http://127.0.0.1:9/v1"], model="m")
    return _Runner(cfg, _Stop()).env["PATH"].split(os.pathsep)


def test_the_gym_venvs_base_interpreter_follows_gym_bin_on_path(tmp_path):
    venv = tmp_path / "gym venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    base = venv_base_dir(venv / "bin")
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # What uv needs there: the exact interpreter the venv was made from, not another venv's.
    found = subprocess.run([str(Path(base) / name), "-c", "import sys; print(sys.prefix == sys.base_prefix)"],
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "True", base
    path = runner_path(gym_config(venv / "bin"), tmp_path)
    assert path[:2] == [str(venv / "bin"), base]


def test_a_gym_bin_outside_a_venv_goes_on_path_alone(tmp_path):
    (tmp_path / "bin").mkdir()
    assert venv_base_dir(tmp_path / "bin") is None
    path = runner_path(gym_config(tmp_path / "bin"), tmp_path)
    assert path[0] == str(tmp_path / "bin") and path[1:] == os.environ["PATH"].split(os.pathsep)
    assert runner_path(gym_config(None), tmp_path) == os.environ["PATH"].split(os.pathsep)


def _call_items(prompt: list[int], generation: list[int], *kinds: str) -> list[dict]:
    """The output items one model call leaves in a Gym row (vllm_model_for_training), each with its ids."""
    ids = {"prompt_token_ids": prompt, "generation_token_ids": generation,
           "generation_log_probs": [-0.5] * len(generation)}
    return [{"type": kind, **ids} for kind in kinds]


def test_gym_model_calls_are_read_in_order_once_each():
    row = {"response": {"output": [
        *_call_items([1, 2], [3, 4], "message", "function_call"),  # text and a tool call: one call
        {"type": "function_call_output", "call_id": "c1", "output": "{}"},
        *_call_items([1, 2, 3, 5, 6], ["7"], "function_call"),  # Gym may keep ids as strings
        {"type": "function_call_output", "call_id": "c2", "output": "{}"},
        *_call_items([1, 2, 3, 5, 6, 7, 8], [9], "message"),
    ]}, "reward": 1.0}
    assert gym_model_calls(row) == [([1, 2], [3, 4]), ([1, 2, 3, 5, 6], [7]), ([1, 2, 3, 5, 6, 7, 8], [9])]
    assert gym_model_calls({"response": {"output": [{"type": "message", "content": []}]}}) == []
    assert gym_model_calls({"response": None}) == []


def test_the_gym_runs_contiguity_counts_each_rows_consecutive_calls_and_skips_a_torn_line(tmp_path):
    contiguous = {"response": {"output": [*_call_items([1], [2], "function_call"), *_call_items([1, 2, 5], [6], "message")]}}
    broken = {"response": {"output": [*_call_items([1], [2], "function_call"), *_call_items([1, 3, 5], [6], "message")]}}
    output = tmp_path / "gym_rollouts.jsonl"
    output.write_text("\n".join(json.dumps(r) for r in (contiguous, broken, contiguous)) + '\n{"response": {"out')
    assert gym_prefix_contiguity(output) == (2, 3)
