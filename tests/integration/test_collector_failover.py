"""The collector against two real vLLM replicas: a replica killed mid-collection, and the
collector itself killed mid-collection and run again on the same output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.rollouts import CollectorConfig, CollectSummary, SamplingParams, collect, load_tasks
from launcher.executors import LocalBackend, Resources
from launcher.spec import ClusterSpec
from server.job import ServerJob, run
from server.registry import Entry, Registry
from tests.support import ROOT, cpu_engine

NAMESPACE = "failover"  # its own: the shared policy_server of the other tests stays out of it
NUM_REPEATS = 2
MAX_CONCURRENCY = 8
MAX_TOKENS = 64  # enough for a tool call; the demo's text answers stop well before
EXPECTED = {(t.id, r) for t in load_tasks(CollectorConfig().tasks) for r in range(NUM_REPEATS)}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, registry_root) -> list[Entry]:
    """Two replicas of one service, started together (their startups overlap), always stopped."""
    folder = tmp_path_factory.mktemp("failover-servers")
    key_file = Registry(registry_root).create_api_key(NAMESPACE)
    specs = [
        ServerJob(
            namespace=NAMESPACE, service="policy", replica=i, engine=cpu_engine(),
            registry=Registry(registry_root, heartbeat_s=1.0, orphan_grace_s=None),
            log_dir=str(folder / "logs"), embedded_model="smollm2_135m", startup_timeout_s=600,
            api_key_file=str(key_file),
        )
        for i in range(2)
    ]
    backend = LocalBackend(ClusterSpec(kind="local"), folder / "submitit")
    jobs = [backend.submit(run, s, Resources(name=f"failover-{s.replica}", timeout_min=60)) for s in specs]
    registry = Registry(registry_root, ttl_s=10)
    deadline = time.monotonic() + 600
    try:
        while len(registry.ready("policy", NAMESPACE)) < 2:
            for job, spec in zip(jobs, specs):
                if job.done():
                    pytest.fail(
                        f"replica {spec.replica} died while starting:\n{backend.log_tail(job)}\n"
                        f"{spec.engine_log.read_text()[-3000:]}"
                    )
            assert time.monotonic() < deadline, "two replicas not ready in 600 s"
            time.sleep(0.5)
        yield sorted(registry.ready("policy", NAMESPACE), key=lambda e: e.replica)
    finally:
        for job in jobs:
            backend.cancel(job)
        deadline = time.monotonic() + 60
        while not all(backend.finished(j) for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.2)


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


def _collector_cli(out: Path, registry_root: Path) -> list[str]:
    return [
        sys.executable, "-m", "jobs.rollouts", "--output-dir", str(out), "--root", str(registry_root),
        "--namespace", NAMESPACE, "--num-repeats", str(NUM_REPEATS), "--max-concurrency", str(MAX_CONCURRENCY),
        "--max-tokens", str(MAX_TOKENS),
    ]


# Runs first: it needs one replica only, the next test kills one of the two.
def test_a_killed_collector_resumes_without_duplicates(replicas, registry_root, tmp_path):
    out = tmp_path / "out"
    rollouts = out / "rollouts.jsonl"
    with open(tmp_path / "killed.log", "wb") as log:  # a file, not a pipe nobody reads while it runs
        first = subprocess.Popen(_collector_cli(out, registry_root), cwd=ROOT, stdout=log, stderr=log)
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
        done = subprocess.run(_collector_cli(out, registry_root), cwd=ROOT, capture_output=True, text=True, timeout=600)
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


def test_b_replica_killed_mid_collection(replicas, registry_root, tmp_path):
    registry = Registry(registry_root, ttl_s=10)
    assert len(registry.ready("policy", NAMESPACE)) == 2
    cfg = CollectorConfig(
        service="policy", output_dir=str(tmp_path / "out"), namespace=NAMESPACE, 
            registry=Registry(registry_root, heartbeat_s=1.0, orphan_grace_s=None),
        num_repeats=NUM_REPEATS, max_concurrency=MAX_CONCURRENCY, sampling=SamplingParams(max_tokens=MAX_TOKENS),
    )
    result: dict[str, CollectSummary | BaseException] = {}

    def collecting() -> None:
        try:
            result["summary"] = collect(cfg)
        except BaseException as e:  # surfaced by the assertion below, not lost in the thread
            result["error"] = e

    thread = threading.Thread(target=collecting, daemon=True)
    thread.start()
    rollouts = Path(cfg.output_dir) / "rollouts.jsonl"
    rows_at_kill = _wait_for_rows(rollouts, 8, thread.is_alive)
    victim = next(e for e in registry.ready("policy", NAMESPACE) if e.replica == 0)
    os.killpg(victim.engine_pid, signal.SIGKILL)  # the engine is its own process group
    thread.join(timeout=600)
    assert not thread.is_alive(), "collection did not finish within 600 s of the kill"
    assert "error" not in result, result.get("error")
    summary = result["summary"]

    rows = [json.loads(line) for line in _lines(rollouts)]
    failures = [json.loads(line) for line in _lines(Path(summary.failures_path))]
    keys = [(r["task_id"], r["repeat"]) for r in rows + failures]
    assert len(keys) == len(set(keys)), "a (task, repeat) was written twice"
    assert set(keys) == EXPECTED
    share = len(rows) / len(EXPECTED)
    print(f"\n[failover] {len(rows)}/{len(EXPECTED)} rollouts written ({share:.1%}), rows at kill "
          f"{rows_at_kill}, failures {[f['reason'] for f in failures]}, replicas {summary.replicas}")
    assert share >= 0.95
    assert summary.replicas["0"]["failures"] >= 1  # the pool saw it die and ejected it
    # Once the answers already received when it died are written, every row comes from replica 1:
    # conversations that lived on replica 0 moved there and finished there.
    assert {r["replica"] for r in rows[rows_at_kill + MAX_CONCURRENCY :]} <= {1}
