"""A hiccup of the shared filesystem takes no part of a run down: the service's registry folder is
unusable for 4 s mid-collection (a plain file in its place, which fails for root too), and the run
goes on to its end with no replica lost, writes its summary and leaves nothing behind. The stand-in
engine (server=openai_command): what is proven is the registry's side, not vLLM's.

The same run's folder is then searched, every file of it (logs, config, submitit's pickles), for the
run's API key: a run folder is as readable as the user's umask makes it (docs/architecture.md), so
it must never hold the key."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support import STANDIN, STANDIN_SERVER, assert_run_left_nothing, replaced_by_a_file, rows, start_launcher

OUTAGE_S = 4.0


def test_a_4_s_registry_outage_mid_collection_takes_no_replica_down(tmp_path):
    """Before: both replicas died on their heartbeat write, the launcher crashed removing their
    entries (and again in its teardown), wrote no summary.json and left the namespace and key."""
    registry_root, run_dir = tmp_path / "registry", tmp_path / "run"
    slow = [o for o in STANDIN_SERVER if not o.startswith("server.command=")]
    proc = start_launcher(registry_root, f"hydra.run.dir={run_dir}", *slow, "server.replicas=2", "job.num_repeats=2",
                          f'server.command="{STANDIN} --seconds-per-token 0.01"')
    try:
        deadline = time.monotonic() + 300
        while not _lines(run_dir / "rollouts.jsonl") >= 4:  # collecting, through both replicas
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        (namespace,) = [p for p in registry_root.iterdir() if not p.name.startswith(".")]
        key = (namespace / ".api_key").read_bytes().strip()
        written = _lines(run_dir / "rollouts.jsonl")
        with replaced_by_a_file(namespace / "policy", tmp_path / "policy-away"):
            time.sleep(OUTAGE_S)
        assert _lines(run_dir / "rollouts.jsonl") < 48, "the collection ended before the outage did: slow it down"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out)

    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded", out
    assert [(s["restarts"], s["deaths"]) for s in summary["servers"]] == [(0, []), (0, [])], summary["servers"]
    assert len(set(rows(run_dir / "rollouts.jsonl"))) == 48 > written
    # The outage did reach the replicas' heartbeats, which carried on after it.
    server_logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*/*_log.err"))
    for replica in (0, 1):
        assert f"heartbeat of policy/{replica} not written" in server_logs, server_logs[-3000:]
    assert "heartbeat written again after" in server_logs
    assert_run_left_nothing(registry_root, summary)

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in files) and any(p.name == "launcher.log" for p in files)
    assert [p for p in files if key in p.read_bytes()] == []


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0
