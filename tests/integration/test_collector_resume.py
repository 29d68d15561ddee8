"""The collector itself killed mid-collection against real vLLM (the shared replica) and run again
on the same output folder. A replica killed under the collector (its pool's failover):
test_fleet.py's engine-kill test, where the run also replaces it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from jobs.rollouts import CollectorConfig, load_tasks
from server.registry import Entry
from tests.support import ROOT

NUM_REPEATS = 2
MAX_CONCURRENCY = 8
MAX_TOKENS = 64  # enough for a tool call; the demo's text answers stop well before
EXPECTED = {(t.id, r) for t in load_tasks(CollectorConfig().tasks) for r in range(NUM_REPEATS)}


def _lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _keys(path: Path) -> list[tuple[str, int]]:
    return [(row["task_id"], row["repeat"]) for row in map(json.loads, _lines(path))]


def _wait_for_rows(path: Path, count: int, still_running, timeout_s: float = 600) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := len(_lines(path))) < count:
        assert still_running(), f"the collection ended before {count} rows were written"
        assert time.monotonic() < deadline, f"{n} rows after {timeout_s:g} s"
        time.sleep(0.1)
    return n


def _collector_cli(out: Path, registry_root: Path, server: Entry) -> list[str]:
    return [
        sys.executable, "-m", "jobs.rollouts", "--output-dir", str(out), "--root", str(registry_root),
        "--namespace", server.namespace, "--num-repeats", str(NUM_REPEATS), "--max-concurrency", str(MAX_CONCURRENCY),
        "--max-tokens", str(MAX_TOKENS),
    ]


def test_a_killed_collector_resumes_without_duplicates(policy_server, registry_root, tmp_path):
    out = tmp_path / "out"
    rollouts = out / "rollouts.jsonl"
    with open(tmp_path / "killed.log", "wb") as log:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(_collector_cli(out, registry_root, policy_server), cwd=ROOT, stdout=log, stderr=log)
        try:
            _wait_for_rows(rollouts, 10, lambda: first.poll() is None)
        finally:
            first.kill()  # SIGKILL: no cleanup, mid-conversation for the ones in flight
            first.wait(timeout=60)
    before = _lines(rollouts)
    whole = [line for line in before if line.endswith(b"\n")]
    assert len(whole) < len(EXPECTED), "killed too late to test anything"

    summaries = []
    for _ in range(3):  # failures (a 135M model may loop on tool calls) are retried by the next run
        done = subprocess.run(_collector_cli(out, registry_root, policy_server), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(json.loads(done.stdout))
        if not summaries[-1]["failures"]:
            break

    print(f"\n[resume] rows at kill {len(before)} ({len(whole)} whole), then per run "
          f"{[(s['rollouts_written_this_run'], s['failures']) for s in summaries]} (written, failed)")
    keys = _keys(rollouts)
    assert len(keys) == len(set(keys)), "a row was written twice"
    assert set(keys) == EXPECTED
    assert _lines(rollouts)[: len(whole)] == whole  # rows written before the kill are kept, not rewritten
    resumed = summaries[0]
    assert resumed["rollouts_written_this_run"] == len(EXPECTED) - len(whole) - resumed["failures"]
    assert summaries[-1]["rollouts_written"] == len(EXPECTED) and summaries[-1]["failures"] == 0
    assert _lines(out / "failures.jsonl") == []  # it lists the last run's failures only
