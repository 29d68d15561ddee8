"""What the Slurm test cluster (tests/slurm/start.sh: one node, 8 CPUs, ~23.5 GB, 4 gres GPUs,
partitions gpu, cpu and shared) can never run is refused before submission, sbatch's own refusals come
without a traceback, and a run whose jobs starve each other fails fast: always with the numbers
and the key to change, and leaving no job and no registry namespace. Real Slurm, real submitit."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from launcher.executors import Resources, SlurmBackend
from launcher.spec import ClusterSpec
from server.registry import Registry
from tests.support import STANDIN_SERVER, run_launcher, start_launcher

# A stand-in server (no model, ready in seconds) on the test cluster, small requests.
SMALL = ["cluster=slurm", "cluster.cpus_per_task=1", "cluster.mem_gb=4", "server.gpus_per_replica=1",
         "job.partition=cpu", "job.cpus_per_task=1", "job.mem_gb=2"]


def unique_name() -> str:
    return f"fit{secrets.token_hex(3)}"


def slurm_jobs_named(slurm_cluster, name: str, since: str) -> list[str]:
    """Every job of this run, queued (squeue) or in accounting (sacct), by the run's job-name prefix."""
    env = {**os.environ, **slurm_cluster.env}
    queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i %j"], env=env, capture_output=True, text=True,
                            check=True).stdout.splitlines()
    accounted = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, "-o", "JobID,JobName"], env=env,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in queued + accounted if name in line]


def refused(slurm_cluster, tmp_path: Path, *overrides: str) -> str:
    """``python -m launcher`` with ``overrides`` exits 2, says why, submits nothing, leaves no namespace."""
    name, since = unique_name(), time.strftime("%Y-%m-%dT%H:%M:%S")
    root = tmp_path / "registry"
    t0 = time.monotonic()
    out = run_launcher(root, *STANDIN_SERVER, *overrides, f"run.name={name}", f"hydra.run.dir={tmp_path / 'run'}",
                       env=slurm_cluster.env, timeout_s=120)
    print(f"refused in {time.monotonic() - t0:.1f}s (whole launcher process)")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "the cluster can never run this configuration (nothing was submitted)" in text, text
    assert "Traceback" not in text, text
    assert slurm_jobs_named(slurm_cluster, name, since) == []
    assert Registry(root).namespaces() == []
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder
    return " ".join(text.split())  # rich wraps long lines


def test_memory_no_node_has_is_refused_before_submission(slurm_cluster, tmp_path):
    text = refused(slurm_cluster, tmp_path, *SMALL, "cluster.mem_gb=64")
    assert ("cluster.mem_gb: 64 GB per job, but the only node of partition gpu (vm) has 23.5 GB (RealMemory "
            in text), text
    assert "set cluster.mem_gb <= 23" in text


@pytest.mark.parametrize("overrides, message", [
    (["cluster.cpus_per_task=16"],
     "cluster.cpus_per_task: 16 CPUs per task, but the only node of partition gpu (vm) has 8: "
     "set cluster.cpus_per_task <= 8"),
    (["server.gpus_per_replica=5", "server.tensor_parallel_size=5"],
     "server.gpus_per_replica: 5 GPUs per replica, but the only node of partition gpu (vm) has 4 "
     "(gres gpu:4); a replica runs on one node: set server.gpus_per_replica <= 4"),
    (["job.partition=cpus"],
     "job.partition: partition 'cpus' does not exist; this cluster has gpu (default), cpu, shared: "
     "set job.partition to one of them"),
], ids=["cpus", "gpus", "unknown partition"])
def test_what_no_node_has_is_refused_before_submission(slurm_cluster, tmp_path, overrides, message):
    text = refused(slurm_cluster, tmp_path, *SMALL, *overrides)
    assert message in text, text


def test_a_collector_that_can_never_run_beside_its_server_is_refused_before_submission(slurm_cluster, tmp_path):
    text = refused(slurm_cluster, tmp_path, *SMALL, "cluster.cpus_per_task=5", "job.cpus_per_task=4")
    assert ("CPUs: 1 x 5 (cluster.cpus_per_task) + 1 (gateway.cpus_per_task) + 4 (job.cpus_per_task) = 10, but vm, "
            "the only node of partitions gpu and cpu, has 8 CPUs") in text, text
    assert "change one of: cluster.cpus_per_task <= 3; job.cpus_per_task <= 2" in text


def test_a_collector_starved_by_its_own_server_fails_the_run_fast(slurm_cluster, tmp_path):
    """With the check before submission off, the same run is caught once the collector pends:
    the launcher fails it with the explanation instead of waiting forever."""
    name, since, root = unique_name(), time.strftime("%Y-%m-%dT%H:%M:%S"), tmp_path / "registry"
    t0 = time.monotonic()
    proc = start_launcher(root, *STANDIN_SERVER, *SMALL, "cluster.fit_check=false", "cluster.cpus_per_task=5",
                          "job.cpus_per_task=4", f"run.name={name}", f"hydra.run.dir={tmp_path / 'run'}",
                          env=slurm_cluster.env)
    lines, submitted_at = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("submitted rollouts: job"):
            submitted_at = time.monotonic()
            slurm_cluster.job_ids.add(line.split()[3].rstrip(","))
    proc.wait(timeout=60)
    ended = time.monotonic()
    text = " ".join("".join(lines).split())
    assert proc.returncode == 1, text
    assert submitted_at is not None, text
    print(f"run failed {ended - submitted_at:.1f}s after the collector was submitted ({ended - t0:.1f}s in all)")
    assert ended - submitted_at < 60
    assert "is PENDING (Resources) and can never start: it needs 4 CPUs on a node of partition cpu, and this " \
           "run's own jobs hold them (on vm, job" in text, text
    assert "hold 6 of its 8 CPUs" in text, text  # a server (5) and the gateway (1)
    # The fix is computed for the whole run: the server, the gateway and this job side by side.
    assert "change one of: cluster.cpus_per_task <= 3; job.cpus_per_task <= 2" in text
    assert "Traceback" not in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "can never start" in summary["error"]
    server_ids = {s["job_id"] for s in summary["servers"]}
    slurm_cluster.job_ids.update(server_ids)
    env = {**os.environ, **slurm_cluster.env}
    queued = subprocess.run(["squeue", "-h", "-o", "%i %j"], env=env, capture_output=True, text=True).stdout
    assert name not in queued, queued
    assert Registry(root).namespaces() == []
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-S", since, "-o", "JobName,State"], env=env,
                            capture_output=True, text=True).stdout
    ours = [line for line in states.splitlines() if name in line]
    # The servers, the gateway and the collector, all ended.
    assert len(ours) == 3 and all(line.split("|")[1].startswith(("CANCELLED", "COMPLETED")) for line in ours), ours


def test_sbatchs_own_refusal_is_printed_without_a_traceback_and_leaves_nothing(slurm_cluster, tmp_path):
    name, since, root = unique_name(), time.strftime("%Y-%m-%dT%H:%M:%S"), tmp_path / "registry"
    out = run_launcher(root, *STANDIN_SERVER, *SMALL, "+cluster.additional_parameters.nodelist=nosuchnode",
                       f"run.name={name}", f"hydra.run.dir={tmp_path / 'run'}", env=slurm_cluster.env, timeout_s=120)
    text = out.stdout + out.stderr
    flat = " ".join(text.split())
    assert out.returncode == 1, text
    assert "Traceback" not in text, text
    assert "sbatch refused the policy server replica: sbatch: error: Batch job submission failed: Invalid node " \
           "name specified" in flat, text
    assert "--nodelist=nosuchnode (cluster.additional_parameters.nodelist)" in flat
    assert "--partition=gpu (cluster.partition)" in flat and "--mem=4096M (cluster.mem_gb)" in flat
    assert slurm_jobs_named(slurm_cluster, name, since) == []
    assert Registry(root).namespaces() == []


def test_the_check_costs_two_scontrol_calls(slurm_cluster, tmp_path):
    backend = SlurmBackend(ClusterSpec(kind="slurm", cpus_per_task=2, mem_gb=4), tmp_path)
    jobs = [Resources(name="s", timeout_min=60, gpus=1, count=2, what="server replica",
                      keys={"count": "server.replicas"}),
            Resources(name="j", timeout_min=60, partition="cpu", cpus_per_task=4, mem_gb=8, what="rollouts job")]
    timings = []
    for _ in range(5):
        t0 = time.perf_counter()
        backend.preflight(jobs)
        timings.append(time.perf_counter() - t0)
    print(f"preflight: best {min(timings) * 1000:.1f} ms, worst {max(timings) * 1000:.1f} ms (2 scontrol calls)")
    assert backend._config is None  # scontrol show config was not needed
    assert min(timings) < 0.5


def test_replicas_starved_by_their_own_siblings_fail_the_run_fast(slurm_cluster, tmp_path):
    """Two replicas of 5 CPUs on the 8-CPU node (check before submission off): the second waits for
    the first, which runs until the run ends; readiness fails the run with the explanation."""
    name, root = unique_name(), tmp_path / "registry"
    t0 = time.monotonic()
    cluster = [o for o in SMALL if not o.startswith("job.")]  # job=none has no job.* keys
    out = run_launcher(root, *STANDIN_SERVER, *cluster, "cluster.fit_check=false", "cluster.cpus_per_task=5",
                       "server.replicas=2", "job=none", f"run.name={name}", f"hydra.run.dir={tmp_path / 'run'}",
                       env=slurm_cluster.env, timeout_s=120)
    took = time.monotonic() - t0
    text = " ".join((out.stdout + out.stderr).split())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    slurm_cluster.job_ids.update(s["job_id"].split("_")[0] for s in summary["servers"])
    print(f"run failed after {took:.1f}s")
    assert out.returncode == 1, text
    assert took < 60
    assert "policy server replica" in text and "is PENDING (Resources) and can never start: it needs 5 CPUs" in text
    assert "at most 1 of the 2 policy server replicas fit at once" in text, text
    # The fix counts the gateway's CPU beside both replicas: 2 x 3 + 1 <= 8.
    assert "change one of: cluster.cpus_per_task <= 3; server.replicas <= 1" in text
    env = {**os.environ, **slurm_cluster.env}
    assert name not in subprocess.run(["squeue", "-h", "-o", "%j"], env=env, capture_output=True, text=True).stdout
    assert Registry(root).namespaces() == []


def test_an_account_slurm_does_not_enforce_is_not_refused(slurm_cluster, tmp_path):
    """The test cluster has AccountingStorageEnforce=none: sbatch takes any account, so the check
    (sacctmgr, then the config) must not refuse one."""
    backend = SlurmBackend(ClusterSpec(kind="slurm", account="no_such_account", mem_gb=4), tmp_path)
    t0 = time.perf_counter()
    assert backend.preflight([Resources(name="s", timeout_min=60, gpus=1, what="server replica")])
    print(f"preflight with cluster.account: {(time.perf_counter() - t0) * 1000:.0f} ms (+ sacctmgr, scontrol show config)")
    assert backend._config is not None and backend._config.enforce == "none"


# The README's cluster=slurm_testcluster as a new user ran it, with the stand-in engine (what is
# proven is the launcher's arithmetic and Slurm's placement, not vLLM's).
TESTCLUSTER = ["cluster=slurm_testcluster", "job.sampling.max_tokens=16"]


def check_refusal(*overrides: str) -> str | None:
    """The launcher's check (launcher.orchestrate.check_cluster) on the real cluster's scontrol text,
    for the config these overrides compose (SLURM_CONF: the slurm_cluster fixture's): its refusal, or
    None when it passes."""
    from launcher.executors import ClusterRefused
    from launcher.orchestrate import check_cluster
    from tests.test_spec import spec_for

    try:
        check_cluster(spec_for(*STANDIN_SERVER, *TESTCLUSTER, *overrides))
    except ClusterRefused as e:
        return str(e)
    return None


def test_every_fix_a_refusal_proposes_passes_the_check_on_the_cluster(slurm_cluster, tmp_path):
    """Observed: `server.replicas=5` was refused with `server.replicas <= 2`; that passed, and the run failed
    at 108 s with the collector pending behind 2 x 2 + 1 (gateway) of the node's 8 CPUs."""
    from tests.test_slurm_fit import proposed_fixes

    text = refused(slurm_cluster, tmp_path, *TESTCLUSTER, "server.replicas=5")
    assert ("CPUs: 5 x 2 (cluster.cpus_per_task) + 1 (gateway.cpus_per_task) + 4 (job.cpus_per_task) = 15, but "
            "vm, the only node of partition gpu, has 8 CPUs") in text, text
    assert "change one of: server.replicas <= 1" in text, text
    tried = []
    for overrides in (["server.replicas=5"], ["server.replicas=2"], ["server.replicas=3", "job.cpus_per_task=2"],
                      ["server.replicas=2", "cluster.cpus_per_task=3", "job.partition=cpu"]):
        refusal = check_refusal(*overrides)
        assert refusal is not None, overrides  # server.replicas=2 passed on main: the advice followed
        for fix in proposed_fixes(refusal):
            tried.append(fix)
            assert check_refusal(*overrides, fix) is None, f"{fix}, proposed for {overrides}:\n{refusal}"
    print("fixes applied and re-checked:", tried)
    assert len(tried) >= 6


def test_a_run_that_follows_the_proposed_fix_runs_and_its_jobs_are_named_by_run(slurm_cluster, tmp_path):
    """`server.replicas=2` is refused (2 x 2 + 1 + 4 = 9 CPUs); with the fix `job.cpus_per_task <= 3` applied
    the run's four jobs fill the 8 CPUs and the run succeeds (told that rollovers would have no room). squeue names each job
    `<run name>-<service>[-gateway|-job]-<run id's tail>`: a second run of the same name differs."""
    text = refused(slurm_cluster, tmp_path / "refused", *TESTCLUSTER, "server.replicas=2")
    assert "change one of: cluster.cpus_per_task <= 1; job.cpus_per_task <= 3; server.replicas <= 1" in text, text
    name, env = unique_name(), {**os.environ, **slurm_cluster.env}
    names: dict[str, set[str]] = {}
    for attempt in ("first", "second"):
        run_dir, root = tmp_path / attempt, tmp_path / f"registry-{attempt}"
        proc = start_launcher(root, *STANDIN_SERVER, *TESTCLUSTER, "server.replicas=2", "job.cpus_per_task=3",
                              f"run.name={name}", f"hydra.run.dir={run_dir}", env=slurm_cluster.env)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        seen = set()
        while proc.poll() is None:  # every job of the run, by name, while it is queued
            out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%j"], env=env, capture_output=True,
                                 text=True).stdout
            seen |= {tuple(line.split("|", 1)) for line in out.splitlines() if name in line}
            time.sleep(0.5)
        reader.join(timeout=10)
        summary = json.loads((run_dir / "summary.json").read_text())
        slurm_cluster.job_ids.update(s["job_id"].split("_")[0] for s in summary["servers"])
        assert proc.returncode == 0, "".join(output)
        assert summary["status"] == "succeeded" and summary["collection"], summary
        tail = summary["run_id"].rsplit("-", 1)[1]
        names[attempt] = {job_name for _, job_name in seen}
        print(f"{attempt} run {summary['run_id']}: squeue showed {sorted(seen)}")
        assert names[attempt] == {f"{name}-policy-{tail}", f"{name}-policy-gateway-{tail}",
                                  f"{name}-policy-job-{tail}"}, seen
        assert len({job_id for job_id, job_name in seen if job_name == f"{name}-policy-{tail}"}) == 2, seen
        # 8 of 8 CPUs: a replica's rollover successor would wait for the old job's end; the user is told.
        assert "note: no room beside the run for a policy server replica's rollover successor" in \
            " ".join("".join(output).split()), output
    assert not names["first"] & names["second"], names
