"""The project's single-node Slurm cluster (tests/slurm/start.sh), used through submitit
exactly as the launcher uses a real cluster: sbatch via submitit, gres GPUs, job arrays,
cancellation, partitions, memory requests, accounting (sacct) states.

These tests are never skipped: when no cluster answers, the session fixture starts one with
tests/slurm/start.sh (root, Debian) and stops it with tests/slurm/stop.sh at the end; if the
start fails, the fixture fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.support import queued

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}

# The job processes unpickle the submitted functions; pickle this module's functions by value
# so a job does not depend on being able to import the test module (its cwd, sys.path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def jobs(slurm_cluster):
    """The jobs a test submits (append them); cancelled and waited out when it ends, pass or fail."""
    submitted: list[submitit.Job] = []
    yield submitted
    ids = sorted({job.job_id.split("_")[0] for job in submitted})
    slurm_cluster.job_ids.update(ids)
    if not ids:
        return

    def minequeued() -> bool:
        return any(j.split("_")[0] in ids for j in queued())

    # A job whose result is written is still RUNNING for a moment (srun, step cleanup): give
    # finished work a few seconds to end as COMPLETED rather than cancelling it.
    deadline = time.monotonic() + 5
    while minequeued() and time.monotonic() < deadline:
        time.sleep(0.2)
    if minequeued():
        subprocess.run(["scancel", *ids], capture_output=True)
        deadline = time.monotonic() + 30
        while minequeued() and time.monotonic() < deadline:
            time.sleep(0.2)


# --- helpers ----------------------------------------------------------------------------------


def describe(job_id: str) -> str:
    """What squeue says about a job (state and reason), for failure messages."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T %r"], capture_output=True, text=True)
    return (out.stdout.strip() or "not in squeue") + " | queue: " + " ".join(queued())


def sacct_state(job_id: str) -> str:
    """The job's state as accounting (slurmdbd) has it; '' while it has no record yet.
    (sacct lags the controller: a finished job may show RUNNING for 1-3 s.)"""
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
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"job {job_id}: sacct says {state!r}, not {wanted}, after {timeout_s} s ({describe(job_id)})")
        time.sleep(0.2)


def result_within(job: submitit.Job, timeout_s: float = 60):
    """job.result(), bounded: a job stuck in the queue fails the test with squeue's reason."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s ({describe(job.job_id)})")
        time.sleep(0.1)
    return job.result()


def executor(folder: Path, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**{"timeout_min": 10, "mem_gb": 1, "cpus_per_task": 1, **params})
    return ex


# functions the jobs run (pickled by value)


def gpu_env() -> dict[str, str | None]:
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_JOB_PARTITION", "SLURM_JOB_ID", "SLURM_MEM_PER_NODE")
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


def test_gpu_job_sees_its_gpu_and_completes_in_accounting(jobs, tmp_path):
    ex = executor(tmp_path, slurm_partition="gpu", gpus_per_node=1, mem_gb=2, name="gl-gpu")
    t0 = time.monotonic()
    job = ex.submit(gpu_env)
    jobs.append(job)
    env = result_within(job)
    latency = time.monotonic() - t0
    print(f"\n[slurm] submit -> result: {latency:.2f} s", file=sys.stderr)
    assert env["CUDA_VISIBLE_DEVICES"] in {"0", "1", "2", "3"}
    assert env["SLURM_JOB_GPUS"] == env["CUDA_VISIBLE_DEVICES"]
    assert env["SLURM_JOB_PARTITION"] == "gpu" and env["SLURM_JOB_ID"] == job.job_id
    assert env["SLURM_MEM_PER_NODE"] == "2048"  # the memory request was accepted as asked
    state, _ = wait_state(job.job_id, ENDED, 30)
    assert state == "COMPLETED"
    assert job.get_info()["State"] == "COMPLETED"  # what submitit itself reads from sacct
    assert latency < 30


def test_batch_of_three_is_one_array_job(jobs, tmp_path, monkeypatch):
    # count sbatch calls with a wrapper first on PATH
    calls = tmp_path / "sbatch-calls"
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("sbatch")} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")

    ex = executor(tmp_path / "jobs", slurm_partition="cpu", name="gl-array")
    with ex.batch():
        batch = [ex.submit(square, i) for i in range(3)]
    jobs.extend(batch)
    assert len(calls.read_text().splitlines()) == 1
    array_ids = {job.job_id.split("_")[0] for job in batch}
    assert len(array_ids) == 1, [job.job_id for job in batch]
    (array_id,) = array_ids
    assert [job.job_id for job in batch] == [f"{array_id}_{i}" for i in range(3)]
    assert [result_within(job) for job in batch] == [0, 1, 4]
    for job in batch:
        assert wait_state(job.job_id, ENDED, 30)[0] == "COMPLETED"


def test_cancel_ends_a_running_job_within_seconds(jobs, tmp_path):
    ex = executor(tmp_path, slurm_partition="gpu", gpus_per_node=1, name="gl-sleep")
    pid_file = tmp_path / "pid"
    job = ex.submit(sleeper, str(pid_file))
    jobs.append(job)
    deadline = time.monotonic() + 30
    while not pid_file.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the job's function never started ({describe(job.job_id)})")
        time.sleep(0.1)
    pid = int(pid_file.read_text())

    t0 = time.monotonic()
    job.cancel()
    state, took = wait_state(job.job_id, ENDED, 10)
    assert state == "CANCELLED"
    print(f"\n[slurm] cancel -> sacct CANCELLED: {took:.2f} s", file=sys.stderr)
    # submitit counts it as done once sacct says so (never relying on result(), which waits 15 s)
    assert job.done(force_check=True)
    # the job's processes are gone after KillWait (5 s): submitit's wrapper ignores SIGTERM
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() - t0 < 20, f"the cancelled job's process {pid} is still alive"
        time.sleep(0.1)
    gone = time.monotonic() - t0
    while job.job_id in queued():
        assert time.monotonic() - t0 < 30, "the cancelled job is still in squeue"
        time.sleep(0.1)
    print(f"[slurm] cancel -> process gone: {gone:.2f} s, out of squeue: {time.monotonic() - t0:.2f} s", file=sys.stderr)


def test_more_gpus_than_the_node_has_is_refused_at_submission(jobs, tmp_path):
    for params in ({"gpus_per_node": 5}, {"slurm_gres": "gpu:5"}):
        ex = executor(tmp_path, slurm_partition="gpu", name="gl-toomany", **params)
        with pytest.raises(submitit.core.utils.FailedJobError, match="Requested node configuration is not available"):
            jobs.append(ex.submit(gpu_env))


def test_more_memory_than_the_node_has_is_refused_at_submission(jobs, tmp_path):
    ex = executor(tmp_path, slurm_partition="cpu", mem_gb=10_000, name="gl-toobig")
    with pytest.raises(submitit.core.utils.FailedJobError, match="Memory specification can not be satisfied"):
        jobs.append(ex.submit(gpu_env))


def test_cpu_partition_job_runs_without_gpu(jobs, tmp_path):
    ex = executor(tmp_path, slurm_partition="cpu", mem_gb=4, name="gl-cpu")
    job = ex.submit(gpu_env)
    jobs.append(job)
    env = result_within(job)
    assert env["SLURM_JOB_PARTITION"] == "cpu"
    assert env["SLURM_JOB_GPUS"] is None and env["CUDA_VISIBLE_DEVICES"] is None


def test_four_gpu_jobs_run_at_once_on_distinct_gpus(jobs, tmp_path):
    """More jobs than the machine has cores run together (CPUs=8), each with a memory request
    (memory is not a consumable resource), and each gets its own fake GPU."""
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    ex = executor(tmp_path / "jobs", slurm_partition="gpu", gpus_per_node=1, mem_gb=8, name="gl-four")
    with ex.batch():
        batch = [ex.submit(meet, str(meeting), i, 4) for i in range(4)]
    jobs.extend(batch)
    envs = [result_within(job, 90) for job in batch]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1", "2", "3"]
