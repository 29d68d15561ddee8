"""``python -m launcher`` end to end, as a user runs it: real Hydra, submitit, vLLM, HTTP."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from server.registry import Registry
from tests.support import ROOT, auth, engines_on_port


def launcher(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


def assert_nothing_left(registry_root: Path, summary: dict) -> None:
    assert Registry(registry_root).entries(summary["namespace"]) == []
    assert not (registry_root / summary["namespace"]).exists()  # nor its API key
    assert not (registry_root / f".{summary['namespace']}.lock").exists()  # nor a lock file
    for server in summary["servers"]:
        if server["base_url"]:
            port = int(server["base_url"].rsplit(":", 1)[1].split("/")[0])
            assert engines_on_port(port) == [], f"vLLM still running on port {port}"


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
    assert_nothing_left(registry_root, summary)


def test_serve_only_until_ctrl_c(registry_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = launcher(run_dir, "job=none")
    lines = []
    url = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving policy at "):
            url = line.split()[3]
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert url, "".join(lines)
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401  # a key is generated per run
    entry = next(e for e in Registry(registry_root).entries() if e.base_url == url)
    key = entry.read_api_key()
    models = httpx.get(f"{url}/models", timeout=30, headers=auth(entry)).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m-instruct"]
    key_file = Path(entry.api_key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert_nothing_left(registry_root, summary)
    assert not key_file.exists()
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert written and all(key.encode() not in p.read_bytes() for p in written)  # logs, pickles, summary


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
    assert_nothing_left(registry_root, summary)
