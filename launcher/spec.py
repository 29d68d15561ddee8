"""From a composed Hydra config to a typed, validated ``RunSpec``.

Everything a run could trip on later is checked here, before any job is
submitted, and every error names the config key that is wrong.

``load_spec`` goes in three steps:

1. type: the composed config merged into the dataclasses below (``typed_spec``); a value of the
   wrong type or an unknown key stops here, naming the key.
2. normalise: what the config leaves to be worked out (``normalise``): the NeMo RL policy block
   fills the server keys left unset, chat templates and task sets are found by name, the job's
   folders become absolute paths. A step that cannot do its work raises ``SpecError`` naming
   the key; it is reported with the validation errors and its value is left as written.
3. validate: ``RunSpec.validate``, which only reads. Each config dataclass checks its own
   fields in its ``validate(checks)`` method, beside its definition (``server.checks``
   collects the errors); this module adds the checks that span sections.

Defaults: a dataclass that is also built without Hydra (``EngineSpec``, ``CollectorConfig``,
``ClusterSpec``) keeps its defaults in code, and conf/ does not restate them; one that is built
from the composed config only (``ModelSpec``, ``ServerSpec``'s own keys, the job submission keys,
``CommandConfig``/``GymConfig``) has no defaults: they are in conf/. The schemas are stored in
Hydra's ConfigStore (``schema/...``) and each option of conf/ starts from its schema, so
``python -m launcher --cfg job`` shows every key. The stored schemas are plain dicts: typing is
step 1's, so that every refusal is this module's, exit code 2, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from jobs.command import CommandConfig, GymConfig
from jobs.rollouts import CollectorConfig, Task, TaskFileError, load_tasks
from launcher.nemo_rl import Policy, apply_policy
from server import ray_cluster
from server.checks import Checks, ConfigError
from server.engines import BUILDERS, MULTINODE_BACKENDS, EngineSpec, NodeRole, build_launch, known_tool_parsers
from server.gateway import GatewaySettings
from server.job import ServerSettings
from server.models import EMBEDDED_MODELS
from server.registry import Registry, name_problem

CHAT_TEMPLATES = Path(__file__).resolve().parent.parent / "server" / "chat_templates"
TASK_SETS = Path(__file__).resolve().parent.parent / "jobs" / "tasks"
CLUSTER_KINDS = ("local", "slurm")


class SpecError(ConfigError):
    """A config value that cannot work; the message names the key."""


@dataclass(kw_only=True)
class RunInfo:
    """``run.*``, conf/config.yaml's."""

    name: str
    # Look for the programs a run starts (job.command's, NeMo Gym's, server.command's) before submitting.
    check_programs: bool
    # A run folder to resume in (launcher/resume.py): set on the command line, which brings its saved config.
    resume: Optional[str]

    def validate(self, checks: Checks) -> None:
        # It names the run's folder (outputs/<name>/...), its registry namespace and its jobs.
        problem = name_problem(self.name)
        checks.require(problem is None, "name", f"{problem}: it names the run's folders")
        if self.resume is not None:
            checks.require((Path(self.resume) / ".hydra" / "config.yaml").is_file(), "resume",
                           f"{self.resume} has no saved config (.hydra/config.yaml): not a run folder")


@dataclass
class ClusterSpec:
    """``cluster.*``; backends and tests build it too, so its defaults are here and conf/cluster/
    sets what each option changes."""

    kind: str  # local: this machine, through submitit's local executor; slurm: a Slurm cluster
    # where servers and the gateway listen; None: the address of the host they advertise (advertise_host,
    # advertise_interface or the node's hostname, as server.multinode.listen_address resolves it)
    bind_host: str | None = "127.0.0.1"
    advertise_host: str | None = None  # host written into registry URLs; None: the node's hostname
    # A replica spanning nodes (server.nodes_per_replica > 1): the interface whose IPv4 address its nodes
    # give each other (e.g. ib0); None: the address Slurm reaches each node at (scontrol's NodeAddr)
    advertise_interface: str | None = None
    timeout_min: int = 240  # time limit of each server job
    # Slurm (ignored by kind=local)
    partition: str | None = None  # where server jobs run; the other job's partition is job.partition
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = None  # what a node has: a replica that cannot fit is refused before submission
    cpus_per_task: int | None = None
    mem_gb: float | None = None  # per job
    constraint: str | None = None  # e.g. "a100|h100"
    exclusive: bool = False
    # shell lines before each job, e.g. ["module load cuda/12.4", "source ~/venvs/gym/bin/activate"]
    setup: list[str] = field(default_factory=list)
    srun_args: list[str] = field(default_factory=list)
    # any other sbatch option, e.g. {reservation: rl, mail_type: FAIL}
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # USR2 this long before the time limit (local jobs too): servers drain in-flight requests, the
    # rollouts/command job stops and is requeued
    signal_delay_s: int = 120
    # Before submitting, compare the run's requests with what the partitions' nodes have (scontrol) and
    # refuse what can never run; false: submit as asked (the pending-job checks still apply)
    fit_check: bool = True

    def validate(self, checks: Checks) -> None:
        checks.require(self.kind in CLUSTER_KINDS, "kind",
                       f"{self.kind!r} is not supported; choose one of {list(CLUSTER_KINDS)}")
        checks.at_least(self, "timeout_min", 1)
        checks.at_least(self, "signal_delay_s", 0)
        if self.kind == "slurm":
            checks.above(self, "mem_gb", 0, or_null=True)


@dataclass(kw_only=True)
class ModelSpec:
    """``model.*``, built from the composed config only: the values are conf/model/*.yaml's."""

    name: str
    path: str | None  # a local folder or a hub id
    embedded: str | None  # an embedded model (server.models), prepared on the node
    cache_dir: str | None
    served_name: str  # the model name clients send
    chat_template: str | None
    tool_call_parser: str | None
    tool_strict_level: str | None

    def validate(self, checks: Checks) -> None:
        checks.require((self.path is None) != (self.embedded is None), "",
                       f"set exactly one of {checks.key('path')} and {checks.key('embedded')}")
        if self.embedded is not None:
            checks.require(self.embedded in EMBEDDED_MODELS, "embedded",
                           f"{self.embedded!r} is not one of {sorted(EMBEDDED_MODELS)}")
        if self.path is not None and _looks_local(self.path):
            checks.require(Path(self.path).expanduser().is_dir(), "path", f"folder {self.path!r} does not exist")
        checks.require(bool(self.served_name), "served_name", "must not be empty (clients send it as `model`)")


GENERATE_KEY = "generate"


@dataclass(kw_only=True)
class ServerSpec(EngineSpec, ServerSettings):
    """Engine flags (``EngineSpec``) and how a replica starts and stops (``ServerSettings``), both with
    their defaults in code, plus how many replicas and for which service (built from the composed
    config only: their values are conf/server/vllm.yaml's)."""

    service: str
    replicas: int
    gpus_per_replica: int
    # >1: each replica is one Slurm job of this many nodes (head + headless workers, server/multinode.py)
    nodes_per_replica: int
    # mp: the engine's own multi-node multiprocessing (vLLM --nnodes, SGLang --nnodes); ray: a Ray cluster
    # per replica, the engine on its head (vLLM --distributed-executor-backend ray, server/ray_cluster.py)
    multinode_backend: str
    max_restarts: int  # replacements per replica when its job dies (launcher/fleet.py)
    no_replica_grace_s: float  # the run fails when no replica has been ready for this long
    # A replica's successor is submitted this long before its job's time limit (launcher/fleet.py);
    # None: automatic (cluster.signal_delay_s + 3x the slowest start seen); 0: no rollover.
    rollover_lead_s: float | None
    # "generate": a fresh key per run; null: no key; else a file (mode 0600) holding the key.
    api_key: str | None

    def parallel(self) -> tuple[int, str]:
        """The engine's ranks per replica, and the arithmetic behind them for messages."""
        sizes = [("tensor_parallel_size", self.tensor_parallel_size),
                 ("pipeline_parallel_size", self.pipeline_parallel_size)]
        if self.data_parallel_size != 1:
            sizes.append(("data_parallel_size", self.data_parallel_size))
        total = 1
        for _, size in sizes:
            total *= size
        names = " x ".join(name for name, _ in sizes)
        return total, f"{names} = {' x '.join(str(v) for _, v in sizes)} = {total}"

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineSpec)})

    def validate(self, checks: Checks) -> None:
        super().validate(checks)
        problem = name_problem(self.service)
        checks.require(problem is None, "service", f"{problem}: it names the service's registry folder")
        checks.at_least(self, "replicas", 1)
        checks.at_least(self, "max_restarts", 0)
        checks.above(self, "no_replica_grace_s", 0)
        checks.at_least(self, "rollover_lead_s", 0, or_null=True)
        checks.at_least(self, "gpus_per_replica", 0)
        checks.at_least(self, "nodes_per_replica", 1)
        checks.require(self.multinode_backend in MULTINODE_BACKENDS, "multinode_backend",
                       f"{self.multinode_backend!r} is not one of {list(MULTINODE_BACKENDS)}")
        checks.must(self, "port", "in 1..65535 or null", lambda v: v is None or 1 <= v <= 65535)
        checks.require(self.port is None or self.replicas == 1, "port",
                       f"a fixed port ({self.port}) cannot serve {self.replicas} replicas on one node; set it to null")
        checks.above(self, "startup_timeout_s", 0)
        parallel, product = self.parallel()
        checks.require(
            self.gpus_per_replica == 0 or parallel == self.gpus_per_replica, "gpus_per_replica",
            f"{self.gpus_per_replica} GPUs per replica, but {product} "
            + ("do not fit" if parallel > self.gpus_per_replica else "would leave GPUs idle")
            + f"; make them equal (e.g. {checks.key('gpus_per_replica')}={parallel})",
        )
        checks.at_least(self, "drain_grace_s", 0)
        if self.api_key not in (None, GENERATE_KEY):
            self._check_key_file(checks)

    def _check_key_file(self, checks: Checks) -> None:
        path = Path(self.api_key).expanduser()
        if not path.is_file():
            checks.fail("api_key", f"{self.api_key!r} is not a file; use 'generate', null, or a file holding the key "
                                   "(never the key itself: the config is saved in the run folder)")
            return
        checks.require(path.stat().st_mode & 0o077 == 0, "api_key",
                       f"{self.api_key} is readable by other users; chmod 600 it")


@dataclass(kw_only=True)
class GatewaySpec(GatewaySettings):
    """``gateway.*`` (conf/gateway/): the service's one URL, a job of its own beside the replicas
    (no GPU); its serving settings are ``GatewaySettings``' (server/gateway.py)."""

    # false: no gateway; the job gets the replicas' URLs (the collector fails over by itself, through
    # jobs.pool; a program job gets them all in POLICY_BASE_URLS)
    enabled: bool = True
    host: Optional[str] = None  # where it listens; null: cluster.bind_host, as the replicas
    timeout_min: Optional[int] = None  # its job's time limit; null: cluster.timeout_min, the replicas'
    partition: Optional[str] = None  # Slurm: it needs no GPU, e.g. "cpu"; null: cluster.partition
    cpus_per_task: int = 1  # one process, one event loop: one core serves thousands of requests/s
    mem_gb: float = 1.0  # about 110 MB with 1,000 streams open (benchmarks/bench_gateway.py)

    def validate(self, checks: Checks) -> None:
        if not self.enabled:
            return
        super().validate(checks)
        checks.at_least(self, "timeout_min", 1, or_null=True)
        checks.at_least(self, "cpus_per_task", 1)
        checks.above(self, "mem_gb", 0)

    def settings(self) -> GatewaySettings:
        return GatewaySettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GatewaySettings)})


@dataclass(kw_only=True)
class _JobSubmission:
    """The keys of a job config that say how to submit it, not what it does; their values are
    conf/job/*.yaml's (they differ by kind)."""

    timeout_min: int
    partition: Optional[str]
    cpus_per_task: Optional[int]
    mem_gb: Optional[float]
    # Near its time limit the job stops, is requeued (submitit's checkpoint) and resumes, this often at most.
    max_requeues: int

    def validate(self, checks: Checks) -> None:
        checks.at_least(self, "timeout_min", 1)
        checks.at_least(self, "max_requeues", 0)


_SUBMISSION_KEYS = tuple(f.name for f in dataclasses.fields(_JobSubmission))


@dataclass(kw_only=True)
class RolloutsJob(_JobSubmission):
    """``job=rollouts``: the built-in collector. Its settings are ``CollectorConfig``'s."""

    collector: CollectorConfig
    kind: str = "rollouts"
    # Read from the task file while normalising.
    num_tasks: int = 0
    uses_tools: bool = False  # some task offers tools: readiness then checks tool calling

    @property
    def num_rollouts(self) -> int:
        return self.num_tasks * self.collector.num_repeats

    def validate(self, checks: Checks) -> None:
        super().validate(checks)
        self.collector.validate(checks)  # its keys are job.*


@dataclass
class NoJob:
    """``job=none``: serve only, until Ctrl-C."""

    kind: str = "none"

    def validate(self, checks: Checks) -> None:
        pass


@dataclass(kw_only=True)
class CommandJob(_JobSubmission):
    """``job=command`` / ``job=gym``: a program run as the job (``jobs.command.run``) with the
    service's endpoints in its environment; ``process`` is a ``CommandConfig`` or ``GymConfig``."""

    process: Any
    kind: str = "command"
    # job=gym, read from Gym's configs while normalising (jobs.command.GymConfig): its training
    # variant (readiness then checks token ids, token_id:N logprobs, /tokenize), prefix supply.
    records_token_ids: bool = False
    supplies_prefix: bool = False

    def validate(self, checks: Checks) -> None:
        super().validate(checks)
        self.process.validate(checks)  # its keys are job.*


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
# What the keys of job.* are typed into, besides the submission keys.
_JOB_SETTINGS = {"rollouts": CollectorConfig, **PROCESS_CONFIGS}


@dataclass
class RunSpec:
    run: RunInfo
    cluster: ClusterSpec
    model: ModelSpec
    server: ServerSpec
    registry: Registry = field(default_factory=Registry)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    policy: Optional[Policy] = None  # a NeMo RL policy block, translated into server.*
    job: Any = None  # RolloutsJob | CommandJob | NoJob, chosen by job.kind

    def server_hash(self) -> str:
        """Identifies a server configuration: runs with equal hashes could share servers."""
        blob = json.dumps([dataclasses.asdict(self.model), dataclasses.asdict(self.server)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def validate(self, checks: Checks) -> None:
        self.run.validate(checks.at("run"))
        self.cluster.validate(checks.at("cluster"))
        self.model.validate(checks.at("model"))
        if self.policy is not None:
            self.policy.validate(checks.at("policy"))
        self.server.validate(checks.at("server"))
        self.registry.validate(checks.at("registry"))
        self.gateway.validate(checks.at("gateway"))
        self.job.validate(checks.at("job"))
        _check_across(self, checks)


# ---------------------------------------------------------------- the three steps


def load_spec(cfg: DictConfig) -> RunSpec:
    """Type ``cfg``, normalise it, validate it; ``SpecError`` names every key that is wrong."""
    spec = typed_spec(cfg)
    checks = Checks()
    normalise(spec, checks)
    spec.validate(checks)
    checks.raise_if_any(SpecError)
    return spec


def typed_spec(cfg: DictConfig) -> RunSpec:
    """The composed config as dataclasses; a wrong type or an unknown key raises ``SpecError``."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    job_cfg = raw.get("job") or {}  # kept in raw too: run.name may read job.kind
    raw.pop("hydra", None)
    spec = _typed(RunSpec, raw, prefix="")
    spec.job = _typed_job(cfg.job if "job" in cfg else OmegaConf.create(job_cfg))
    return spec


# Keys whose value is a path on this machine, where a leading ~ is the user's home: each is expanded
# before it is used (launcher.cli quotes such a value for Hydra, whose grammar refuses a bare ~).
HOME_PATH_KEYS = (
    "model.path", "model.cache_dir", "server.chat_template", "server.api_key", "registry.root",
    "job.tasks", "job.cwd", "job.gym_bin", "job.input_jsonl",
)


def normalise(spec: RunSpec, checks: Checks) -> None:
    """Work out what the config leaves to be worked out; a step that fails is reported in ``checks``
    (its value stays as written) and the others go on."""
    if spec.policy is not None:
        apply_policy(spec.policy, spec.server)
    if spec.gateway.host is None:  # where the replicas listen (null too): reachable from the same nodes
        spec.gateway.host = spec.cluster.bind_host
    # The engine takes the path as written; ~ means nothing to it (a hub id has no ~).
    spec.model.path = _home(spec.model.path)
    with checks.reporting(SpecError):
        spec.server.chat_template = resolve_chat_template(spec.server.chat_template)
    job = spec.job
    if isinstance(job, RolloutsJob):
        with checks.reporting(SpecError):
            job.collector.tasks = str(resolve_tasks(job.collector.tasks))
            tasks = _load_tasks(job.collector.tasks)
            job.num_tasks, job.uses_tools = len(tasks), any(t.tools for t in tasks)
    if isinstance(job, CommandJob):
        # The program runs where the launcher was started unless told otherwise; jobs start elsewhere.
        job.process.cwd = _absolute(job.process.cwd or os.getcwd())
        if isinstance(job.process, GymConfig) and job.process.gym_bin:
            job.process.gym_bin = _absolute(job.process.gym_bin)
        if isinstance(job.process, GymConfig):
            job.process.input_jsonl = _home(job.process.input_jsonl)  # Gym reads it as written
            # Gym (0.7) also finds a relative config path in its install; looking for it may run setup lines.
            slurm = spec.cluster.kind == "slurm"
            install = job.process.install(spec.cluster.setup if slurm else ()) if spec.run.check_programs else None
            job.records_token_ids = job.process.records_token_ids(install)
            job.supplies_prefix = job.process.supplies_prefix(install)




# ---------------------------------------------------------------- typing


def _typed(schema: type, data: Any, prefix: str, also: tuple[str, ...] = ()) -> Any:
    """``data`` typed into ``schema``; ``also``: more keys the section has (typed elsewhere), for the
    "did you mean" of an unknown key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        where = f"{prefix}{key}" if key else prefix.rstrip(".") or "config"
        parent = getattr(e, "parent_node", None)
        if isinstance(e, ConfigKeyError) and isinstance(parent, DictConfig) and key and e.key not in parent:
            section = f"{prefix}{key}".rpartition(".")[0]
            options = [*parent.keys(), *(also if "." not in key else ())]
            raise SpecError(unknown_key(section, str(e.key), options)) from None
        if isinstance(e, MissingMandatoryValue):
            group = where.split(".")[0]
            raise SpecError(f"{where}: missing; every option in conf/{group}/ sets it: set it too, or start from "
                            "one of them (defaults: [<option>, _self_])") from None
        raise SpecError(f"{where}: {_first_line(e)}") from None


def _typed_job(job_cfg: DictConfig) -> JobSpec:
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
    settings = _typed(_JOB_SETTINGS[kind], data, prefix="job.", also=("kind", *_SUBMISSION_KEYS))
    if kind in PROCESS_CONFIGS:
        return CommandJob(process=settings, kind=kind, **dataclasses.asdict(submission))
    return RolloutsJob(collector=settings, **dataclasses.asdict(submission))


# ---------------------------------------------------------------- normalising


def resolve_tasks(value: Any) -> Path:
    """A JSONL path, or the name of a bundled task set."""
    return _file_or_bundled(str(value), TASK_SETS, ".jsonl", "job.tasks", "task set")


def resolve_chat_template(value: str | None) -> str | None:
    """A template file, or the name of a bundled template; None: the model's own."""
    if value is None:
        return None
    return str(_file_or_bundled(value, CHAT_TEMPLATES, ".jinja", "server.chat_template", "template"))


def _file_or_bundled(value: str, folder: Path, suffix: str, key: str, what: str) -> Path:
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    bundled = folder / f"{value}{suffix}"
    if "/" not in value and bundled.is_file():
        return bundled
    names = sorted(p.stem for p in folder.glob(f"*{suffix}"))
    raise SpecError(f"{key}: {value!r} is neither a file nor a bundled {what} {names}")


def _load_tasks(path: str) -> list[Task]:
    try:
        tasks = load_tasks(path)
    except (OSError, TaskFileError) as e:
        raise SpecError(f"job.tasks: {e}") from None
    if not tasks:
        raise SpecError(f"job.tasks: {path} holds no task")
    return tasks


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _home(path: str | None) -> str | None:
    """``~/x`` -> ``/home/me/x``; any other value as it is."""
    return str(Path(path).expanduser()) if path and path.startswith("~") else path


# ---------------------------------------------------------------- checks that span sections


def _check_across(spec: RunSpec, checks: Checks) -> None:
    c, m, s = spec.cluster, spec.model, spec.server
    if spec.run.check_programs:
        _check_programs(spec, checks)
    _check_nodes(spec, checks)
    lead = s.rollover_lead_s
    if lead:  # the successor must be submitted before Slurm's warning drains the old job, within the limit
        checks.require(lead > c.signal_delay_s and lead < c.timeout_min * 60, "server.rollover_lead_s",
                       f"must be above cluster.signal_delay_s ({c.signal_delay_s}) and below the time limit "
                       f"(cluster.timeout_min={c.timeout_min}: {c.timeout_min * 60}s), or 0 (no rollover) or "
                       f"null (automatic), got {lead}")
    if spec.policy is not None:
        _check_policy_agrees(spec.policy, s, checks)
    _check_parser(spec, checks)
    if s.engine in BUILDERS:
        # A dry run of the command builder: its refusals are cheaper here than on a GPU node.
        with checks.reporting(ValueError):  # the builder's message names the key
            n = s.nodes_per_replica
            # Spanning nodes: the head's command and a worker's. Loopback stands for the addresses,
            # which exist only on the nodes (a builder looks up the interface holding its own).
            # A Ray cluster's engine runs on its head alone.
            ranks = range(1 if s.multinode_backend == "ray" else min(n, 2))
            roles = [NodeRole(r, n, "127.0.0.1", 1, "127.0.0.1", s.multinode_backend) for r in ranks] if n > 1 \
                else [None]
            for role in roles:
                build_launch(s.engine_spec(), m.path or "model", c.bind_host or "127.0.0.1", 1, api_key=None,
                             node=role)
    job = spec.job
    if isinstance(job, CommandJob) and job.supplies_prefix:
        checks.require(spec.gateway.enabled and spec.gateway.on_policy, "job.config_paths",
                       "supply_prefix_token_ids (vllm_model_supply_prefix.yaml) needs the gateway with "
                       "gateway.on_policy=true: it implements required_prefix_token_ids, which stock vLLM does "
                       "not, and Gym fails every call that continues a rollout without it; drop that config "
                       f"or set gateway.enabled=true and gateway.on_policy=true (now {spec.gateway.enabled} and "
                       f"{spec.gateway.on_policy})")
    if isinstance(job, (RolloutsJob, CommandJob)):
        settings = job.collector if isinstance(job, RolloutsJob) else job.process
        checks.require(settings.service == s.service, "job.service",
                       f"{settings.service!r} names no service of this run (server.service is {s.service!r})")
    if isinstance(job, RolloutsJob) and job.collector.on_policy and spec.gateway.enabled:
        # Through a gateway the collector leaves splicing to it: one that passes ids on unchanged
        # would leave job.on_policy a promise nobody keeps.
        checks.require(spec.gateway.on_policy, "job.on_policy",
                       "the collector's requests go through the gateway, and gateway.on_policy=false passes "
                       "their token ids on unchanged: set gateway.on_policy=true, or job.on_policy=false")
    if isinstance(job, RolloutsJob) and s.max_model_len is not None:
        max_tokens = job.collector.sampling.max_tokens
        checks.require(max_tokens < s.max_model_len, "job.sampling.max_tokens",
                       f"{max_tokens} leaves no room for the prompt in server.max_model_len={s.max_model_len}")


def _check_nodes(spec: RunSpec, checks: Checks) -> None:
    """How a replica's ranks fall on its nodes, with the arithmetic in every refusal."""
    c, s = spec.cluster, spec.server
    n, g = s.nodes_per_replica, c.gpus_per_node
    if n < 1:
        return  # ServerSpec.validate said so
    if n == 1:
        checks.require(
            c.kind != "slurm" or g is None or s.gpus_per_replica <= g, "server.gpus_per_replica",
            f"{s.gpus_per_replica} GPUs do not fit on one node (cluster.gpus_per_node={g}); span nodes with "
            f"server.nodes_per_replica={-(-s.gpus_per_replica // g) if g else 2} (and "
            f"server.gpus_per_replica = nodes x cluster.gpus_per_node)",
        )
        return
    if not checks.require(c.kind == "slurm", "server.nodes_per_replica",
                          f"{n} nodes per replica need cluster=slurm: a {c.kind} run has this one machine"):
        return
    # How the engine's ranks split over the nodes is the command builder's to refuse (its dry run
    # in _check_across): it knows what each engine can split.
    if s.gpus_per_replica:
        if not checks.require(g is not None, "cluster.gpus_per_node",
                              f"needed with server.nodes_per_replica={n}: a replica takes that many GPUs on "
                              "each of its nodes"):
            return
        checks.require(s.gpus_per_replica == n * g, "server.gpus_per_replica",
                       f"{n} nodes (server.nodes_per_replica) x {g} GPUs (cluster.gpus_per_node) = {n * g} GPUs "
                       f"per replica, but it is {s.gpus_per_replica}; set it to {n * g}")


def _check_programs(spec: RunSpec, checks: Checks) -> None:
    """The programs the jobs start exist where the jobs will look for them, as far as this machine can
    tell: on Slurm the jobs run the cluster's setup lines first, and the compute nodes may have what
    this one lacks."""
    slurm = spec.cluster.kind == "slurm"
    setup = list(spec.cluster.setup) if slurm else []
    key = "cluster.setup" if slurm else ""
    hint = "; if it is there only on the compute nodes, set run.check_programs=false" if slurm else ""
    spec.server.check_programs(checks.at("server"), setup, key, hint)
    if spec.server.nodes_per_replica > 1 and spec.server.multinode_backend == "ray":
        why = ray_cluster.missing(spec.server.env, setup, key or None)
        checks.require(why is None, "server.multinode_backend",
                       f"ray runs a Ray node on every node of a replica, with the `ray` program beside the server "
                       f"jobs' Python or on PATH, and that Python imports ray: {why}; pip install "
                       f"'gymlaunch[ray]'{hint}")
    if isinstance(spec.job, CommandJob):
        spec.job.process.check_programs(checks.at("job"), setup, key, hint)


def _check_policy_agrees(policy: Policy, server: ServerSpec, checks: Checks) -> None:
    """A key of the policy block that is also a server key must have the server key's value (the block
    filled it in while normalising where the config left it unset)."""
    for flag in policy.server_flags():
        current = getattr(server, flag.server_key)
        checks.require(
            current == flag.value, f"policy.{flag.key}",
            f"{flag.value!r} disagrees with server.{flag.server_key}={current!r}; keep one source of truth "
            f"(drop the key from the policy block, or set server.{flag.server_key}={flag.value})",
        )


def _check_parser(spec: RunSpec, checks: Checks) -> None:
    parser = spec.server.tool_call_parser
    known = known_tool_parsers(spec.server.engine)
    if not parser or known is None:
        return
    from_policy = [f"policy.{flag.key}" for flag in (spec.policy.server_flags() if spec.policy else [])
                   if flag.server_key == "tool_call_parser" and flag.value == parser]
    close = difflib.get_close_matches(parser, sorted(known), n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {sorted(known)}"
    checks.require(parser in known, (from_policy or ["server.tool_call_parser"])[0],
                   f"{parser!r} is not a tool parser of {spec.server.engine}{hint}")


def unknown_key(section: str, name: str, options: Iterable[str], rest: str = "") -> str:
    """The message for ``<section>.<name>[.<rest>]``, where ``section`` has no key ``name`` but
    ``options``: the close ones as "did you mean", else all of them."""
    full = lambda key: ".".join(part for part in (section, key, rest) if part)  # noqa: E731
    options = sorted({str(o) for o in options} - {"hydra"})
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    if close:
        return f"{full(name)}: no such key; did you mean {' or '.join(full(c) for c in close)}?"
    where = f"{section}'s keys" if section else "the top-level keys"
    return f"{full(name)}: no such key; {where}: {', '.join(options)}"


def _looks_local(path: str) -> bool:
    # A hub id is "org/name"; anything rooted or relative-dotted is a folder on disk.
    return path.startswith(("/", "./", "../", "~"))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


# ---------------------------------------------------------------- schemas in Hydra's ConfigStore


def _schema_node(*schemas: type, drop: tuple[str, ...] = (), **fixed: Any) -> dict:
    """The keys of ``schemas`` with their defaults in code ("???" where conf/ gives the value), as a
    plain dict: composing it types nothing."""
    node: dict = dict(fixed)
    for schema in schemas:
        node.update(OmegaConf.to_container(OmegaConf.structured(schema)))
    return {key: value for key, value in node.items() if key not in drop}


def store_schemas() -> None:
    """Each option of conf/<group>/ starts from ``schema/<group>`` (job options: ``schema/job/<kind>``)
    in its defaults list, e.g. ``- /schema/server@_here_``."""
    cs = ConfigStore.instance()
    for name, schema in (("cluster", ClusterSpec), ("model", ModelSpec), ("server", ServerSpec), ("registry", Registry),
                         ("gateway", GatewaySpec)):
        cs.store(group="schema", name=name, node=_schema_node(schema), provider="gymlaunch")
    cs.store(group="schema/job", name="none", node={"kind": "none"}, provider="gymlaunch")
    for kind, settings in _JOB_SETTINGS.items():
        node = _schema_node(_JobSubmission, settings, drop=_LAUNCHER_OWNED[kind], kind=kind)
        cs.store(group="schema/job", name=kind, node=node, provider="gymlaunch")


store_schemas()
