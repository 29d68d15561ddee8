"""64 stand-in replicas on the Slurm test cluster (partition `shared`, whose jobs share cores), 8 of
them killed at random moments while a collection runs: the run ends well, every rollout written
exactly once, each killed replica replaced by a new job that got ready and served.

It prints the figures of the run: time to all-ready, for each kill the time from the death to the
replacement ready against the engine's own start time, the requests that failed at the killed
replica (all retried elsewhere), and the scheduler calls the launcher made per minute, counted by
instrumentation: a folder of wrapper scripts first on the launcher's PATH, each appending a line
to a log and exec'ing the real Slurm client.

The kills are seeded (GYMLAUNCH_CHAOS_SEED replays a run; the seed is printed): which replicas,
when (each at a random point of the first 40% of the rollouts), and how (scancel of the replica's
job, or SIGKILL of its engine). About 80 s on the 2-core VM; it holds the whole test cluster
(all 8 cores, shared) meanwhile.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from launcher.orchestrate import GrowingLines
from server.registry import Registry
from tests.support import STANDIN_SERVER, queued, start_launcher

REPLICAS, KILLS, TASKS, REPEATS = 64, 8, 24, 150
SLURM = ["cluster=slurm_testcluster", "cluster.partition=shared", "job.partition=shared", "server.gpus_per_replica=0",
         "cluster.cpus_per_task=1", "cluster.mem_gb=1", "job.cpus_per_task=1", "job.mem_gb=2"]
SLOW_STANDIN = ('server.command="{python} -m server.standin --host {host} --port {port} --model {served_name} '
                '--seconds-per-token 0.05"')
CLIENTS = ("sacct", "squeue", "scontrol", "sbatch", "scancel", "sinfo", "sacctmgr")


def scheduler_call_log(folder: Path) -> tuple[Path, Path]:
    """Instrumentation, not a mock: a bin folder of wrappers, one per Slurm client, that append
    ``<time> <SLURM_JOB_ID or -> <client> <args>`` to the log and exec the real client. Returns
    (bin folder, log). Jobs inherit the PATH too: their calls carry their job id."""
    bin_dir, calls = folder / "slurm-call-log-bin", folder / "slurm-calls.log"
    bin_dir.mkdir(parents=True)
    for client in CLIENTS:
        real = shutil.which(client)
        assert real, f"{client} is not installed"
        wrapper = bin_dir / client
        wrapper.write_text(f'#!/bin/sh\nprintf "%s %s %s %s\\n" "$(date +%s.%N)" "${{SLURM_JOB_ID:--}}" {client} '
                           f'"$*" >> {calls}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir, calls


class Watcher(threading.Thread):
    """Every 0.2 s: each registry entry (by job id) when its engine started and when it first
    answered /health (the heartbeat of its first `healthy` entry, before the gate), with the rollouts
    written by then."""

    def __init__(self, root: Path, rollouts: Path) -> None:
        super().__init__(daemon=True)
        self.registry, self.lines = Registry(root), GrowingLines(rollouts)
        self.seen: dict[str, dict] = {}
        self.written = 0  # rollouts so far
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.written = written = self.lines()
            for e in self.registry.entries(service="policy"):
                s = self.seen.setdefault(e.job_id, {"replica": e.replica, "started_at": e.started_at, "entry": e})
                if e.state in ("healthy", "ready") and "healthy_at" not in s:
                    s.update(healthy_at=e.heartbeat_at, rows_then=written)


def test_64_replicas_with_8_killed_mid_collection(slurm_cluster, tmp_path):
    if subprocess.run(["scontrol", "show", "partition", "shared"], capture_output=True).returncode:
        pytest.skip("this cluster has no partition `shared` (tests/slurm/start.sh's cluster has)")
    seed = int(os.environ.get("GYMLAUNCH_CHAOS_SEED") or time.time_ns() % 100_000)
    print(f"\nchaos seed {seed} (GYMLAUNCH_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    victims = rng.sample(range(REPLICAS), KILLS)
    at_rows = sorted(int(rng.uniform(0.05, 0.4) * TASKS * REPEATS) for _ in victims)
    how = [rng.choice(("scancel", "SIGKILL engine")) for _ in victims]

    root, run_dir = tmp_path / "registry", tmp_path / "run"
    bin_dir, calls = scheduler_call_log(tmp_path)
    env = {**slurm_cluster.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    watcher = Watcher(root, run_dir / "rollouts.jsonl")
    watcher.start()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = start_launcher(root, *STANDIN_SERVER, SLOW_STANDIN, *SLURM, f"hydra.run.dir={run_dir}",
                          f"server.replicas={REPLICAS}", f"job.num_repeats={REPEATS}", "job.max_concurrency=128",
                          "job.sampling.max_tokens=32", env=env)
    kills = []
    try:
        deadline = time.monotonic() + 600
        for replica, rows, method in zip(victims, at_rows, how):
            while watcher.written < rows:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
            (entry,) = [e for e in Registry(root).entries(service="policy") if e.replica == replica]
            assert entry.state == "ready", entry  # an original replica, in use
            slurm_cluster.job_ids.add(entry.job_id.split("_")[0])
            if method == "scancel":
                subprocess.run(["scancel", entry.job_id], env={**os.environ, **slurm_cluster.env}, check=True)
            else:
                os.kill(entry.engine_pid, signal.SIGKILL)
            kills.append({"replica": replica, "job_id": entry.job_id, "how": method, "at": time.time(), "rows": rows})
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.done.set()
        watcher.join()
    took, cpu1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    print(out[-6000:])
    assert proc.returncode == 0, out

    summary = json.loads((run_dir / "summary.json").read_text())
    servers = {s["replica"]: s for s in summary["servers"]}
    collector = re.search(r"submitted rollouts: job (\d+)", out)
    slurm_cluster.job_ids.update([s["job_id"].split("_")[0] for s in summary["servers"]] + [collector[1]])
    # Every (task, repeat) exactly once, and no rollout lost to a kill.
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    failures_file = run_dir / "failures.jsonl"
    failures = failures_file.read_text().splitlines() if failures_file.exists() else []
    assert Counter((r["task_id"], r["repeat"]) for r in rows) == {
        (t, rep): 1 for t in {r["task_id"] for r in rows} for rep in range(REPEATS)}
    assert len(rows) == TASKS * REPEATS and failures == []
    # Exactly the victims were replaced, each once, by a job of its own that got ready and served.
    assert {i for i, s in servers.items() if s["restarts"]} == set(victims), summary["servers"]
    # Through the gateway (the collector sees one endpoint): its counters, by replica job.
    ejections, retries = summary["gateway"]["counts"].get("ejections", {}), summary["gateway"]["counts"]["retries"]
    events = []
    for kill in kills:
        s = servers[kill["replica"]]
        assert s["restarts"] == 1 and s["deaths"][0]["job_id"] == kill["job_id"], s
        expected = "CANCELLED" if kill["how"] == "scancel" else "killed by signal 9"
        assert s["deaths"][0]["reason"].startswith(expected), s
        assert "_" not in s["job_id"]  # a new job, not a task of the first array
        seen = watcher.seen[s["job_id"]]
        served = [r for r in rows[seen["rows_then"]:] if r["replica"] == kill["replica"]]
        assert served, f"replacement {s['job_id']} of replica {kill['replica']} served no rollout"
        detected = s["deaths"][0]["at"]
        events.append({**kill, "detect_s": detected - kill["at"], "death_to_ready_s": detected + s["down_s"] - kill["at"],
                       "submit_to_ready_s": s["ready_after_s"], "engine_start_s": seen["healthy_at"] - seen["started_at"],
                       "gate_s": s["readiness_gate_s"],
                       "failed": ejections.get(f"{kill['replica']}-{kill['job_id']}", 0), "served_rows": len(served)})

    # ---- the figures
    originals = [v for v in watcher.seen.values() if "_" in v["entry"].job_id and "healthy_at" in v]
    engine_start = [v["healthy_at"] - v["started_at"] for v in originals]
    ready_after = sorted(s["ready_after_s"] for s in summary["servers"] if not s["restarts"])
    gates = [s["readiness_gate_s"] for s in summary["servers"] if not s["restarts"]]
    phases = summary["phases"]
    print(f"\n{REPLICAS} replicas: all ready {phases['servers start'] + phases['servers ready']:.1f}s after "
          f"submission (first {ready_after[0]:.1f}s, median {statistics.median(ready_after):.1f}s, of the "
          f"untouched ones); the engine's own start (process to /health) median "
          f"{statistics.median(engine_start):.2f}s, max {max(engine_start):.2f}s; gate median "
          f"{statistics.median(gates):.1f}s, max {max(gates):.1f}s")
    print(f"collection: {len(rows)} rollouts in {phases['rollouts']:.1f}s, "
          f"{retries.get('all', 0)} requests retried on another replica by the gateway, 0 rollouts failed")
    print("death->ready = detected (the launcher sees the job end) + 1 s backoff + submit->ready; submit->ready = "
          "job start (Slurm, the job's Python) + engine start (process to /health) + gate; failed = the gateway's "
          "ejections of the killed replica (each after a request found it gone and went to another)")
    print("kill  replica  how             detected  death->ready  submit->ready  job start  engine start   gate  "
          "failed  rows served after")
    for n, e in enumerate(events, 1):
        job_start = e["submit_to_ready_s"] - e["engine_start_s"] - e["gate_s"]
        print(f"{n:>4}  {e['replica']:>7}  {e['how']:<14}  {e['detect_s']:>7.1f}s  {e['death_to_ready_s']:>11.1f}s  "
              f"{e['submit_to_ready_s']:>12.1f}s  {job_start:>8.1f}s  {e['engine_start_s']:>11.2f}s  "
              f"{e['gate_s']:>4.1f}s  {e['failed']:>6}  {e['served_rows']:>17}")
    launcher_calls = [line.split(maxsplit=3) for line in calls.read_text().splitlines() if line.split()[1] == "-"]
    minutes = took / 60
    counts = Counter(c[2] for c in launcher_calls)
    print(f"launcher: {took:.0f}s wall, {cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime:.1f}s CPU "
          f"(itself and the clients it ran); scheduler calls per minute: "
          + ", ".join(f"{c} {counts[c] / minutes:.1f} ({counts[c]})" for c in CLIENTS if counts[c]))
    sacct = [c for c in launcher_calls if c[2] == "sacct"]
    print(f"  jobs per sacct call: up to {max(c[3].count('-j ') for c in sacct)} (the array counts as one)")
    # One call per poll for all jobs, not one per job: with 72 jobs, per-job polling would be
    # hundreds a minute. Bounds from the cadences (sacct every 2 s, squeue every 1 s), not timings.
    assert counts["sacct"] / minutes <= 40 and counts["squeue"] / minutes <= 70, counts
    # sbatch: the servers' array, the gateway, the collector, a replacement per kill; teardown cancels all in one.
    assert counts["scancel"] <= 2 and counts["sbatch"] == 3 + KILLS, counts

    # Nothing left: no entry, and the run's jobs leave the queue (cancelled, they are COMPLETING
    # for a few seconds after accounting says CANCELLED, which is what the launcher waits for).
    assert Registry(root).namespaces() == []
    ours = lambda: [j for j in queued() if j.split("_")[0] in slurm_cluster.job_ids]  # noqa: E731
    deadline = time.monotonic() + 30
    while ours() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ours(), subprocess.run(["squeue"], capture_output=True, text=True).stdout
    print(f"  the run's jobs out of squeue {time.time() - t0 - took:.1f}s after the launcher exited")
