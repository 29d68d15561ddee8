"""A fleet that heals itself (launcher/fleet.py): a replica whose job dies while the run goes on is
replaced, bounded; one that cannot start is not retried in a loop. Real vLLM for the engine killed
mid-collection; the stand-in engine (server=openai_command) where only the orchestration matters."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from server.registry import Registry
from tests.support import STANDIN_SERVER, kill_engine_and_finish, run_launcher, start_launcher


def _lines(path: Path) -> int:
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


REPEATS = 8  # 192 rollouts: the replacement (a vLLM start, ~30 s) is back while the collection still runs


def test_an_engine_killed_mid_collection_is_replaced_and_every_rollout_is_written_once(tmp_path):
    """Without the gateway (gateway=off): the collector's own pool fails over between the replicas: it
    saw replica 1 die under it, and lost no conversation (test_gateway_run.py kills an engine behind
    the gateway)."""
    registry_root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc = start_launcher(registry_root, f"hydra.run.dir={run_dir}", "server.replicas=2", f"job.num_repeats={REPEATS}",
                          "gateway=off")
    deadline = time.monotonic() + 600
    while _lines(run_dir / "rollouts.jsonl") < 10:  # collection under way on both replicas
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    out, summary = kill_engine_and_finish(proc, registry_root, replica=1)
    assert summary["status"] == "succeeded"
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    failures = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    keys = [(r["task_id"], r["repeat"]) for r in rows + failures]
    assert len(keys) == len(set(keys)) == 24 * REPEATS  # every rollout, each once
    # None lost to the kill: a failure here can only be the 135M model's own (looping on tool calls).
    assert {f["reason"] for f in failures} <= {"turn_limit", "tool_error"}, failures
    assert len(rows) >= 24 * REPEATS - 3
    assert summary["collection"]["replicas"]["1"]["failures"] >= 1  # the pool saw it die and ejected it
    (replaced,) = [s for s in summary["servers"] if s["replica"] == 1]
    assert replaced["restarts"] == 1 and "signal 9" in replaced["deaths"][0]["reason"], replaced
    assert replaced["deaths"][0]["job_id"] != replaced["job_id"]  # a new job serves replica 1
    # The replacement served the collection: its engine (after the last start header) answered chats.
    log = (run_dir / "logs" / "policy-1.engine.log").read_text().split("### ")[-1]
    assert log.count("POST /v1/chat/completions") > 0, log[-3000:]
    assert summary["servers"][0]["restarts"] == 0
    assert Registry(registry_root).namespaces() == []


def test_a_replica_that_always_fails_at_start_fails_the_run_fast_and_leaves_nothing(tmp_path):
    root = tmp_path / "registry"
    t0 = time.monotonic()
    out = run_launcher(root, *STANDIN_SERVER, f"hydra.run.dir={tmp_path / 'run'}",
                       'server.command="{python} -c \\"import sys; sys.exit(3)\\""', timeout_s=120)
    took = time.monotonic() - t0
    print(out.stdout, f"\nfailed after {took:.1f}s")
    assert out.returncode == 1, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert "died twice while starting with the same reason (exited with code 3): not retried" in text, text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (server,) = summary["servers"]
    assert server["restarts"] == 1 and [d["reason"] for d in server["deaths"]] == ["exited with code 3"] * 2
    assert took < 30  # two failures 1 s apart, then the teardown: not a loop
    assert Registry(root).namespaces() == [] and list(root.iterdir()) == []


def test_a_replica_cancelled_on_slurm_is_replaced(slurm_cluster, tmp_path):
    """scancel of one replica's job mid-collection: the run goes on and ends well, the replica
    replaced by a new Slurm job (the stand-in engine answers slowly so collection lasts)."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    slurm = ["cluster=slurm_testcluster", "server.gpus_per_replica=1", "cluster.cpus_per_task=1", "cluster.mem_gb=2",
             "job.partition=cpu", "job.cpus_per_task=1", "job.mem_gb=2"]
    proc = start_launcher(root, *STANDIN_SERVER, *slurm, f"hydra.run.dir={run_dir}", "server.replicas=2",
                          "job.num_repeats=2", "job.max_concurrency=4", "job.sampling.max_tokens=32",
                          'server.command="{python} -m server.standin --host {host} --port {port} '
                          '--model {served_name} --seconds-per-token 0.05"', env=slurm_cluster.env)
    deadline = time.monotonic() + 300
    while _lines(run_dir / "rollouts.jsonl") < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    (entry,) = [e for e in Registry(root).entries(service="policy") if e.replica == 1]
    slurm_cluster.job_ids.add(entry.job_id.split("_")[0])
    subprocess.run(["scancel", entry.job_id], env={**os.environ, **slurm_cluster.env}, check=True)
    out, _ = proc.communicate(timeout=600)
    print(out)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len({(r["task_id"], r["repeat"]) for r in rows}) == len(rows) == 24 * 2
    (replaced,) = [s for s in summary["servers"] if s["replica"] == 1]
    assert replaced["restarts"] == 1 and replaced["deaths"][0]["reason"] == "CANCELLED", replaced
    assert "_" not in replaced["job_id"]  # a job of its own, not a task of the first array
    slurm_cluster.job_ids.add(replaced["job_id"])
    assert Registry(root).namespaces() == []
