"""The project's multi-node Slurm cluster (tests/slurm/start-multinode.sh): nodes n1, n2 on this one
machine, each in its own network namespace. Jobs of two nodes go through submitit's SlurmExecutor
(one task per node, as the launcher will run a replica that spans nodes), and the network between
the nodes is real: TCP from one node to another and from the host to a node, while a node's second
address (gldummy0, the "wrong interface") is out of the other node's reach."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import cloudpickle
import pytest
import submitit

from tests.support import queued

# The job processes unpickle the submitted functions; pickle this module's functions by value
# so a job does not depend on being able to import the test module (its cwd, sys.path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_S = 60  # for each step of a job's tasks, and for the job's results


# --- what the tasks run (on the nodes) ----------------------------------------------------------


def addresses() -> dict[str, str]:
    """This node's IPv4 address per interface, loopback left out."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, address = line.split()[1], line.split()[3].split("/")[0]
        if name != "lo":
            found[name.split("@")[0]] = address
    return found


def node_address(name: str) -> str:
    """The address Slurm has for node ``name`` (its NodeAddr): names of nodes need not resolve."""
    out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True, check=True).stdout
    (field,) = [f for f in out.split() if f.startswith("NodeAddr=")]
    return field.split("=", 1)[1]


def wait_file(path: Path) -> dict:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written in {WAIT_S} s")
        time.sleep(0.05)
    return json.loads(path.read_text())


def publish(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)  # readers never see half a file


def talk(address: str, port: int, message: str) -> str:
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(message.encode() + b"\n")
        return conn.makefile().readline().strip()


def serve(server: socket.socket, enough: Callable[[list[dict[str, str]]], bool]) -> list[dict[str, str]]:
    """Answers connections, one line each, until ``enough`` of them: who connected (address), what
    they said."""
    server.settimeout(0.2)  # to look at ``enough`` between connections
    seen: list[dict[str, str]] = []
    deadline = time.monotonic() + WAIT_S
    while not enough(seen):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only these connections in {WAIT_S} s: {seen}")
        try:
            conn, (peer, _) = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(10)
            said = conn.makefile().readline().strip()
            conn.sendall(f"ok from {socket.gethostname()}\n".encode())
        seen.append({"peer": peer, "said": said})
    return seen


def cross_node(folder: str, host_too: bool) -> dict:
    """Rank 0 listens on all its addresses and publishes its port; rank 1 finds rank 0's node address
    through Slurm (scontrol) and talks to it; so does the host when ``host_too``."""
    env = submitit.JobEnvironment()
    me = {"rank": env.global_rank, "hostname": socket.gethostname(), "addresses": addresses(),
          "nodename": os.environ["SLURMD_NODENAME"], "head": env.hostnames[0]}
    rendezvous = Path(folder, "rank0.json")
    if env.global_rank == 0:
        with socket.create_server(("0.0.0.0", 0)) as server:
            publish(rendezvous, {"port": server.getsockname()[1], "hostname": me["hostname"]})
            me["seen"] = serve(server, lambda seen: len(seen) == (2 if host_too else 1))
    else:
        port = wait_file(rendezvous)["port"]
        me["head_address"] = node_address(me["head"])
        me["reply"] = talk(me["head_address"], port, f"hello from {me['hostname']}")
    return me


def wrong_interface(folder: str) -> dict:
    """Rank 0 listens on all its addresses and reaches itself at its gldummy0 address; rank 1 tries
    that address (must fail, and at once: no route) and then rank 0's bridge address (must work)."""
    env = submitit.JobEnvironment()
    me = {"rank": env.global_rank, "hostname": socket.gethostname(), "addresses": addresses()}
    rendezvous, done = Path(folder, "rank0.json"), Path(folder, "rank1.json")
    if env.global_rank == 0:
        with socket.create_server(("0.0.0.0", 0)) as server:
            port = server.getsockname()[1]
            # on its own node the address works (the connection waits in the backlog for serve())
            with socket.create_connection((me["addresses"]["gldummy0"], port), timeout=10) as own:
                own.sendall(b"self\n")
                publish(rendezvous, {"port": port, "addresses": me["addresses"]})
                me["seen"] = serve(server, lambda seen: done.exists())
    else:
        head = wait_file(rendezvous)
        try:
            t0 = time.monotonic()
            try:
                me["wrong"] = "answered: " + talk(head["addresses"]["gldummy0"], head["port"], "wrong address")
            except OSError as e:
                me["wrong"] = errno.errorcode.get(e.errno or 0, repr(e))
            me["wrong_s"] = time.monotonic() - t0
            me["right"] = talk(head["addresses"]["eth0"], head["port"], "right address")
        finally:
            publish(done, {})
    return me


# --- the test side ------------------------------------------------------------------------------


def two_node_executor(folder: Path, partition: str, name: str) -> submitit.SlurmExecutor:
    """As the launcher's SlurmBackend makes one (launcher/executors.py), with two nodes."""
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(job_name=name, time=5, nodes=2, ntasks_per_node=1, cpus_per_task=1,
                               partition=partition)
    return executor


def results_within(cluster, job: submitit.Job, timeout_s: float = WAIT_S) -> list[dict]:
    """All tasks' results, bounded: a job stuck in the queue fails the test with squeue's word on it."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s; queue: {queued(cluster.env)}")
        time.sleep(0.1)
    return sorted(job.results(), key=lambda r: r["rank"])


def wait_file_or_fail(path: Path, job: submitit.Job) -> dict:
    """A rendezvous file the job writes; the job's own error if it ends first."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if job.done():
            job.results()  # raises with the task's traceback
            pytest.fail(f"job {job.job_id} ended without writing {path.name}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id} did not write {path.name} in {WAIT_S} s; state {job.state}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_two_node_job_talks_tcp_across_nodes_and_to_the_host(on_slurm_multinode, tmp_path):
    cluster = on_slurm_multinode
    t0 = time.monotonic()
    job = two_node_executor(tmp_path, cluster.partition, "gl-multi-tcp").submit(cross_node, str(tmp_path), True)
    cluster.job_ids.add(job.job_id)
    head = wait_file_or_fail(tmp_path / "rank0.json", job)
    by_name = {node.name: node for node in cluster.nodes}
    # the host reaches a port a task listens on, at the node's address
    assert talk(by_name[head["hostname"]].address, head["port"], "hello from the host") == f"ok from {head['hostname']}"
    rank0, rank1 = results_within(cluster, job)
    print(f"\n[slurm multi] 2-node job, submit -> both results: {time.monotonic() - t0:.2f} s", file=sys.stderr)

    assert {rank0["hostname"], rank1["hostname"]} == {"n1", "n2"}
    for task in (rank0, rank1):
        node = by_name[task["hostname"]]
        assert task["nodename"] == node.name  # the hostname is the Slurm node's
        assert task["addresses"] == {"eth0": node.address, "gldummy0": node.unreachable_address}
    assert rank0["hostname"] == rank1["head"] == rank0["head"]
    assert rank1["head_address"] == by_name[rank0["hostname"]].address  # scontrol's NodeAddr
    assert rank1["reply"] == f"ok from {rank0['hostname']}"
    peers = {seen["said"]: seen["peer"] for seen in rank0["seen"]}
    assert peers == {f"hello from {rank1['hostname']}": by_name[rank1["hostname"]].address,
                     "hello from the host": cluster.host_address}


def test_a_nodes_second_interface_is_out_of_the_other_nodes_reach(on_slurm_multinode, tmp_path):
    cluster = on_slurm_multinode
    job = two_node_executor(tmp_path, cluster.partition, "gl-multi-wrong").submit(wrong_interface, str(tmp_path))
    cluster.job_ids.add(job.job_id)
    rank0, rank1 = results_within(cluster, job)
    print(f"\n[slurm multi] connect to the other node's gldummy0: {rank1['wrong']} after {rank1['wrong_s']:.3f} s",
          file=sys.stderr)
    assert rank1["wrong"] in {"ENETUNREACH", "EHOSTUNREACH"}  # refused by routing, not a timeout
    assert rank1["right"] == f"ok from {rank0['hostname']}"
    assert rank0["seen"] == [{"peer": rank0["addresses"]["gldummy0"], "said": "self"},
                             {"peer": rank1["addresses"]["eth0"], "said": "right address"}]
    # nor does the host reach it (its route is "unreachable": nothing leaves the machine)
    with pytest.raises(OSError) as refused:
        socket.create_connection((rank0["addresses"]["gldummy0"], 9), timeout=5)
    assert refused.value.errno in {errno.ENETUNREACH, errno.EHOSTUNREACH}

