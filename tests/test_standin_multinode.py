"""The stand-in's multi-node role: real processes on 127.0.0.1, started the way a server job starts
an engine (``build_launch`` with a ``NodeRole``, then ``server.process``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from server import process
from server.engines import EngineSpec, NodeRole, build_launch
from server.job import free_port

LOCAL = "127.0.0.1"
TEMPLATE = ("{python} -m server.standin --host {host} --port {port} --model {served_name} --nnodes {nnodes} "
            "--node-rank {node_rank} --head-addr {head_addr} --dist-port {dist_port} --own-addr {own_addr}")
ROOT = Path(__file__).resolve().parents[1]


class Replica:
    """The nodes of one stand-in replica; every process is stopped at the end of the test."""

    def __init__(self, tmp_path: Path, nnodes: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.tmp_path, self.nnodes = tmp_path, nnodes
        self.spec = EngineSpec(served_name="m", engine="openai_command", command=TEMPLATE, extra_args=list(extra))
        self.port, self.dist_port = free_port(LOCAL), free_port(LOCAL)
        self.procs: dict[int, subprocess.Popen] = {}

    def log(self, rank: int) -> Path:
        return self.tmp_path / f"node{rank}.engine.log"

    def start(self, rank: int, own_addr: str = LOCAL, head_addr: str = LOCAL) -> subprocess.Popen:
        node = NodeRole(rank, self.nnodes, head_addr, self.dist_port, own_addr)
        launch = build_launch(self.spec, "model", LOCAL, self.port if rank == 0 else free_port(LOCAL), node=node)
        env = {**os.environ, "PYTHONPATH": str(ROOT), **launch.env}
        self.procs[rank] = process.start(launch.argv, self.log(rank), env, cwd=str(ROOT))
        return self.procs[rank]

    def wait_log(self, rank: int, text: str, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log(rank).read_text():
            assert time.monotonic() < deadline, f"node {rank} never logged {text!r}:\n{self.tail(rank)}"
            time.sleep(0.05)

    def tail(self, rank: int) -> str:
        return process.log_tail(self.log(rank))

    def health(self) -> int | None:
        try:
            return httpx.get(f"http://{LOCAL}:{self.port}/health", timeout=2).status_code
        except httpx.TransportError:
            return None

    def wait_healthy(self, timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health() != 200:
            assert time.monotonic() < deadline, self.tail(0)
            time.sleep(0.05)

    def chat(self, timeout_s: float) -> httpx.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        return httpx.post(f"http://{LOCAL}:{self.port}/v1/chat/completions", json=body, timeout=timeout_s)

    def stop(self) -> None:
        for proc in self.procs.values():
            process.stop(proc, grace_s=5)


@pytest.fixture
def replica(tmp_path):
    made = []

    def make(**kwargs) -> Replica:
        made.append(Replica(tmp_path, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def wait_exit(proc: subprocess.Popen, timeout_s: float = 15) -> int:
    return proc.wait(timeout_s)


def test_the_head_serves_only_once_every_worker_joined(replica):
    r = replica(nnodes=3)
    r.start(0)
    r.wait_log(0, "head waiting for 2 worker(s) at 127.0.0.1:")
    assert r.health() is None  # its HTTP port is not even bound yet
    r.start(1)
    r.wait_log(0, "worker rank 1 joined")
    assert r.health() is None
    r.start(2)
    r.wait_healthy()
    assert r.chat(10).json()["choices"][0]["message"]["content"] == "Echo: hi"
    r.wait_log(2, "worker rank 2 of 3 joined the head at 127.0.0.1:")


def test_a_worker_started_before_its_head_waits_for_it(replica):
    r = replica()
    r.start(1)
    r.start(0)
    r.wait_healthy()
    assert r.procs[1].poll() is None


def test_a_lost_worker_leaves_a_head_that_is_healthy_but_never_answers(replica):
    r = replica()
    r.start(0), r.start(1)
    r.wait_healthy()
    assert r.chat(10).status_code == 200
    r.procs[1].send_signal(signal.SIGKILL)
    r.wait_log(0, "lost worker rank 1")
    with pytest.raises(httpx.ReadTimeout):
        r.chat(1.0)
    assert r.health() == 200 and r.procs[0].poll() is None  # what vLLM's head does with a pipeline stage gone


def test_a_worker_exits_when_its_head_goes(replica):
    r = replica()
    r.start(0), r.start(1)
    r.wait_healthy()
    r.procs[0].send_signal(signal.SIGKILL)
    assert wait_exit(r.procs[1]) == 1
    r.wait_log(1, "lost the head at 127.0.0.1:")


def test_a_worker_that_cannot_reach_its_head_fails_naming_the_address(replica):
    r = replica(extra=("--join-timeout-s", "1"))
    t0 = time.monotonic()
    assert wait_exit(r.start(1)) == 1
    print(f"\n[standin] an unreachable head failed the worker after {time.monotonic() - t0:.1f} s")
    r.wait_log(1, f"worker rank 1: cannot reach the head at 127.0.0.1:{r.dist_port} within 1 s")


def test_a_worker_whose_own_address_is_not_on_this_node_fails_at_once(replica):
    r = replica()
    # Binding a source address this machine lacks fails locally: nothing is sent to it.
    assert wait_exit(r.start(1, own_addr="10.255.255.7")) == 1
    r.wait_log(1, "cannot send from 10.255.255.7 (--own-addr): no interface of this node has it")


def test_a_head_whose_workers_never_come_exits(replica):
    r = replica(nnodes=3, extra=("--join-timeout-s", "1"))
    r.start(0), r.start(2)
    assert wait_exit(r.procs[0]) == 1
    r.wait_log(0, f"worker rank(s) [1] did not join at 127.0.0.1:{r.dist_port} within 1 s")


def test_the_head_refuses_a_worker_of_another_replica(replica, tmp_path):
    r = replica()
    r.start(0)
    r.wait_log(0, "head waiting")
    stranger = Replica(tmp_path / "other", nnodes=3)
    stranger.log(1).parent.mkdir()
    stranger.dist_port = r.dist_port
    try:
        assert wait_exit(stranger.start(1)) == 1
        stranger.wait_log(1, "did not take it: refused: nnodes 3 is not the head's 2")
    finally:
        stranger.stop()


@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_stops_a_waiting_node_cleanly(replica, rank):
    r = replica()
    r.start(rank)
    r.wait_log(rank, "head waiting" if rank == 0 else "joining the head")
    r.procs[rank].send_signal(signal.SIGTERM)
    assert wait_exit(r.procs[rank]) == 0
