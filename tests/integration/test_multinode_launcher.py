"""Replicas spanning two nodes of the multi-node test cluster (network namespaces n1, n2), run by
``python -m launcher`` as a user runs it: the stand-in engine in its multi-node role (a head that
serves only once its worker joined it over the nodes' network, and that hangs like vLLM's pipeline
parallel head when the worker goes), so start order, addresses, environment and failure
propagation are all real; real vLLM across the two nodes in test_multinode_vllm.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from server.registry import Registry
from tests.support import FAST_HEARTBEATS, ROOT, command_lines, start_launcher

MULTI_STANDIN = ("{python} -m server.standin --host {host} --port {port} --model {served_name} "
                 "--nnodes {nnodes} --node-rank {node_rank} --head-addr {head_addr} --dist-port {dist_port} "
                 "--own-addr {own_addr} --seconds-per-token 0.01")


def multi(cluster, *more: str, job: bool = True) -> list[str]:
    """A replica of 2 nodes (1 CPU and a fake GPU of each: pipeline parallel 2, as the arithmetic
    checks want), the gateway and the collector beside it on the same two nodes; every job advertises
    its eth0 address (node names do not resolve)."""
    jobs = [f"job.partition={cluster.partition}", "job.cpus_per_task=1", "job.mem_gb=2"] if job else ["job=none"]
    return ["cluster=slurm_testcluster", f"cluster.partition={cluster.partition}", *jobs, "cluster.gpus_per_node=1",
            "server.nodes_per_replica=2", "server.gpus_per_replica=2", "server.pipeline_parallel_size=2",
            "cluster.cpus_per_task=1", "cluster.mem_gb=2",
            "cluster.advertise_interface=eth0", "server=openai_command", f'server.command="{MULTI_STANDIN}"',
            "model.embedded=null", "model.path=standin/model", f"model.served_name=mn-{uuid.uuid4().hex[:8]}",
            *FAST_HEARTBEATS, *more]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _standins(served_name: str) -> list[int]:
    return [pid for pid, argv in command_lines().items() if "server.standin" in argv and served_name in argv]


def _all_stopped(served_name: str) -> bool:
    """No stand-in of this run on any node (all nodes' processes are visible here: the namespaces
    separate networks and hostnames, not processes), within the stop grace of scancel's SIGTERM."""
    deadline = time.monotonic() + 30
    while _standins(served_name) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _standins(served_name)


def _served_name(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("model.served_name="))


def test_a_worker_engine_killed_fails_the_replica_within_seconds_and_it_is_replaced(slurm_multinode, tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    overrides = multi(slurm_multinode, f"hydra.run.dir={run_dir}", "job.num_repeats=3", "job.max_concurrency=4")
    proc = start_launcher(root, *overrides, env=slurm_multinode.env)
    rollouts = run_dir / "rollouts.jsonl"
    try:
        deadline = time.monotonic() + 300
        while _lines(rollouts) < 4:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        registry = Registry(root)
        (head,) = registry.entries(service="policy")
        slurm_multinode.job_ids.add(head.job_id.split("_")[0])
        beats = registry.nodes(head.namespace, "policy", 0, head.job_id)
        # The head serves from n1 at its bridge address; the worker runs on n2.
        assert (beats[0].host, beats[1].host) == ("n1", "n2") and head.host == slurm_multinode.nodes[0].address
        os.kill(beats[1].engine_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while registry.entry(head.namespace, "policy", 0, head.job_id) is not None:
            assert time.monotonic() - killed_at < 30, "the broken replica's entry is still there after 30 s"
            time.sleep(0.05)
        dead_after = time.monotonic() - killed_at
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(out[-4000:])
    print(f"worker engine SIGKILLed -> replica dead (entry gone) in {dead_after:.2f} s")
    assert dead_after <= 5.0  # the head does not keep the run waiting (it would hang on its requests)
    assert proc.returncode == 0, out
    note = registry.death_note(head.namespace, "policy", 0, head.job_id)
    assert note is None or "node 1" in note  # the namespace is removed at the end
    # The report names the broken node and carries both nodes' engine log tails.
    # Said by the head (it read the worker's beat) or by the worker itself (srun ended the head first).
    assert re.search(r"died in use: (node 1 \(n2, [0-9.]+\): )?node 1 engine killed by signal 9", out), out
    report = (run_dir / "launcher.log").read_text()
    assert "--- node 0:" in report and "--- node 1:" in report, report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["servers"][0]["restarts"] == 1, summary["servers"]
    rows = [json.loads(line) for line in rollouts.read_text().splitlines()]
    assert len(rows) == summary["collection"]["rollouts_written"] == len({(r["task_id"], r["repeat"]) for r in rows})
    assert not (run_dir / "failures.jsonl").exists() or not (run_dir / "failures.jsonl").read_text().strip()
    logs = sorted(p.name for p in (run_dir / "logs").glob("policy-0.node*.engine.log"))
    assert logs == ["policy-0.node0.engine.log", "policy-0.node1.engine.log"]
    assert _all_stopped(_served_name(overrides))


def test_a_worker_that_cannot_reach_the_head_fails_the_start_naming_the_address_and_the_setting(
        slurm_multinode, tmp_path):
    """Every node advertises its gldummy0 address, which only that node reaches: the worker says so
    within seconds, instead of the engine's distributed init timing out minutes later."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    overrides = multi(slurm_multinode, f"hydra.run.dir={run_dir}", "server.max_restarts=0",
                      "cluster.advertise_interface=gldummy0", job=False)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "launcher", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GYMLAUNCH_REGISTRY_ROOT": str(root), **slurm_multinode.env})
    took = time.monotonic() - t0
    out = done.stdout + done.stderr
    print(out[-4000:])
    print(f"wrong interface: run failed after {took:.1f} s")
    head_unreachable = slurm_multinode.nodes[0].unreachable_address
    assert done.returncode == 1, out
    assert re.search(rf"node 1 \(n2, [0-9.]+\) cannot reach the head n1 at {re.escape(head_unreachable)}:\d+", out), out
    assert "cluster.advertise_interface" in out and "'gldummy0'" in out, out
    assert _all_stopped(_served_name(overrides))


def test_ctrl_c_and_launcher_down_leave_no_process_on_any_node(slurm_multinode, tmp_path):
    root = tmp_path / "registry"
    for stop in ("ctrl-c", "launcher.down"):
        run_dir = tmp_path / stop
        overrides = multi(slurm_multinode, f"hydra.run.dir={run_dir}", job=False)
        served = _served_name(overrides)
        proc = start_launcher(root, *overrides, env=slurm_multinode.env)
        try:
            for line in proc.stdout:
                if line.startswith("serving policy at "):
                    break
            else:
                raise AssertionError(f"{stop}: the launcher ended before serving")
            (head,) = Registry(root).entries(service="policy")
            slurm_multinode.job_ids.add(head.job_id.split("_")[0])
            beats = Registry(root).nodes(head.namespace, "policy", 0, head.job_id)
            assert {b.host for b in beats.values()} == {"n1", "n2"} and len(_standins(served)) == 2
            if stop == "ctrl-c":
                proc.send_signal(signal.SIGINT)
            else:
                down = subprocess.run([sys.executable, "-m", "launcher.down", head.namespace], cwd=ROOT,
                                      capture_output=True, text=True, timeout=120,
                                      env={**os.environ, "GYMLAUNCH_REGISTRY_ROOT": str(root), **slurm_multinode.env})
                assert down.returncode == 0, down.stdout + down.stderr
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert _all_stopped(served), f"{stop}: stand-ins left running:\n{out}"
        assert Registry(root).namespaces() == [], stop
