"""Runs that outlive their jobs' time limits (launcher/fleet.py, jobs/requeue.py): a replica near its
limit hands over to a successor job and drains, with no failed request; the collector job stopped at
its time-limit warning is requeued and resumes, each (task, repeat) written once. The stand-in engine
(server=openai_command) answers slowly, so that the collection lasts longer than the limits."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from pathlib import Path

from server.registry import Registry
from tests.support import STANDIN_SERVER, run_launcher

SLOW_STANDIN = ('server.command="{python} -m server.standin --host {host} --port {port} '
                '--model {served_name} --seconds-per-token 0.05"')
SLURM = ["cluster=slurm_testcluster", "server.gpus_per_replica=1", "cluster.cpus_per_task=1", "cluster.mem_gb=2",
         "job.partition=cpu", "job.cpus_per_task=1", "job.mem_gb=2"]
TASKS = 24  # jobs/tasks/demo.jsonl


def _rows(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_job_ids(run_dir: Path) -> set[str]:
    """Every job the run submitted (submitit's folders, array tasks by their array id)."""
    return {p.name.split("_")[0] for p in (run_dir / "submitit").iterdir() if p.name[0].isdigit()}


def _queued(env: dict[str, str]) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i"], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True).stdout
    return {line.split("_")[0] for line in out.split()}


def _every_rollout_once(run_dir: Path, repeats: int) -> None:
    keys = [(r["task_id"], r["repeat"]) for r in _rows(run_dir, "rollouts.jsonl")]
    assert len(keys) == len(set(keys)) == TASKS * repeats


def test_replicas_outlive_their_time_limit_with_no_failed_request(slurm_cluster, tmp_path):
    """Two replicas with a 1-minute limit through a collection of about two minutes: each is rolled
    over to a successor job (submitted 40 s before its limit, Slurm's own warning 15 s before it)."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    t0 = time.monotonic()
    result = run_launcher(
        root, *STANDIN_SERVER, *SLURM, SLOW_STANDIN, f"hydra.run.dir={run_dir}", "server.replicas=2",
        "cluster.timeout_min=1", "cluster.signal_delay_s=15", "server.rollover_lead_s=40",
        "job.num_repeats=8", "job.max_concurrency=4", "job.sampling.max_tokens=32",
        env=slurm_cluster.env, timeout_s=900,
    )
    wall_s = time.monotonic() - t0
    slurm_cluster.job_ids.update(_run_job_ids(run_dir))
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    _every_rollout_once(run_dir, repeats=8)
    collection = summary["collection"]
    assert collection["failures"] == 0 and _rows(run_dir, "failures.jsonl") == []
    assert sum(s["failures"] for s in collection["replicas"].values()) == 0, collection["replicas"]
    rollovers = {s["replica"]: s["rollovers"] for s in summary["servers"]}
    assert all(rollovers.values()), rollovers
    assert all(s["restarts"] == 0 and s["deaths"] == [] for s in summary["servers"]), summary["servers"]
    assert "successor job" in result.stdout and "draining job" in result.stdout
    collection_s = summary["phases"]["rollouts"]
    print(f"[rollover] run {wall_s:.1f}s, collection {collection_s:.1f}s against a 60 s limit; rollovers "
          f"per replica: {[len(r) for r in rollovers.values()]}; requests per replica: "
          f"{ {k: v['requests'] for k, v in collection['replicas'].items()} }")
    assert collection_s > 60
    assert not _queued(slurm_cluster.env) & _run_job_ids(run_dir)
    assert Registry(root).namespaces() == []


def test_a_replica_drained_by_slurms_warning_is_replaced_without_a_restart(slurm_cluster, tmp_path):
    """Rollovers off (server.rollover_lead_s=0): Slurm's USR2 drains the replica, its job ends at the
    limit, and the fleet takes that for the expected end it is: a successor, no restart, no death."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    result = run_launcher(
        root, *STANDIN_SERVER, *SLURM, SLOW_STANDIN, f"hydra.run.dir={run_dir}", "server.replicas=2",
        "cluster.timeout_min=1", "cluster.signal_delay_s=20", "server.rollover_lead_s=0",
        "job.num_repeats=6", "job.max_concurrency=4", "job.sampling.max_tokens=32",
        env=slurm_cluster.env, timeout_s=900,
    )
    slurm_cluster.job_ids.update(_run_job_ids(run_dir))
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    _every_rollout_once(run_dir, repeats=6)
    assert summary["collection"]["failures"] == 0
    assert sum(s["failures"] for s in summary["collection"]["replicas"].values()) == 0  # the pool waited
    ended = [r for s in summary["servers"] for r in s["rollovers"]]
    assert ended and all(r["why"] == "ended at its time limit" for r in ended), summary["servers"]
    assert all(s["restarts"] == 0 and s["deaths"] == [] for s in summary["servers"]), summary["servers"]
    assert not _queued(slurm_cluster.env) & _run_job_ids(run_dir)
    assert Registry(root).namespaces() == []


def _collector_requeued(run_dir: Path, timeout_min: int, repeats: int, *overrides: str,
                        env: dict | None = None) -> tuple[str, dict]:
    """A collection that outlives the collector job's limit: its warning comes 20 s before it (on
    Slurm up to 30 s earlier still)."""
    root = run_dir.parent / "registry"
    result = run_launcher(
        root, *STANDIN_SERVER, SLOW_STANDIN, f"hydra.run.dir={run_dir}", f"job.timeout_min={timeout_min}",
        "cluster.signal_delay_s=20", f"job.num_repeats={repeats}", "job.max_concurrency=2",
        "job.sampling.max_tokens=32", *overrides, env=env, timeout_s=900,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    _every_rollout_once(run_dir, repeats=repeats)
    job_logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*/*_log.*"))
    assert "Requeued job" in job_logs  # submitit's own requeue, after the collector stopped cleanly
    assert Registry(root).namespaces() == []
    return result.stdout, json.loads((run_dir / "summary.json").read_text())


def test_the_collector_job_is_requeued_at_its_time_limit_and_resumes_locally(tmp_path):
    """Locally submitit's controller starts the job again at once (the launcher sees it run on): a
    1-minute limit, whose warning comes 40 s after the job started, and about 60 s of work (sleeps
    of the stand-in, however fast the machine)."""
    _, summary = _collector_requeued(tmp_path / "run", timeout_min=1, repeats=3)
    print(f"[requeue local] collection {summary['phases']['rollouts']:.1f}s against a 60 s job limit")


def test_the_collector_job_is_requeued_at_its_time_limit_on_slurm(slurm_cluster, tmp_path):
    """On Slurm the same job id is requeued (pending for Slurm's requeue delay: cred_expire + 1 s,
    31 s on the test cluster, tests/slurm/common.sh) and the launcher follows it: a 2-minute limit (whose warning comes 50 to 20 s before its end),
    about 120 s of work, so one requeue."""
    run_dir = tmp_path / "run"
    out, summary = _collector_requeued(run_dir, 2, 6, *SLURM, env=slurm_cluster.env)
    slurm_cluster.job_ids.update(_run_job_ids(run_dir))
    assert "requeued near its time limit" in out
    assert not _queued(slurm_cluster.env) & _run_job_ids(run_dir)
    print(f"[requeue slurm] collection {summary['phases']['rollouts']:.1f}s against a 120 s job limit")


def test_a_command_job_is_requeued_at_its_time_limit_and_runs_again_locally(tmp_path):
    """job=command: stopped at its warning (SIGUSR2 reaches the job, not the program: the job stops it
    in order), requeued, the command run again; this one resumes from its own output, a line a second."""
    script, out = tmp_path / "count.sh", tmp_path / "count.txt"
    script.write_text('while [ "$(wc -l < "$1" 2>/dev/null || echo 0)" -lt 60 ]; do echo x >> "$1"; sleep 1; done\n')
    run_dir = tmp_path / "run"
    result = run_launcher(
        tmp_path / "registry", *STANDIN_SERVER, f"hydra.run.dir={run_dir}", "job=command",
        f'job.command="bash {script} {out}"', "job.timeout_min=1", "cluster.signal_delay_s=20", timeout_s=600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout
    assert out.read_text() == "x\n" * 60
    job_logs = "".join(p.read_text() for p in (run_dir / "submitit").glob("*/*_log.*"))
    assert "Requeued job" in job_logs and "stopped near the time limit" not in result.stdout
    assert (run_dir / "logs" / "command.log").read_text().count("starting: bash") == 2  # run twice
    assert Registry(tmp_path / "registry").namespaces() == []
