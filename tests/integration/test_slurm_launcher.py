"""``python -m launcher cluster=slurm`` on the project's real single-node Slurm cluster
(tests/slurm/start.sh): fake GPUs through gres, job arrays, fail fast, no orphaned job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from server.registry import Registry
from tests.support import STANDIN_SERVER, queued, start_launcher, sweep, sweep_summaries

# Small requests so servers and the collector share the 8 (fake) CPUs of the test node.
SLURM = ["cluster=slurm", "server.gpus_per_replica=1", "cluster.gpus_per_node=4", "cluster.cpus_per_task=1",
         "cluster.mem_gb=4", "job.partition=cpu", "job.cpus_per_task=1", "job.mem_gb=2"]


def launcher(slurm_cluster, registry_root: Path, run_dir: Path, *overrides: str) -> subprocess.Popen:
    cluster = [o for o in SLURM if not o.startswith("job.")] if "job=none" in overrides else SLURM
    return start_launcher(registry_root, *cluster, f"hydra.run.dir={run_dir}", *overrides, env=slurm_cluster.env)


def sacct(slurm_cluster, job_id: str, fields: str) -> list[list[str]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job_id, "-o", fields], env={**os.environ, **slurm_cluster.env},
        capture_output=True, text=True, check=True,
    ).stdout
    return [line.split("|") for line in out.splitlines() if line]


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"no line starting {prefix!r}:\n" + "".join(lines))


def test_two_replicas_on_slurm_with_fake_gpus_are_one_job_array(slurm_cluster, tmp_path):
    """The stand-in engine: the array, the gres and the teardown are the launcher's and Slurm's; real
    vLLM on a fake GPU of this cluster runs in test_readme.py (the embedded default, as written)."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc = launcher(slurm_cluster, root, run_dir, *STANDIN_SERVER, "server.replicas=2")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    ids = [s["job_id"] for s in summary["servers"]]
    array_ids = {i.split("_")[0] for i in ids}
    assert len(ids) == 2 and len(array_ids) == 1 and all("_" in i for i in ids), ids  # one sbatch
    for job_id in ids:
        (tres,) = sacct(slurm_cluster, job_id, "AllocTRES")[0]
        assert "gres/gpu=1" in tres, tres
    assert summary["collection"]["rollouts_written"] >= 16
    assert Registry(root).namespaces() == []
    assert not set(queued()) & {*ids, *array_ids}


def test_a_failing_server_job_fails_the_run_fast(slurm_cluster, tmp_path):
    """An engine that exits at once, naming what it lacks (vLLM's own complaint about a model path
    reaching the output: test_launcher.py's dying server)."""
    not_a_model = tmp_path / "not-a-model"
    fails = f'server.command="{{python}} -c \\"import sys; sys.exit(\'no model in {not_a_model}\')\\""'
    proc = launcher(slurm_cluster, tmp_path / "registry", tmp_path / "run", *STANDIN_SERVER, fails, "job=none")
    out, _ = proc.communicate(timeout=600)
    exited = datetime.now()
    assert proc.returncode == 1, out
    assert "ended while starting" in out and f"no model in {not_a_model}" in out  # the engine's log tail
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (job_id,) = [s["job_id"] for s in summary["servers"]]
    state, end = sacct(slurm_cluster, job_id, "State,End")[0]
    assert state == "FAILED", state
    lag = (exited - datetime.fromisoformat(end)).total_seconds()
    print(f"launcher exited {lag:.1f}s after the server job failed")
    assert lag < 15


def test_ctrl_c_during_readiness_leaves_nothing(slurm_cluster, tmp_path):
    root = tmp_path / "registry"
    proc = launcher(slurm_cluster, root, tmp_path / "run")
    wait_for_line(proc, "submitted policy/0", timeout_s=120)
    time.sleep(3)  # the job is starting: vLLM imports take ~20 s
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted", out
    job_ids = {s["job_id"] for s in summary["servers"]}
    assert not set(queued()) & job_ids
    assert Registry(root).namespaces() == []


def test_a_killed_launchers_server_jobs_end_after_the_grace_period(slurm_cluster, tmp_path):
    """The stand-in engine: the server job watches its launcher's heartbeat whatever its engine, and
    stops a vLLM engine as on any teardown (test_launcher.py stops real ones)."""
    root = tmp_path / "registry"
    proc = launcher(slurm_cluster, root, tmp_path / "run", *STANDIN_SERVER, "job=none", "registry.heartbeat_s=1",
                    "registry.ttl_s=5", "registry.orphan_grace_s=5")
    wait_for_line(proc, "serving policy at ", timeout_s=600)
    (namespace,) = Registry(root).namespaces()
    job_ids = json.loads((root / namespace / ".jobs.json").read_text())["job_ids"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while set(queued()) & set(job_ids):
        assert time.monotonic() - killed < 60, "a server job outlived its launcher"
        time.sleep(0.5)
    print(f"last server job gone {time.monotonic() - killed:.1f}s after SIGKILL (orphan_grace_s=5)")
    assert Registry(root).entries(namespace) == []


def run_sweep(slurm_cluster, tmp_path: Path, *overrides: str) -> list[dict]:
    root = tmp_path / "registry"
    out = sweep(tmp_path, root, *SLURM, *overrides, env=slurm_cluster.env)
    assert out.returncode == 0, out.stdout + out.stderr
    summaries = sweep_summaries(tmp_path)
    assert all(s["status"] == "succeeded" for s in summaries)
    assert len({s["namespace"] for s in summaries}) == 1
    assert len({tuple(x["job_id"] for x in s["servers"]) for s in summaries}) == 1  # one pool, one sbatch
    assert len({s["gateway"]["job_id"] for s in summaries}) == 1  # one gateway, in front of it
    assert sorted(s["joined_servers"] for s in summaries) == [False, True]
    # A point's job reports its result before its process lets go of the pool: allow that moment.
    server_ids = {x["job_id"] for s in summaries for x in s["servers"]} | {summaries[0]["gateway"]["job_id"]}
    deadline = time.monotonic() + 60
    while Registry(root).namespaces() or set(queued()) & server_ids:
        assert time.monotonic() < deadline, f"pool left behind: {Registry(root).namespaces()}, {queued()}"
        time.sleep(0.5)
    return summaries


def test_a_sweep_on_slurm_shares_one_server_pool(slurm_cluster, tmp_path):
    run_sweep(slurm_cluster, tmp_path)


def test_a_sweep_handed_to_slurm_shares_one_server_pool(slurm_cluster, tmp_path):
    """hydra/launcher=submitit_slurm: each point's launcher is itself a Slurm job, they run at
    the same moment, and launch-or-join under the pool's file lock still starts one pool."""
    run_sweep(
        slurm_cluster, tmp_path, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=30",
    )


def test_servers_and_the_gateway_listen_on_their_advertised_address_only(slurm_cluster, tmp_path):
    """cluster=slurm leaves cluster.bind_host null: each job listens where its registry URL points, not on
    every interface of the node (issue 19). 127.0.0.2 stands for the node's address: a loopback address
    this machine has, other than 127.0.0.1."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc = launcher(slurm_cluster, root, run_dir, *STANDIN_SERVER, "job=none", "cluster.advertise_host=127.0.0.2")
    try:
        wait_for_line(proc, "serving policy at ", timeout_s=300)
        entries = Registry(root).entries()
        assert {e.service for e in entries} == {"policy", "policy@gateway"}
        for entry in entries:
            assert entry.host == "127.0.0.2"
            socket.create_connection(("127.0.0.2", entry.port), timeout=5).close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", entry.port), timeout=5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
