"""Resume (``python -m launcher run.resume=<run folder>``), with real processes: the launcher is
SIGKILLed mid-collection (its server and collector jobs live on) or Ctrl-C'd, then resumed in the
same folder: every (task, repeat) exactly once in rollouts.jsonl, the servers joined when they were
alive or started anew when they were gone, and nothing left running at the end."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from jobs.rollouts import ROLLOUTS_FILE
from launcher.executors import LocalBackend
from server.registry import Registry
from tests.support import (
    FAST_HEARTBEATS, ROOT, STANDIN, STANDIN_SERVER, launcher_env, processes_of, queued, rows, run_launcher,
    serve_standin, standin_pids,
)

TOTAL = 96  # 24 demo tasks x 4 repeats
# Slow answers (0.05 s a token: a conversation takes seconds), so that collection is still going.
SLOW = [*(o for o in STANDIN_SERVER if not o.startswith(("server.command=", "registry.orphan_grace_s="))),
        f'server.command="{STANDIN} --seconds-per-token 0.05"', "job.num_repeats=4"]
ORPHAN_GRACE = next(o for o in FAST_HEARTBEATS if o.startswith("registry.orphan_grace_s="))


def start_and_wait_for_rows(run_dir: Path, root: Path, *overrides: str,
                            env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """The launcher, its output in a file (the jobs it starts inherit its stdout: a pipe would stay open
    after a SIGKILL), once its collector has written 2 rows."""
    output = run_dir.with_name(f"{run_dir.name}.out")
    with open(output, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *SLOW, f"hydra.run.dir={run_dir}", *overrides],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=launcher_env(root, env))
    written, deadline = run_dir / ROLLOUTS_FILE, time.monotonic() + 300
    while not (written.exists() and written.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, output.read_text()
        assert time.monotonic() < deadline, "no rows in 300 s"
        time.sleep(0.05)
    return proc, output


def server_jobs(out: str, verb: str) -> list[str]:
    return re.findall(rf"^{verb} policy/\d+: job (\S+)$", out, re.M)


def assert_finished_exactly_once(run_dir: Path, resumed: subprocess.CompletedProcess, old_run_id: str | None) -> dict:
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out
    every = rows(run_dir / ROLLOUTS_FILE)
    assert len(every) == len(set(every)) == TOTAL, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["resumed_from"]["run_id"] == old_run_id, summary
    before = summary["resumed_from"]["rollouts_before"]
    assert 0 < before < TOTAL and summary["collection"]["rollouts_written_this_run"] == TOTAL - before, summary
    assert summary["collection"]["rollouts_written"] == TOTAL
    print(f"\n[resume] {before} rows before the resume, {TOTAL - before} after; phases {summary['phases']}")
    return summary


def assert_nothing_left(root: Path, job_ids: Sequence[str] = ()) -> None:
    """No process of the run (local jobs), none of ``job_ids`` queued (Slurm), no registry namespace."""
    deadline = time.monotonic() + 10  # an orphaned job's zombie is reaped by init a moment after it exits
    while processes_of(root) or Registry(root).namespaces() or set(job_ids) & set(queued() if job_ids else ()):
        assert time.monotonic() < deadline, (processes_of(root), Registry(root).namespaces(), queued())
        time.sleep(0.05)


def killed_run_id(run_dir: Path) -> str:
    return json.loads((run_dir / ".run.json").read_text())["run_id"]


def test_sigkill_mid_collection_then_resume_joins_the_live_servers(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    # Servers outlive their killed launcher for 60 s (registry.orphan_grace_s): long enough to be joined.
    proc, output = start_and_wait_for_rows(run_dir, root, "registry.orphan_grace_s=60")
    proc.kill()  # the launcher alone: its jobs go on
    proc.wait(timeout=30)
    first = output.read_text()
    old = killed_run_id(run_dir)
    launched = server_jobs(first, "submitted")
    assert len(launched) == 1, first

    resumed = run_launcher(root, f"run.resume={run_dir}")
    out = resumed.stdout
    summary = assert_finished_exactly_once(run_dir, resumed, old)
    # The interrupted run's collector was still writing: stopped before this run's started.
    collector = json.loads((run_dir / ".run.json").read_text())
    assert "stopping the interrupted run's job writing into this folder" in out, out
    assert f"joined the interrupted run's servers policy/0 (jobs {launched[0]})" in out, out
    assert server_jobs(out, "joined") == launched and summary["namespace"] == old, out
    assert collector["job_ids"] and collector["run_id"] == summary["run_id"]
    assert_nothing_left(root)


def test_sigkill_then_resume_after_the_servers_stopped_starts_new_ones(tmp_path):
    """The collector SIGKILLed too, mid-write: the torn last line it leaves is cut off and redone."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, output = start_and_wait_for_rows(run_dir, root, ORPHAN_GRACE)  # orphans stop within 3 s
    proc.kill()
    proc.wait(timeout=30)
    first = output.read_text()
    old = killed_run_id(run_dir)
    LocalBackend.cancel_ids(json.loads((run_dir / ".run.json").read_text())["job_ids"], force=True)
    with open(run_dir / ROLLOUTS_FILE, "ab") as f:  # what a write cut short leaves: part of a row
        f.write(b'{"task_id": "arith-1", "repeat": 3, "messages": [{"role": "us')
    deadline = time.monotonic() + 60
    while set(standin_pids()) & set(processes_of(root)):  # the orphaned servers stop by themselves
        assert time.monotonic() < deadline, "orphaned servers still up after 60 s"
        time.sleep(0.1)

    resumed = run_launcher(root, f"run.resume={run_dir}")
    summary = assert_finished_exactly_once(run_dir, resumed, old)
    assert "starting new servers" in resumed.stdout and summary["namespace"] == summary["run_id"] != old
    assert not set(server_jobs(resumed.stdout, "submitted")) & set(server_jobs(first, "submitted"))
    assert_nothing_left(root)


def test_ctrl_c_prints_the_resume_command_as_its_last_line_and_that_command_finishes_the_run(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, output = start_and_wait_for_rows(run_dir, root, ORPHAN_GRACE)
    old = killed_run_id(run_dir)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = output.read_text()
    assert proc.returncode == 130, out
    last = out.strip().splitlines()[-1]
    assert last == f"to resume: python -m launcher run.resume={run_dir}", out
    assert f"to resume: python -m launcher run.resume={run_dir}" in (run_dir / "launcher.log").read_text()
    assert_nothing_left(root)

    argv = shlex.split(last.removeprefix("to resume: "))
    assert argv[:3] == ["python", "-m", "launcher"]
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=launcher_env(root))
    assert_finished_exactly_once(run_dir, resumed, old)
    assert "to resume:" not in resumed.stdout  # a run that succeeded has nothing to resume
    assert_nothing_left(root)


def test_on_slurm_sigkill_then_resume_joins_the_server_jobs_and_cancels_the_old_collector(slurm_cluster, tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    slurm = ["cluster=slurm_testcluster", "server.gpus_per_replica=1", "cluster.cpus_per_task=1", "cluster.mem_gb=2",
             "job.partition=cpu", "job.cpus_per_task=1", "job.mem_gb=2"]
    proc, output = start_and_wait_for_rows(run_dir, root, *slurm, "registry.orphan_grace_s=60", env=slurm_cluster.env)
    proc.kill()
    proc.wait(timeout=30)
    first = output.read_text()
    old = json.loads((run_dir / ".run.json").read_text())
    launched = server_jobs(first, "submitted")
    assert len(launched) == 1 and set(old["job_ids"]) <= set(queued()), first  # the collector runs on

    resumed = run_launcher(root, f"run.resume={run_dir}", env=slurm_cluster.env, timeout_s=600)
    summary = assert_finished_exactly_once(run_dir, resumed, old["run_id"])
    assert f"stopping the interrupted run's job writing into this folder (jobs {old['job_ids'][0]})" in resumed.stdout
    assert server_jobs(resumed.stdout, "joined") == launched and summary["namespace"] == old["run_id"], resumed.stdout
    new = json.loads((run_dir / ".run.json").read_text())["job_ids"]
    assert_nothing_left(root, [*launched, *old["job_ids"], *new])


def test_a_run_still_going_is_not_resumed(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc, _ = serve_standin(run_dir, root)
    try:
        refused = run_launcher(root, f"run.resume={run_dir}")
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"run.resume: the run in {run_dir} is still going (its launcher is pid {proc.pid})" in refused.stderr
        assert Registry(root).namespaces() and proc.poll() is None  # untouched
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert_nothing_left(root)
