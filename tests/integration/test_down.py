"""``launcher.down`` hands job ids to the backend of the cluster kind that recorded them, on the
real test Slurm: a single (non-array) Slurm job id is a plain number that could also be a local
pid, and must never reach ``os.kill``."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from launcher.down import down
from server.registry import Entry, JobRecord, Registry


def _sbatch_sleep(slurm_cluster) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name", "gymlaunch-down-test", "--wrap", "sleep 300"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    slurm_cluster.job_ids.add(job_id)
    return job_id


def _listed(job_id: str) -> bool:
    return job_id in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def _entry(namespace: str, job_id: str, cluster: str) -> Entry:
    now = time.time()
    return Entry(
        namespace=namespace, service="policy", replica=0, model="m", host="127.0.0.1", port=1, engine="vllm",
        engine_version="0", job_id=job_id, node="n", pid=os.getpid(), state="ready", started_at=now,
        heartbeat_at=now, cluster=cluster,
    )


@pytest.fixture
def no_local_signals(monkeypatch):
    """Every local signal ``down`` tries to send, recorded and not sent: none may happen here."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    return sent


@pytest.mark.parametrize("recorded_by", ["job record", "entry"])
def test_down_cancels_a_single_slurm_job_through_slurm_only(slurm_cluster, tmp_path, no_local_signals, recorded_by):
    job_id = _sbatch_sleep(slurm_cluster)
    assert job_id.isdigit() and _listed(job_id)
    registry = Registry(tmp_path / "registry")
    if recorded_by == "job record":  # what the launcher writes when it submits
        registry.record_jobs("run-x", JobRecord(kind="slurm", job_ids=[job_id]))
        registry.create_api_key("run-x")
    else:  # only the server's entry is left: it names its scheduler
        registry.publish(_entry("run-x", job_id, cluster="slurm"))

    what, name, cancelled = down(registry, "run-x", wait_s=30)

    assert (what, name, cancelled) == ("namespace", "run-x", [job_id])
    deadline = time.monotonic() + 30
    while _listed(job_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listed(job_id), f"Slurm job {job_id} still queued after launcher.down"
    assert no_local_signals == [], f"launcher.down signalled local pids {no_local_signals} for a Slurm job"
    assert registry.namespaces() == []

