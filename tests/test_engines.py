import sys

import pytest

from server.engines import EngineSpec, build_command, engine_version


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_vllm_command_carries_every_flag():
    spec = EngineSpec(
        served_name="m", max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
        tool_call_parser="hermes", tool_strict_level="parameter", chat_template="/t.jinja",
        tensor_parallel_size=2, pipeline_parallel_size=2, gpu_memory_utilization=0.8, extra_args=["--seed", "1"],
    )
    cmd = build_command(spec, "/models/x", "127.0.0.1", 8123)
    assert cmd[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == "/models/x" and flag(cmd, "--served-model-name") == "m"
    assert flag(cmd, "--host") == "127.0.0.1" and flag(cmd, "--port") == "8123"
    assert flag(cmd, "--max-model-len") == "2048" and flag(cmd, "--kv-cache-memory-bytes") == "268435456"
    assert flag(cmd, "--tool-call-parser") == "hermes" and "--enable-auto-tool-choice" in cmd
    assert flag(cmd, "--tool-strict-level") == "parameter" and flag(cmd, "--chat-template") == "/t.jinja"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--pipeline-parallel-size") == "2"
    assert flag(cmd, "--gpu-memory-utilization") == "0.8" and "--enforce-eager" in cmd
    assert cmd[-2:] == ["--seed", "1"]


def test_vllm_command_leaves_unset_flags_to_the_engine():
    cmd = build_command(EngineSpec(served_name="m", enable_auto_tool_choice=False), "org/model", "0.0.0.0", 1)
    for absent in ("--max-model-len", "--kv-cache-memory-bytes", "--enforce-eager", "--tool-call-parser",
                   "--enable-auto-tool-choice", "--chat-template", "--tensor-parallel-size"):
        assert absent not in cmd


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown engine 'trt'"):
        build_command(EngineSpec(served_name="m", engine="trt"), "x", "h", 1)


def test_engine_version_reads_the_installed_cpu_build():
    assert engine_version("vllm").startswith("0.32")
    assert engine_version("no-such-engine") == "unknown"
