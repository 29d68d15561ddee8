"""From a composed Hydra config to a typed, validated ``RunSpec``.

Everything a run could trip on later is checked here, before any job is
submitted, and every error names the config key that is wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.command import ENDPOINT_ENV, GYM_OWNED_OVERRIDES, PLACEHOLDERS, CommandConfig, GymConfig, command_argv
from jobs.rollouts import CollectorConfig, TaskFileError, load_tasks
from launcher.nemo_rl import _CHAT_KWARGS, Policy, apply_policy
from server.engines import BUILDERS, EngineSpec, build_launch, known_tool_parsers
from server.models import EMBEDDED_MODELS
from server.registry import Registry

CHAT_TEMPLATES = Path(__file__).resolve().parent.parent / "server" / "chat_templates"
TASK_SETS = Path(__file__).resolve().parent.parent / "jobs" / "tasks"
CLUSTER_KINDS = ("local", "slurm")


class SpecError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass
class RunInfo:
    name: str = "demo"


@dataclass
class ClusterSpec:
    kind: str = "local"
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None
    timeout_min: int = 240
    # Slurm (ignored by kind=local)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = None  # what a node has: a replica must fit on one
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    constraint: str | None = None
    exclusive: bool = False
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, venv)
    srun_args: list[str] = field(default_factory=list)
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # more sbatch options
    signal_delay_s: int = 120  # USR2 this long before the time limit: servers drain


@dataclass
class ModelSpec:
    name: str = ""
    path: str | None = None
    embedded: str | None = None
    cache_dir: str | None = None
    served_name: str = ""
    chat_template: str | None = None
    tool_call_parser: str | None = None
    tool_strict_level: str | None = None


GENERATE_KEY = "generate"


@dataclass
class ServerSpec(EngineSpec):
    """Engine flags (``EngineSpec``) plus how many replicas, where, and how long to wait."""

    served_name: str = ""
    service: str = "policy"
    replicas: int = 1
    gpus_per_replica: int = 1
    port: int | None = None
    startup_timeout_s: float = 900.0
    stop_grace_s: float = 15.0
    drain_grace_s: float = 60.0
    # "generate": a fresh key per run; null: no key; else a file (mode 0600) holding the key.
    api_key: str | None = GENERATE_KEY

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineSpec)})


@dataclass
class _JobSubmission:
    """The keys of a job config that say how to submit it, not what it does."""

    timeout_min: int = 60
    partition: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None


_SUBMISSION_KEYS = tuple(f.name for f in dataclasses.fields(_JobSubmission))


@dataclass(kw_only=True)
class RolloutsJob(_JobSubmission):
    """``job=rollouts``: the built-in collector. Its settings are ``CollectorConfig``'s."""

    collector: CollectorConfig
    num_tasks: int  # read (and checked) from the task file before anything is submitted
    uses_tools: bool = False  # some task offers tools: readiness then checks tool calling
    kind: str = "rollouts"

    @property
    def num_rollouts(self) -> int:
        return self.num_tasks * self.collector.num_repeats


@dataclass
class NoJob:
    """``job=none``: serve only, until Ctrl-C."""

    kind: str = "none"


@dataclass
class CommandJob(_JobSubmission):
    """``job=command`` / ``job=gym``: a program run as the job (``jobs.command.run``) with the
    service's endpoints in its environment; ``process`` is a ``CommandConfig`` or ``GymConfig``."""

    process: Any = None
    kind: str = "command"


# The program job kinds and what their keys are typed into.
PROCESS_CONFIGS = {"command": CommandConfig, "gym": GymConfig}
JOB_KINDS = ("none", "rollouts", *PROCESS_CONFIGS)
JobSpec = RolloutsJob | CommandJob | NoJob
# Filled in by the launcher for each run; a user value would be overwritten.
_LAUNCHER_OWNED = {
    "rollouts": ("output_dir", "namespace", "registry"),
    "command": ("run_dir", "endpoints"),
    "gym": ("run_dir", "endpoints"),
}


@dataclass
class RunSpec:
    run: RunInfo = field(default_factory=RunInfo)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    server: ServerSpec = field(default_factory=ServerSpec)
    registry: Registry = field(default_factory=Registry)
    policy: Optional[Policy] = None  # a NeMo RL policy block, translated into server.*
    job: Any = None  # RolloutsJob | CommandJob | NoJob, chosen by job.kind

    def server_hash(self) -> str:
        """Identifies a server configuration: runs with equal hashes could share servers."""
        blob = json.dumps([dataclasses.asdict(self.model), dataclasses.asdict(self.server)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_spec(cfg: DictConfig) -> RunSpec:
    """Type-check ``cfg`` against the schema, then check what types cannot express."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    job_cfg = raw.pop("job", None) or {}
    raw.pop("hydra", None)
    spec = _typed(RunSpec, raw, prefix="")
    spec.job = _job(cfg.job if "job" in cfg else OmegaConf.create(job_cfg))
    _check(spec)
    return spec


def _typed(schema: type, data: Any, prefix: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        where = f"{prefix}{key}" if key else prefix.rstrip(".") or "config"
        raise SpecError(f"{where}: {_first_line(e)}") from None


def _job(job_cfg: DictConfig) -> JobSpec:
    try:
        data = OmegaConf.to_container(job_cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise SpecError(f"job: {_first_line(e)}") from None
    kind = data.pop("kind", None)
    if kind == "none":
        if data:
            raise SpecError(f"job: keys {sorted(data)} mean nothing for job.kind=none")
        return NoJob()
    if kind not in JOB_KINDS:
        raise SpecError(f"job.kind: {kind!r} is not a job kind; choose one of {list(JOB_KINDS)} (job=...)")
    for key in _LAUNCHER_OWNED[kind]:
        if key in data:
            raise SpecError(f"job.{key}: set by the launcher for each run; remove it from the config")
    submission = _typed(_JobSubmission, {k: data.pop(k) for k in _SUBMISSION_KEYS if k in data}, prefix="job.")
    if kind in PROCESS_CONFIGS:
        process = _typed(PROCESS_CONFIGS[kind], data, prefix="job.")
        # The program runs where the launcher was started unless told otherwise; jobs start elsewhere.
        process.cwd = str(Path(process.cwd or os.getcwd()).expanduser().resolve())
        if isinstance(process, GymConfig) and process.gym_bin:
            process.gym_bin = str(Path(process.gym_bin).expanduser().resolve())
        return CommandJob(process=process, kind=kind, **dataclasses.asdict(submission))
    if "tasks" in data:
        data["tasks"] = str(resolve_tasks(data["tasks"]))
    collector = _typed(CollectorConfig, data, prefix="job.")
    try:
        tasks = load_tasks(collector.tasks)
    except (OSError, TaskFileError) as e:
        raise SpecError(f"job.tasks: {e}") from None
    if not tasks:
        raise SpecError(f"job.tasks: {collector.tasks} holds no task")
    return RolloutsJob(
        collector=collector, num_tasks=len(tasks), uses_tools=any(t.tools for t in tasks),
        **dataclasses.asdict(submission),
    )


def resolve_tasks(value: Any) -> Path:
    """A JSONL path, or the name of a bundled task set."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    bundled = TASK_SETS / f"{text}.jsonl"
    if "/" not in text and bundled.is_file():
        return bundled
    names = sorted(p.stem for p in TASK_SETS.glob("*.jsonl"))
    raise SpecError(f"job.tasks: {text!r} is neither a file nor a bundled task set {names}")


def resolve_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return str(path.resolve())
    bundled = CHAT_TEMPLATES / f"{value}.jinja"
    if "/" not in value and bundled.is_file():
        return str(bundled)
    names = sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja"))
    raise SpecError(f"server.chat_template: {value!r} is neither a file nor a bundled template {names}")


def _check(spec: RunSpec) -> None:
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    c, m, s, r = spec.cluster, spec.model, spec.server, spec.registry
    need(c.kind in CLUSTER_KINDS, f"cluster.kind: {c.kind!r} is not supported; choose one of {list(CLUSTER_KINDS)}")
    need(c.timeout_min >= 1, f"cluster.timeout_min: must be >= 1, got {c.timeout_min}")
    if c.kind == "slurm":
        need(
            c.gpus_per_node is None or s.gpus_per_replica <= c.gpus_per_node,
            f"server.gpus_per_replica: {s.gpus_per_replica} GPUs do not fit on one node "
            f"(cluster.gpus_per_node={c.gpus_per_node}); multi-node replicas are not supported",
        )
        need(c.signal_delay_s >= 0, f"cluster.signal_delay_s: must be >= 0, got {c.signal_delay_s}")
        need(c.mem_gb is None or c.mem_gb > 0, f"cluster.mem_gb: must be > 0 or null, got {c.mem_gb}")

    need((m.path is None) != (m.embedded is None), "model: set exactly one of model.path and model.embedded")
    if m.embedded is not None:
        need(m.embedded in EMBEDDED_MODELS, f"model.embedded: {m.embedded!r} is not one of {sorted(EMBEDDED_MODELS)}")
    if m.path is not None and _looks_local(m.path):
        need(Path(m.path).expanduser().is_dir(), f"model.path: folder {m.path!r} does not exist")
    need(bool(m.served_name), "model.served_name: must not be empty (clients send it as `model`)")

    if spec.policy is not None:
        apply_policy(spec.policy, s, need)
    need(s.engine in BUILDERS, f"server.engine: {s.engine!r} is not one of {sorted(BUILDERS)}")
    need(bool(s.service) and "/" not in s.service, f"server.service: {s.service!r} must be a non-empty name without '/'")
    need(s.replicas >= 1, f"server.replicas: must be >= 1, got {s.replicas}")
    need(s.gpus_per_replica >= 0, f"server.gpus_per_replica: must be >= 0, got {s.gpus_per_replica}")
    need(s.max_model_len is None or s.max_model_len > 0, f"server.max_model_len: must be > 0, got {s.max_model_len}")
    need(
        s.kv_cache_memory_bytes is None or s.kv_cache_memory_bytes > 0,
        f"server.kv_cache_memory_bytes: must be > 0 or null, got {s.kv_cache_memory_bytes}",
    )
    need(
        s.gpu_memory_utilization is None or 0 < s.gpu_memory_utilization <= 1,
        f"server.gpu_memory_utilization: must be in (0, 1] or null, got {s.gpu_memory_utilization}",
    )
    need(s.port is None or 1 <= s.port <= 65535, f"server.port: must be in 1..65535 or null, got {s.port}")
    need(
        s.port is None or s.replicas == 1,
        f"server.port: a fixed port ({s.port}) cannot serve {s.replicas} replicas on one node; set it to null",
    )
    need(s.startup_timeout_s > 0, f"server.startup_timeout_s: must be > 0, got {s.startup_timeout_s}")
    need(
        not s.enable_auto_tool_choice or bool(s.tool_call_parser),
        "server.enable_auto_tool_choice: needs server.tool_call_parser (e.g. hermes for Qwen3)",
    )
    _check_parser(spec, need)
    parallel = s.tensor_parallel_size * s.pipeline_parallel_size
    need(
        s.tensor_parallel_size >= 1 and s.pipeline_parallel_size >= 1,
        f"server.tensor_parallel_size/pipeline_parallel_size: must be >= 1, got "
        f"{s.tensor_parallel_size}/{s.pipeline_parallel_size}",
    )
    need(
        s.gpus_per_replica == 0 or parallel == s.gpus_per_replica,
        f"server.gpus_per_replica: {s.gpus_per_replica} GPUs per replica, but tensor_parallel_size x "
        f"pipeline_parallel_size = {s.tensor_parallel_size} x {s.pipeline_parallel_size} = {parallel} "
        + ("do not fit" if parallel > s.gpus_per_replica else "would leave GPUs idle")
        + f"; make them equal (e.g. server.gpus_per_replica={parallel})",
    )
    if s.engine in BUILDERS:
        # A dry run of the command builder: its refusals are cheaper here than on a GPU node.
        try:
            build_launch(s.engine_spec(), m.path or "model", c.bind_host, 1, api_key=None)
        except ValueError as e:
            errors.append(str(e))  # the builder's message names the key
    need(s.drain_grace_s >= 0, f"server.drain_grace_s: must be >= 0, got {s.drain_grace_s}")
    if s.api_key not in (None, GENERATE_KEY):
        _check_key_file(s.api_key, need)
    try:
        s.chat_template = resolve_chat_template(s.chat_template)
    except SpecError as e:
        errors.append(str(e))

    r.validate(errors)

    if isinstance(spec.job, RolloutsJob):
        _check_collector(spec.job, s, need)
    if isinstance(spec.job, CommandJob):
        _check_process(spec.job, s, need)
    if errors:
        raise SpecError("invalid config:\n  " + "\n  ".join(errors))


def _check_collector(job: RolloutsJob, server: ServerSpec, need) -> None:
    col, sp = job.collector, job.collector.sampling
    need(
        col.service == server.service,
        f"job.service: {col.service!r} names no service of this run (server.service is {server.service!r})",
    )
    need(col.num_repeats >= 1, f"job.num_repeats: must be >= 1, got {col.num_repeats}")
    need(col.max_concurrency >= 1, f"job.max_concurrency: must be >= 1, got {col.max_concurrency}")
    need(col.max_turns >= 1, f"job.max_turns: must be >= 1, got {col.max_turns}")
    need(0 <= col.top_logprobs <= 20, f"job.top_logprobs: must be in 0..20, got {col.top_logprobs}")
    need(job.timeout_min >= 1, f"job.timeout_min: must be >= 1, got {job.timeout_min}")
    need(sp.temperature >= 0, f"job.sampling.temperature: must be >= 0, got {sp.temperature}")
    need(0 < sp.top_p <= 1, f"job.sampling.top_p: must be in (0, 1], got {sp.top_p}")
    need(sp.max_tokens >= 1, f"job.sampling.max_tokens: must be >= 1, got {sp.max_tokens}")
    if server.max_model_len is not None:
        need(
            sp.max_tokens < server.max_model_len,
            f"job.sampling.max_tokens: {sp.max_tokens} leaves no room for the prompt in "
            f"server.max_model_len={server.max_model_len}",
        )


def _check_process(job: CommandJob, server: ServerSpec, need) -> None:
    p = job.process
    need(
        p.service == server.service,
        f"job.service: {p.service!r} names no service of this run (server.service is {server.service!r})",
    )
    need(job.timeout_min >= 1, f"job.timeout_min: must be >= 1, got {job.timeout_min}")
    need(p.stop_grace_s >= 0, f"job.stop_grace_s: must be >= 0, got {p.stop_grace_s}")
    need(Path(p.cwd).is_dir(), f"job.cwd: folder {p.cwd!r} does not exist")
    for key in p.env:
        need(key not in ENDPOINT_ENV, f"job.env.{key}: set by the launcher for each run; remove it from job.env")
    if isinstance(p, CommandConfig):
        try:  # a dry run with stand-in values: a bad placeholder costs nothing here
            command_argv(p.command, dict.fromkeys(PLACEHOLDERS, "x"))
        except ValueError as e:
            need(False, str(e))  # names job.command
        return
    need(bool(p.config_paths), "job.config_paths: NeMo Gym needs its configs (resources server, model, agent), "
                               "e.g. job.config_paths=[resources_servers/.../configs/x.yaml,responses_api_models/"
                               "vllm_model/configs/vllm_model.yaml]")
    need(bool(p.agent_name), "job.agent_name: required; the agent of your config_paths that runs the rollouts")
    need(bool(p.input_jsonl), "job.input_jsonl: required; the tasks, as NeMo Gym JSONL")
    if p.input_jsonl:
        need((Path(p.cwd) / p.input_jsonl).is_file(),
             f"job.input_jsonl: no file {p.input_jsonl!r} (a relative path is read from job.cwd, {p.cwd})")
    for key in ("limit", "num_samples_in_parallel"):
        value = getattr(p, key)
        need(value is None or value >= 1, f"job.{key}: must be >= 1 or null, got {value}")
    need(p.startup_timeout_s > 0, f"job.startup_timeout_s: must be > 0, got {p.startup_timeout_s}")
    if p.gym_bin is not None:
        for program in ("ng_run", "ng_collect_rollouts"):
            need(os.access(Path(p.gym_bin) / program, os.X_OK),
                 f"job.gym_bin: no executable {program} in {p.gym_bin!r}; point it at the bin folder of the "
                 f"venv NeMo Gym is installed in, or null to find it on PATH (after job.setup)")
    for key, args in (("ng_run_args", p.ng_run_args), ("collect_args", p.collect_args)):
        for arg in args:
            name = arg.split("=", 1)[0].lstrip("+~")
            need(name not in GYM_OWNED_OVERRIDES,
                 f"job.{key}: {arg!r} is written by the gym job itself (from the service's endpoints and "
                 f"job.config_paths/agent_name/input_jsonl/limit/num_samples_in_parallel); remove it")


def _check_parser(spec: RunSpec, need) -> None:
    parser = spec.server.tool_call_parser
    known = known_tool_parsers(spec.server.engine)
    if not parser or known is None:
        return
    from_policy = spec.policy is not None and (
        spec.policy.generation.vllm_cfg.http_server_serving_chat_kwargs.tool_call_parser == parser
    )
    key = f"{_CHAT_KWARGS}.tool_call_parser" if from_policy else "server.tool_call_parser"
    close = difflib.get_close_matches(parser, sorted(known), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {sorted(known)}"
    need(parser in known, f"{key}: {parser!r} is not a tool parser of {spec.server.engine}{hint}")


def _check_key_file(value: str, need) -> None:
    path = Path(value).expanduser()
    if not path.is_file():
        need(False, f"server.api_key: {value!r} is not a file; use 'generate', null, or a file holding the key "
                    "(never the key itself: the config is saved in the run folder)")
        return
    need(
        path.stat().st_mode & 0o077 == 0,
        f"server.api_key: {value} is readable by other users; chmod 600 it",
    )


def _looks_local(path: str) -> bool:
    # A hub id is "org/name"; anything rooted or relative-dotted is a folder on disk.
    return path.startswith(("/", "./", "../", "~"))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
