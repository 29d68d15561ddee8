"""Real vLLM (CPU build) replicas spanning two "nodes": two engine processes on loopback, each
started from ``build_launch`` with its ``NodeRole`` through ``server.process``, as a server job
starts its engine. The head serves; the worker runs headless.

Each start loads the model twice on 2 cores (about a minute), and the default suite already runs
pipeline parallel 2 across two real nodes of the test cluster (test_multinode_vllm.py): every
mode that works on the CPU build runs here with GYMLAUNCH_ALL_ENGINE_MODES=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import process
from server.engines import EngineSpec, NodeRole, build_launch
from server.job import free_port
from server.models import prepare
from tests.support import SERVED_NAME, cpu_engine

ALL_MODES = pytest.mark.skipif(
    not os.environ.get("GYMLAUNCH_ALL_ENGINE_MODES"), reason="a minute of real vLLM each: GYMLAUNCH_ALL_ENGINE_MODES=1"
)
# Pipeline parallel on the CPU build needs a compilation mode other than none (server/engines.py
# _check_vllm); dynamo with the eager backend compiles nothing.
PP_CPU = dict(enforce_eager=False, extra_args=["--compilation-config", '{"mode":2,"backend":"eager"}'])
STARTUP_S = 600
WORKER_EXIT_S = 10


def start_nodes(spec: EngineSpec, nnodes: int, log_dir: Path) -> tuple[list[subprocess.Popen], int]:
    """Every node's engine, head first (as the orchestration starts them); returns them and the
    head's HTTP port."""
    model = str(prepare("smollm2_135m"))
    port, dist_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    procs = []
    for rank in range(nnodes):
        node = NodeRole(rank=rank, nnodes=nnodes, head_addr="127.0.0.1", dist_port=dist_port, own_addr="127.0.0.1")
        launch = build_launch(spec, model, "127.0.0.1", port if rank == 0 else free_port("127.0.0.1"), node=node)
        env = {**os.environ, **spec.env, **launch.env}
        procs.append(process.start(launch.argv, log_dir / f"node{rank}.engine.log", env, header=launch.loggable()))
    return procs, port


def wait_ready(procs: list[subprocess.Popen], port: int, log_dir: Path) -> float:
    """Seconds until the head answers /health, every node's engine alive meanwhile."""
    t0 = time.monotonic()
    while True:
        for rank, proc in enumerate(procs):
            if proc.poll() is not None:
                tails = (process.log_tail(log_dir / f"node{r}.engine.log", 30) for r in range(len(procs)))
                pytest.fail(f"node {rank}'s engine {process.exit_description(proc.returncode)}:\n" + "\n".join(tails))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        assert time.monotonic() - t0 < STARTUP_S, f"head not healthy in {STARTUP_S} s"
        time.sleep(0.5)


def serves(port: int) -> None:
    """Chat completions with logprobs and /tokenize, as the readiness gate asks of a replica."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8,
            "logprobs": True, "top_logprobs": 2}
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["message"]["content"] and choice["logprobs"]["content"]
    tokens = httpx.post(f"http://127.0.0.1:{port}/tokenize", json={"prompt": "Say hello"}, timeout=60).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0


def rss_gb(proc: subprocess.Popen) -> float:
    """Resident memory of the engine's whole process group."""
    ps = subprocess.run(["ps", "-e", "-o", "pgid=,rss="], capture_output=True, text=True).stdout
    return sum(int(rss) for pgid, rss in (line.split() for line in ps.splitlines()) if pgid == str(proc.pid)) / 2**20


def run_mode(name: str, spec: EngineSpec, nnodes: int, tmp_path: Path) -> None:
    procs, port = start_nodes(spec, nnodes, tmp_path)
    try:
        ready_s = wait_ready(procs, port, tmp_path)
        t0 = time.monotonic()
        serves(port)
        rss = ", ".join(f"node{r} {rss_gb(p):.2f} GB" for r, p in enumerate(procs))
        print(f"\n[{name}] {nnodes} nodes: ready after {ready_s:.1f} s, first answers in "
              f"{time.monotonic() - t0:.1f} s; RSS {rss}", file=sys.stderr)
        assert all(p.poll() is None for p in procs)
        # What the orchestration can rely on when a head goes: do its workers notice by themselves?
        # (vLLM 0.32, CPU build: no, every mode's workers still ran 30 s later; the orchestration must stop them.)
        process.stop(procs[0], grace_s=15)
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs[1:]) and time.monotonic() - t0 < WORKER_EXIT_S:
            time.sleep(0.2)
        left = [r for r, p in enumerate(procs) if p.poll() is None]
        print(f"[{name}] head stopped: workers " + (f"{left} still running after {WORKER_EXIT_S} s" if left else
              f"exited by themselves within {time.monotonic() - t0:.1f} s "
              f"({', '.join(process.exit_description(p.returncode) for p in procs[1:])})"), file=sys.stderr)
    finally:
        for proc in procs:
            process.stop(proc, grace_s=15)


@ALL_MODES
def test_pipeline_parallel_across_two_nodes(tmp_path):
    run_mode("pp2", cpu_engine(pipeline_parallel_size=2, **PP_CPU), 2, tmp_path)


@ALL_MODES
def test_data_parallel_with_a_headless_worker(tmp_path):
    run_mode("dp2", cpu_engine(data_parallel_size=2), 2, tmp_path)


@ALL_MODES
def test_tensor_parallel_across_three_nodes(tmp_path):
    # SmolLM2-135M has 9 attention heads: tensor parallel must divide them, so 3, not 2.
    run_mode("tp3", cpu_engine(tensor_parallel_size=3), 3, tmp_path)
