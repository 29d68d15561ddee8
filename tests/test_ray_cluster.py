"""A Ray cluster per replica before anything runs: the engine's command on the head, and every
Ray node's ports pinned, distinct and remembered per node (two replicas on one node never collide)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile

import pytest

from server import process
from server.engines import EngineSpec, NodeRole, build_launch
from server.job import free_port
from server.ray_cluster import MARKER, RayNode, resources, temp_dir_for

HEAD = "10.0.0.1"


def ray_role(nnodes=2, rank=0) -> NodeRole:
    return NodeRole(rank=rank, nnodes=nnodes, head_addr=HEAD, dist_port=6380, own_addr=HEAD, backend="ray")


def after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_vllm_on_a_ray_cluster_runs_on_the_head_as_its_driver(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")  # the head's address is no interface of this machine
    spec = EngineSpec(served_name="m", tool_call_parser="hermes", tensor_parallel_size=8, pipeline_parallel_size=2)
    launch = build_launch(spec, "/m", "0.0.0.0", 8000, "sk-1", node=ray_role())
    argv = launch.argv
    assert argv[:3] == [sys.executable, "-m", "server.vllm_serve"]
    assert after(argv, "--distributed-executor-backend") == "ray" and after(argv, "--pipeline-parallel-size") == "2"
    # No mp multi-node flags: Ray places the ranks, no worker runs an engine.
    assert not {"--nnodes", "--node-rank", "--headless", "--master-addr"} & set(argv)
    assert launch.env["RAY_ADDRESS"] == "10.0.0.1:6380" and launch.env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert launch.env["VLLM_HOST_IP"] == HEAD and launch.env["VLLM_API_KEY"] == "sk-1"


def test_vllm_data_parallel_on_a_ray_cluster_places_whole_engines_per_node():
    spec = EngineSpec(served_name="m", tool_call_parser="hermes", data_parallel_size=16, env={"GLOO_SOCKET_IFNAME": "x"})
    argv = build_launch(spec, "/m", "0.0.0.0", 8000, node=ray_role()).argv
    assert after(argv, "--data-parallel-backend") == "ray" and after(argv, "--data-parallel-size") == "16"
    assert after(argv, "--data-parallel-size-local") == "8" and after(argv, "--data-parallel-address") == HEAD
    assert "--headless" not in argv


def test_only_the_head_of_a_ray_cluster_has_an_engine():
    with pytest.raises(ValueError, match="with a Ray cluster only the head starts an engine"):
        ray_role(rank=1)
    with pytest.raises(ValueError, match="server.multinode_backend: 'pmi' is not one of"):
        NodeRole(0, 2, HEAD, 1, HEAD, backend="pmi")


def test_a_command_on_a_ray_cluster_needs_no_node_rank_and_gets_the_address():
    spec = EngineSpec(served_name="m", engine="openai_command", command="srv --port {port} --ray {ray_address}")
    launch = build_launch(spec, "m", "h", 9000, node=ray_role())
    assert launch.argv == ["srv", "--port", "9000", "--ray", "10.0.0.1:6380"]
    assert launch.env["RAY_ADDRESS"] == "10.0.0.1:6380"
    with pytest.raises(ValueError, match="without {node_rank} every node would start a head"):
        build_launch(spec, "m", "h", 9000, node=NodeRole(0, 2, HEAD, 1, HEAD))  # mp: it runs on every node


def test_every_ray_port_is_pinned_distinct_and_remembered(tmp_path):
    """Two replicas' Ray nodes on one node (a head and a worker of each): no port twice, none left to
    Ray, and every flag that opens a port is given."""
    plans = []
    for job in ("71", "72"):
        head = RayNode.plan("ray", "127.0.0.1", job, 0, free_port)
        worker = RayNode.plan("ray", "127.0.0.1", job, 1, free_port, head=("127.0.0.1", head.gcs_port))
        plans += [head, worker]
    ports = []
    for plan in plans:
        argv = plan.argv
        flags = [a for a in argv if a.endswith("-port")]
        assert set(flags) >= {"--node-manager-port", "--object-manager-port", "--metrics-export-port",
                              "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port",
                              "--runtime-env-agent-port"}
        ports += [int(after(argv, flag)) for flag in flags]
        workers = [int(p) for p in after(argv, "--worker-port-list").split(",")]
        assert len(workers) == sum(resources()) + 8
        ports += workers
        assert after(argv, "--node-ip-address") == "127.0.0.1" and "--disable-usage-stats" in argv
        assert plan.env[MARKER] == str(plan.temp_dir) and plan.env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert after(argv, "--temp-dir") == str(plan.temp_dir)
        ports += [int(plan.env["AUTOSCALER_METRIC_PORT"])] if "--head" in argv else []
    head, worker = plans[:2]
    assert {"--head", "--port", "--dashboard-port", "--ray-client-server-port"} <= set(head.argv)
    assert after(worker.argv, "--address") == f"127.0.0.1:{head.gcs_port}" and "--head" not in worker.argv
    assert "--port" not in worker.argv and worker.gcs_port == head.gcs_port
    assert len(ports) == len(set(ports)), "a port picked twice"
    assert len({p.temp_dir for p in plans}) == 4


def test_the_temp_dir_stays_short_enough_for_rays_sockets(monkeypatch, tmp_path):
    long = tmp_path / ("x" * 80)
    long.mkdir()
    monkeypatch.setenv("TMPDIR", str(long))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    path = temp_dir_for("1234567_12", 3)
    assert str(path).startswith("/tmp/gl-ray-") and path.name.endswith("-1234567_12-3")
    # Ray binds <dir>/session_<date>_<time>_<pid>/sockets/plasma_store: 63 bytes more, 107 at most.
    assert len(str(path)) + 63 <= 107
    assert "/" not in temp_dir_for("pid:1/2", 0).name


def test_kill_marked_kills_only_the_marked(tmp_path):
    marked = process.start(["sleep", "60"], tmp_path / "a.log", {"PATH": "/usr/bin:/bin", MARKER: "/tmp/x1"})
    other = process.start(["sleep", "60"], tmp_path / "b.log", {"PATH": "/usr/bin:/bin", MARKER: "/tmp/x10"})
    try:
        assert process.kill_marked(MARKER, "/tmp/x1") == [marked.pid]
        assert marked.wait(5) == -9 and other.poll() is None
    finally:
        process.stop(other, 1)
        process.stop(marked, 1)


def test_a_missing_ray_is_said_before_submission(monkeypatch, tmp_path):
    from server.ray_cluster import missing
    assert missing({}, (), None) is None  # the tests' environment has it (pyproject's test extra)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))  # a Python without a ray beside it
    path = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    assert missing(path, (), None) == "ray is not on PATH"
    assert missing(path, ["true"], "cluster.setup") == "ray is not on PATH after cluster.setup"


def test_vllms_parser_takes_the_ray_commands():
    """The seam with vLLM (its CPU build refuses to run on Ray, so the command is checked, not run):
    vLLM's own serve parser and ``EngineArgs`` read the head's command as meant."""
    spec = EngineSpec(served_name="m", tool_call_parser="hermes", env={"GLOO_SOCKET_IFNAME": "x"})
    commands = [build_launch(dataclasses.replace(spec, **sizes), "/m", "0.0.0.0", 8000, node=ray_role()).argv[3:]
                for sizes in ({"pipeline_parallel_size": 2}, {"data_parallel_size": 4})]
    script = """if True:
        import json, sys
        from vllm.engine.arg_utils import EngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        for argv in json.loads(sys.argv[1]):
            e = EngineArgs.from_cli_args(make_arg_parser(FlexibleArgumentParser()).parse_args(argv))
            print(json.dumps([e.distributed_executor_backend, e.data_parallel_backend, e.pipeline_parallel_size,
                              e.data_parallel_size, e.data_parallel_size_local, e.data_parallel_address, e.nnodes,
                              e.headless if hasattr(e, "headless") else None]))
    """
    out = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pp, dp = [json.loads(line) for line in out.stdout.splitlines()[-2:]]
    assert pp[:5] == ["ray", "mp", 2, 1, None] and pp[6] == 1  # mp: vLLM's default for data parallel, unused
    assert dp[:6] == ["ray", "ray", 1, 4, 2, HEAD] and dp[6] == 1
