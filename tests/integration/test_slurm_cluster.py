"""The project's single-node Slurm cluster (tests/slurm/start.sh), used through submitit
exactly as the launcher uses a real cluster: sbatch via submitit, gres GPUs, job arrays,
cancellation, partitions, accounting (sacct) states.

These tests are never skipped: when no cluster answers, the session fixture starts one with
tests/slurm/start.sh (root, Debian) and stops it with tests/slurm/stop.sh at the end; if the
start fails, the fixture fails.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import pytest
import submitit

ROOT = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = ROOT / "tests" / "slurm"
DEFAULT_DIR = Path(os.environ.get("GYMLAUNCH_SLURM_DIR", "/tmp/gymlaunch-slurm"))

# The job processes unpickle the submitted functions; pickle this module's functions by value
# so a job does not depend on being able to import the test module (its cwd, sys.path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- the cluster ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmCluster:
    env: dict[str, str]  # what callers need in the environment (SLURM_CONF, ...)
    started_here: bool  # True when this session started it (and stops it at the end)
    start_s: float | None  # how long start.sh took, when it ran


def _answers(env: dict[str, str]) -> bool:
    """A cluster answers: sinfo lists a node and sacct (accounting) replies."""
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    try:
        nodes = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15)
        if nodes.returncode or not nodes.stdout.strip():
            return False
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minute"], env=env, capture_output=True, timeout=15)
        return acct.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _exports(stdout: str) -> dict[str, str]:
    """The `export K=V` lines start.sh prints last."""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            found[key] = shlex.split(value)[0] if value else ""
    return found


@pytest.fixture(scope="session")
def slurm_cluster():
    """A Slurm cluster with accounting and 4 gres GPUs: the one that answers already (the
    caller's SLURM_CONF, or the project's default folder), else one started here."""
    own_conf = DEFAULT_DIR / "etc" / "slurm.conf"
    candidates = []
    if os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists():
        candidates.append({})
    if own_conf.exists():
        candidates.append({"SLURM_CONF": str(own_conf), "GYMLAUNCH_SLURM_DIR": str(DEFAULT_DIR)})
    with pytest.MonkeyPatch.context() as mp:
        for extra in candidates:
            if _answers({**os.environ, **extra}):
                for key, value in extra.items():
                    mp.setenv(key, value)
                yield SlurmCluster(env=extra, started_here=False, start_s=None)
                return
        t0 = time.monotonic()
        started = subprocess.run([str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=900)
        start_s = time.monotonic() - t0
        if started.returncode:
            pytest.fail(f"tests/slurm/start.sh failed ({started.returncode}):\n{started.stderr[-6000:]}")
        env = _exports(started.stdout)
        assert "SLURM_CONF" in env, started.stdout
        for key, value in env.items():
            mp.setenv(key, value)
        print(f"\n[slurm] start.sh took {start_s:.1f} s", file=sys.stderr)
        try:
            yield SlurmCluster(env=env, started_here=True, start_s=start_s)
        finally:
            stopped = subprocess.run([str(SLURM_SCRIPTS / "stop.sh")], capture_output=True, text=True, timeout=300)
            assert stopped.returncode == 0, stopped.stderr


# --- helpers ----------------------------------------------------------------------------------


def sacct_state(job_id: str) -> str:
    """The job's state as accounting (slurmdbd) has it; '' while it has no record yet."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] if out else ""


def wait_state(job_id: str, wanted: set[str], timeout_s: float) -> tuple[str, float]:
    """Polls sacct until the job's state is one of `wanted`; returns it and the time it took."""
    t0 = time.monotonic()
    while True:
        state = sacct_state(job_id)
        if state in wanted:
            return state, time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"job {job_id}: state {state!r}, not {wanted} after {timeout_s} s"
        time.sleep(0.2)


def executor(folder: Path, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**{"timeout_min": 10, "mem_gb": 1, "cpus_per_task": 1, **params})
    return ex


# functions the jobs run (pickled by value)


def gpu_env() -> dict[str, str | None]:
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_JOB_PARTITION", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID")
    return {k: os.environ.get(k) for k in keys}


def square(x: int) -> int:
    return x * x


def sleeper(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def meet(folder: str, me: int, total: int) -> dict[str, str | None]:
    """Waits until `total` jobs are running at the same time, then reports its GPU."""
    Path(folder, str(me)).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(folder).iterdir())) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(Path(folder).iterdir()))} of {total} jobs ran at once")
        time.sleep(0.1)
    return gpu_env()


# --- tests ------------------------------------------------------------------------------------


def test_gpu_job_sees_its_gpu_and_completes_in_accounting(slurm_cluster, tmp_path):
    ex = executor(tmp_path, slurm_partition="gpu", gpus_per_node=1, name="gl-gpu")
    t0 = time.monotonic()
    job = ex.submit(gpu_env)
    env = job.result()
    latency = time.monotonic() - t0
    print(f"\n[slurm] submit -> result: {latency:.2f} s", file=sys.stderr)
    assert env["CUDA_VISIBLE_DEVICES"] in {"0", "1", "2", "3"}
    assert env["SLURM_JOB_GPUS"] == env["CUDA_VISIBLE_DEVICES"]
    assert env["SLURM_JOB_PARTITION"] == "gpu" and env["SLURM_JOB_ID"] == job.job_id
    state, _ = wait_state(job.job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}, 30)
    assert state == "COMPLETED"
    assert job.get_info()["State"] == "COMPLETED"  # what submitit itself reads from sacct
    assert latency < 30


def test_batch_of_three_is_one_array_job(slurm_cluster, tmp_path, monkeypatch):
    # count sbatch calls with a wrapper first on PATH
    calls = tmp_path / "sbatch-calls"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("sbatch")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")

    ex = executor(tmp_path / "jobs", slurm_partition="cpu", name="gl-array")
    with ex.batch():
        jobs = [ex.submit(square, i) for i in range(3)]
    assert len(calls.read_text().splitlines()) == 1
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1, [job.job_id for job in jobs]
    (array_id,) = array_ids
    assert [job.job_id for job in jobs] == [f"{array_id}_{i}" for i in range(3)]
    assert [job.result() for job in jobs] == [0, 1, 4]
    for job in jobs:
        assert wait_state(job.job_id, {"COMPLETED", "FAILED"}, 30)[0] == "COMPLETED"


def test_cancel_ends_a_running_job_within_seconds(slurm_cluster, tmp_path):
    ex = executor(tmp_path, slurm_partition="gpu", gpus_per_node=1, name="gl-sleep")
    pid_file = tmp_path / "pid"
    job = ex.submit(sleeper, str(pid_file))
    wait_state(job.job_id, {"RUNNING"}, 30)
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the job's function never started"
        time.sleep(0.1)
    pid = int(pid_file.read_text())

    t0 = time.monotonic()
    job.cancel()
    state, took = wait_state(job.job_id, {"CANCELLED", "COMPLETED", "FAILED"}, 10)
    assert state == "CANCELLED"
    print(f"\n[slurm] cancel -> sacct CANCELLED: {took:.2f} s", file=sys.stderr)
    # submitit counts it as done once sacct says so (never relying on result(), which waits 15 s)
    assert job.done(force_check=True)
    # the job's processes are gone after KillWait (5 s)
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() - t0 < 20, f"the cancelled job's process {pid} is still alive"
        time.sleep(0.2)
    gone = time.monotonic() - t0
    while subprocess.run(["squeue", "-h", "-j", job.job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() - t0 < 30, "the cancelled job is still in squeue"
        time.sleep(0.2)
    print(f"[slurm] cancel -> process gone: {gone:.2f} s, out of squeue: {time.monotonic() - t0:.2f} s", file=sys.stderr)


def test_more_gpus_than_the_node_has_is_refused_at_submission(slurm_cluster, tmp_path):
    ex = executor(tmp_path, slurm_partition="gpu", gpus_per_node=5, name="gl-toomany")
    with pytest.raises(Exception, match="Requested node configuration is not available"):
        ex.submit(gpu_env)
    ex = executor(tmp_path, slurm_partition="gpu", slurm_gres="gpu:5", name="gl-toomany")
    with pytest.raises(Exception, match="Requested node configuration is not available"):
        ex.submit(gpu_env)


def test_cpu_partition_job_runs_without_gpu(slurm_cluster, tmp_path):
    ex = executor(tmp_path, slurm_partition="cpu", mem_gb=4, name="gl-cpu")
    env = ex.submit(gpu_env).result()
    assert env["SLURM_JOB_PARTITION"] == "cpu"
    assert env["SLURM_JOB_GPUS"] is None and env["CUDA_VISIBLE_DEVICES"] is None


def test_four_gpu_jobs_run_at_once_on_distinct_gpus(slurm_cluster, tmp_path):
    """More jobs than the machine has cores run together (CPUs=8), each memory request is
    accepted, and each job gets its own fake GPU."""
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    ex = executor(tmp_path / "jobs", slurm_partition="gpu", gpus_per_node=1, mem_gb=4, name="gl-four")
    with ex.batch():
        jobs = [ex.submit(meet, str(meeting), i, 4) for i in range(4)]
    envs = [job.result() for job in jobs]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1", "2", "3"]
