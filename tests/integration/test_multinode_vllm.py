"""Real vLLM (CPU build) serving one replica across two nodes of the multi-node test cluster
(network namespaces n1, n2): data parallel 2 with vLLM's own multiprocessing (the head on n1
serves HTTP, the worker on n2 runs its engine headless), started by ``python -m launcher`` as a user starts
it, through the readiness gate (tools, logprobs), with the built-in collection (straight to the
head: the gateway in front of a replica is the same whatever its nodes, and tested elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import ROOT, run_launcher

# Data parallel 2 across the nodes (vLLM's own multiprocessing): an engine on each node, the worker's
# headless (--data-parallel-start-rank 1), the head serving both. Pipeline parallel 2 also works on
# the CPU build (test_multinode_engine.py, on demand) but decodes grammar-constrained tool checks at
# about 1 token/s here, which made this test take 2.5 to 6 minutes of CI.
DP2 = ["server.nodes_per_replica=2", "server.data_parallel_size=2"]


def test_vllm_data_parallel_across_two_nodes_serves_the_collection(slurm_multinode, tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    # Three of the demo's tasks (arithmetic, calculator and weather tools): a real vLLM across two
    # nodes on 2 shared cores answers slowly, and what it must show is that it serves them all.
    demo = (Path(ROOT) / "jobs" / "tasks" / "demo.jsonl").read_text().splitlines()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join([demo[0], demo[12], demo[18]]) + "\n")
    p = slurm_multinode.partition
    done = run_launcher(
        root, "cluster=slurm_testcluster", f"cluster.partition={p}", f"job.partition={p}", "gateway=off",
        "cluster.gpus_per_node=null", "cluster.cpus_per_task=2", "cluster.mem_gb=6", "job.cpus_per_task=1",
        "job.mem_gb=2", "cluster.advertise_interface=eth0", f"job.tasks={tasks}", "job.num_repeats=2", "job.top_logprobs=1",
        "job.sampling.max_tokens=32", f"hydra.run.dir={run_dir}", *DP2, env=slurm_multinode.env, timeout_s=900,
    )
    out = done.stdout + done.stderr
    print(out[-5000:])
    assert done.returncode == 0, out
    summary = json.loads((run_dir / "summary.json").read_text())
    (server,) = summary["servers"]
    slurm_multinode.job_ids.add(server["job_id"].split("_")[0])
    print(f"phases {summary['phases']}")
    assert summary["status"] == "succeeded" and server["restarts"] == 0
    assert server["base_url"].startswith(f"http://{slurm_multinode.nodes[0].address}:"), server
    print(f"2-node replica: ready {server['ready_after_s']} s after its job started running "
          f"(gate {server['readiness_gate_s']} s)")
    rows = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert rows and len(rows) == summary["collection"]["rollouts_written"]
    assert all(r["turns"][0]["generation_token_ids"] and r["turns"][0]["generation_logprobs"] for r in rows), rows[0]
    # Both nodes ran an engine: the worker's log shows vLLM's headless start.
    worker_log = (run_dir / "logs" / "policy-0.node1.engine.log").read_text()
    assert "--headless" in worker_log and "--data-parallel-start-rank 1" in worker_log
