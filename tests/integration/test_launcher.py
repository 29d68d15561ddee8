"""``python -m launcher`` end to end, as a user runs it: real Hydra, submitit, vLLM, HTTP. A serve-only
run (``job=none``) and its Ctrl-C: test_readme.py, which runs it as the README says."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.support import ROOT, STANDIN_SERVER, assert_run_left_nothing, run_launcher


def launcher(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def test_demo_end_to_end(registry_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher(run_dir)
    out, _ = proc.communicate(timeout=900)
    print(out)
    assert proc.returncode == 0, out
    assert out.strip().splitlines()[-1] == f"run folder: {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert set(summary["phases"]) == {"servers start", "servers ready", "gateway ready", "rollouts", "teardown"}
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) >= 16 and summary["collection"]["rollouts_written"] == len(rows)
    for row in rows:
        assert row["turns"], row["task_id"]
        for turn in row["turns"]:
            assert turn["generation_token_ids"] and len(turn["generation_logprobs"]) == len(turn["generation_token_ids"])
    assert any(row["tool_calls"] for row in rows), "the demo's tool loop never ran"
    # Through the gateway, every next turn began with the previous prompt + generation ids (before
    # splicing existed: 0 of 12 after a tool call).
    collection = summary["collection"]
    assert collection["prefix_checked"] > 0 and collection["prefix_contiguous"] == collection["prefix_checked"]
    n = collection["prefix_checked"]
    assert re.search(rf"multi-turn prefix contiguity\s*│\s*{n}/{n} \(100%\)", out), out
    assert (run_dir / "logs" / "policy-0.engine.log").stat().st_size > 0
    # The launcher's own log has the run's events; submitit's template folder is not left empty.
    launcher_log = (run_dir / "launcher.log").read_text()
    assert "submitted policy/0" in launcher_log and "ready at http" in launcher_log, launcher_log
    assert not (run_dir / "submitit" / "%j").exists()
    assert_run_left_nothing(registry_root, summary)


def test_a_dying_server_fails_the_run_fast_with_its_log(registry_root, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    run_dir = tmp_path / "run"
    proc = launcher(run_dir, "model.embedded=null", f"model.path={not_a_model}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "ended while starting" in out and "engine log tail" in out
    assert str(not_a_model) in out  # vLLM's own complaint, from the log tail
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "rollouts" not in summary["phases"]
    assert_run_left_nothing(registry_root, summary)


def test_each_row_explains_its_reward(tmp_path):
    """The demo tasks on the stand-in engine (no model: it echoes the question): each row names the
    model served, the sampling params sent and what the verifier read, and says when it ended. The
    echo of "What is 144 / 12?" used to score 1.0 for the answer 12: any last number counted."""
    run_dir = tmp_path / "run"
    began = time.time()
    result = run_launcher(tmp_path / "registry", *STANDIN_SERVER, f"hydra.run.dir={run_dir}",
                          "job.sampling.temperature=0.3", "job.sampling.max_tokens=100")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["task_id"]: r for r in map(json.loads, (run_dir / "rollouts.jsonl").read_text().splitlines())}
    assert len(rows) == 24
    echo = rows["arith-10"]
    assert echo["output"] == "Echo: What is 144 / 12? Reply with just the number."
    assert echo["reward"] == 0.0
    assert echo["verifier"] == {"name": "number", "expected": 12.0, "tolerance": 1e-6, "answer": None}
    assert rows["weather-00"]["verifier"] == {"name": "tool_call", "tool": "get_weather", "arguments": {"city": "Paris"}}
    assert rows["weather-01"]["verifier"] == {"name": "contains", "expected": "rainy"}
    for row in rows.values():
        assert row["model"] == "smollm2-135m-instruct"  # the default model's served name: the stand-in serves it
        assert row["sampling"] == {"temperature": 0.3, "top_p": 1.0, "max_tokens": 100}
        assert began < row["turns"][0]["at"] <= row["turns"][-1]["at"] <= row["finished_at"] < time.time()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["collection"]["mean_reward"] == 0.0  # an echo answers nothing
