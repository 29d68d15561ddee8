"""Any program as the job that uses a service: ``job=command``, and NeMo Gym's collection, ``job=gym``.

The launcher submits ``run(cfg)`` once the service's replicas are ready. The job
runs the program as its own child (never detached: its own process group, and
the kernel signals it if the job dies) with the endpoints in its environment:

- ``POLICY_BASE_URLS``: the service's gateway's base URL (``http://host:port/v1``), or with
  ``gateway.enabled=false`` the comma-separated base URLs of the ready replicas
- ``POLICY_ENDPOINT_FILE``: a file holding the gateway's base URL, rewritten (atomically) when a
  successor of the gateway serves elsewhere (unset without a gateway)
- ``POLICY_API_KEY``: the key they take (unset when the service has no key)
- ``POLICY_MODEL_NAME``: the served model name requests send as ``model``
- ``GYMLAUNCH_REGISTRY_ROOT``, ``GYMLAUNCH_NAMESPACE``: for ``jobs.pool.EndpointPool`` / ``server.registry``

``job=gym`` is the same machinery with a fixed program: ``ng_run`` (Gym's servers,
pointed at the endpoints) as a background child until it reports its servers ready,
then ``ng_collect_rollouts`` into ``<run dir>/gym_rollouts.jsonl``, then ``ng_run``
stopped with SIGINT (its Ctrl-C shutdown) whatever happened.

Output of each program goes to ``<run dir>/logs/<name>.log``; a non-zero exit raises
``CommandFailed`` naming the exit code and the log, so the job (and the run) fails.
SIGTERM/SIGINT to the job (a cancel) stops the programs before the job ends.
SIGUSR2 (the time-limit warning) stops them the same way and raises
``CommandStopped`` with that signal: submitted as ``jobs.requeue.Requeueable(run)``
the job is requeued and runs the program(s) again from the start, so a program
that should outlive the limit must resume from its own output.

Imports nothing from launcher/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from server import process, programs
from server.onpolicy import prefix_contiguity
from server.checks import Checks
from server.registry import NAMESPACE_ENV, ROOT_ENV, Registry
from server.templates import fill_command

POLICY_BASE_URLS_ENV = "POLICY_BASE_URLS"
POLICY_API_KEY_ENV = "POLICY_API_KEY"
POLICY_MODEL_ENV = "POLICY_MODEL_NAME"
POLICY_ENDPOINT_FILE_ENV = "POLICY_ENDPOINT_FILE"
ENDPOINT_ENV = (POLICY_BASE_URLS_ENV, POLICY_API_KEY_ENV, POLICY_MODEL_ENV, POLICY_ENDPOINT_FILE_ENV, ROOT_ENV,
                NAMESPACE_ENV)

# What `job.command` may name. There is deliberately no {api_key}: argv shows in `ps` for every
# user of the node; a program that only takes the key as an argument can read it through a shell:
# sh -c 'exec my-eval --api-key "$POLICY_API_KEY"'.
PLACEHOLDERS = {
    "base_urls": "the gateway's base URL (gateway.enabled=false: comma-separated base URLs of the ready replicas)",
    "base_url": "the first of them",
    "model": "the served model name",
    "run_dir": "the run's output folder",
    "python": "the job's own interpreter",
}

GYM_OUTPUT = "gym_rollouts.jsonl"
GYM_PROGRAMS = ("ng_run", "ng_collect_rollouts")
# ng_run prints this once every Gym server answers (nemo_gym/cli.py, RunHelper.wait_for_spinup).
GYM_READY = re.compile(r"All \d+ / \d+ servers ready")
# Gym resolves OmegaConf interpolations in its overrides: the key is read from ng_run's environment,
# so the literal key never appears in an argv.
GYM_API_KEY_OVERRIDE = "+policy_api_key=${oc.env:" + POLICY_API_KEY_ENV + "}"
# Gym's vllm_model server, as its configs (responses_api_models/vllm_model/configs/*.yaml) define it:
# <instance>.responses_api_models.vllm_model.<key>, base_url ${policy_base_url} when it is the policy.
GYM_VLLM_MODEL_KEY = ".responses_api_models.vllm_model."
GYM_POLICY_BASE_URL = "${policy_base_url}"
# With an endpoint file Gym retries a refused connection this often, 0.5 s apart, then fails the
# call (nemo_gym/server_utils.py, request). The retries go to the address the call started with: Gym
# re-reads the file only when a call starts, at most every 10 s (vllm_model/app.py, _resolve_client,
# endpoint_check_interval_s), so calls started after a replacement gateway published itself go there.
# Its default, 8 (4 s), is shorter than a replacement's start at the same address (gateway.port
# fixed, same node): 40 (20 s) lets a call outlive that.
GYM_ENDPOINT_RETRIES = 40
# ng_run (0.5+) waits up to model_endpoint_readiness_timeout_seconds (default 600) for the policy
# URL to accept a connection before it starts its servers. Our readiness gate proved that URL
# answers chat completions before the job was submitted: a short wait, as long as a call's retries
# above, still outlives a gateway being replaced; a service that is gone fails the job in 20 s, not 10 min.
GYM_ENDPOINT_WAIT_S = 20
# The Gym keys the gym job writes beyond config_paths and policy_*, with the first NeMo Gym release
# that has each (older ones ignore an unknown model key and would silently lose what it does).
# model_endpoint_readiness_timeout_seconds is a global key (nemo_gym/global_config.py); the others
# are VLLMModelConfig fields (responses_api_models/vllm_model/app.py). tests/test_gym_keys.py holds
# this table against the keys copied from each release's source.
GYM_KEY_SINCE = {
    "model_endpoint_readiness_timeout_seconds": (0, 5),
    "endpoint_file": (0, 6),
    "endpoint_connection_retries": (0, 6),
    "supply_prefix_token_ids": (0, 6),
    "forward_session_id_as_conversation_id": (0, 7),
}
# An installed distribution's metadata folder: its name carries the version (PEP 427/376).
_GYM_DIST_INFO = re.compile(r"nemo_gym-(\d+)\.(\d+)(?:\.(\d+))?[^/]*\.dist-info")
# Overrides the gym job writes itself; a user value would contradict them.
GYM_OWNED_OVERRIDES = (
    "config_paths", "policy_base_url", "policy_api_key", "policy_model_name",
    "agent_name", "input_jsonl_fpath", "output_jsonl_fpath", "limit", "num_samples_in_parallel",
)

_POLL_S = 0.2


@dataclass(frozen=True)
class GymInstall:
    """The NeMo Gym installation an ``ng_run`` belongs to."""

    version: tuple[int, ...]  # (major, minor, patch)
    site: Path  # the site-packages holding nemo_gym, where Gym also finds its bundled configs

    @property
    def release(self) -> str:
        return ".".join(map(str, self.version))


def gym_install(ng_run: str | None) -> GymInstall | None:
    """Where ``ng_run``'s NeMo Gym is installed, from the ``nemo_gym-<version>.dist-info`` of its
    environment: ``<prefix>/bin/ng_run`` beside ``<prefix>/lib/python3.X/site-packages`` (a venv,
    uv's, conda's, ``pip --user``'s). None when that layout does not hold or it is ambiguous."""
    if not ng_run:
        return None
    found = [(m, d) for d in (Path(ng_run).parent.parent / "lib").glob("python3*/site-packages/nemo_gym-*.dist-info")
             if (m := _GYM_DIST_INFO.fullmatch(d.name))]
    if len(found) != 1:
        return None
    match, dist_info = found[0]
    return GymInstall(tuple(int(n or 0) for n in match.groups()), dist_info.parent)


def _has(install: GymInstall | None, key: str) -> bool:
    """Whether that Gym release knows ``key`` (``GYM_KEY_SINCE``); unknown release: no."""
    return install is not None and install.version[:2] >= GYM_KEY_SINCE[key]


class CommandStopped(RuntimeError):
    """A signal stopped the programs; ``signum`` says which (SIGUSR2: the time-limit warning)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class CommandFailed(RuntimeError):
    """The program exited non-zero, never got ready, or the job was stopped."""


@dataclass
class Endpoints:
    """The service a job uses, as the launcher saw it ready."""

    service: str
    namespace: str
    registry: Registry
    base_urls: list[str]
    model: str
    api_key_file: str | None = None
    endpoint_file: str | None = None  # the gateway's URL, kept current by the launcher

    def current_base_urls(self) -> list[str]:
        """The gateway's URL as the endpoint file has it now, else ``base_urls``: a job that starts
        (or is requeued) after a gateway rollover would otherwise be handed the old gateway."""
        try:
            current = Path(self.endpoint_file).read_text().strip() if self.endpoint_file else ""
        except OSError:  # the launcher replaces it atomically; absent only while no gateway serves
            current = ""
        return [current] if current else self.base_urls

    def environ(self) -> dict[str, str]:
        env = {
            POLICY_BASE_URLS_ENV: ",".join(self.current_base_urls()), POLICY_MODEL_ENV: self.model,
            ROOT_ENV: str(self.registry.root), NAMESPACE_ENV: self.namespace,
        }
        if self.endpoint_file:
            env[POLICY_ENDPOINT_FILE_ENV] = self.endpoint_file
        if self.api_key_file:
            env[POLICY_API_KEY_ENV] = Path(self.api_key_file).read_text().strip()
        return env


@dataclass(kw_only=True)
class ProcessConfig:
    """What every program the job runs shares: where, with what environment, how it is stopped."""

    # Built from the launcher's config only (conf/job/command.yaml, gym.yaml): the defaults are there.
    service: str
    env: dict[str, str]  # added to the job's environment
    cwd: str | None  # None: where the launcher was started
    setup: list[str]  # bash lines before the program (venv activation, module load)
    stop_grace_s: float  # SIGTERM (SIGINT for ng_run) to SIGKILL
    # Filled in by the launcher for each run.
    run_dir: str = ""
    endpoints: Endpoints | None = None

    def validate(self, checks: Checks) -> None:
        checks.at_least(self, "stop_grace_s", 0)
        checks.require(self.cwd is None or Path(self.cwd).is_dir(), "cwd", f"folder {self.cwd!r} does not exist")
        for key in self.env:
            checks.require(key not in ENDPOINT_ENV, f"env.{key}",
                           f"set by the launcher for each run; remove it from {checks.key('env')}")

    @property
    def log_dir(self) -> Path:
        return Path(self.run_dir) / "logs"

    def path_first(self) -> str | None:
        """Folders (``os.pathsep``-joined) to put first on the programs' PATH."""
        return None

    def check_programs(
        self, checks: Checks, outer_setup: Sequence[str] = (), outer_key: str = "", hint: str = ""
    ) -> None:
        """The programs the job starts exist where it will look for them; ``outer_setup`` (named
        ``outer_key``) runs before the job's own ``setup`` (a cluster's setup lines), ``hint`` ends
        each message. Looks (and may run the setup lines, bounded): call it only before submitting."""

    def find_program(self, program: str, outer_setup: Sequence[str] = ()) -> programs.Found:
        """``program`` looked up as ``_Runner`` will start it: this environment plus ``env``,
        ``path_first()`` first on PATH, in ``cwd``, after the setup lines."""
        return programs.find(program, env=self.env, cwd=self.cwd, setup=self.setup, shell_setup=outer_setup,
                             path_first=self.path_first())

    def _setup_key(self, checks: Checks, outer_setup: Sequence[str], outer_key: str) -> str | None:
        keys = [outer_key] if outer_setup else []
        keys += [checks.key("setup")] if self.setup else []
        return " and ".join(keys) or None


@dataclass(kw_only=True)
class CommandConfig(ProcessConfig):
    """``job=command``: one program, its argv a template with ``PLACEHOLDERS``."""

    command: str | None

    def validate(self, checks: Checks) -> None:
        super().validate(checks)
        with checks.reporting(ValueError):  # a dry run with stand-in values: a bad placeholder costs nothing here
            command_argv(self.command, dict.fromkeys(PLACEHOLDERS, "x"))  # its message names job.command

    def check_programs(
        self, checks: Checks, outer_setup: Sequence[str] = (), outer_key: str = "", hint: str = ""
    ) -> None:
        unknown = "\0"  # a placeholder only the run fills in
        try:
            argv = command_argv(self.command, {**dict.fromkeys(PLACEHOLDERS, unknown), "python": sys.executable})
        except ValueError:
            return  # validate says why
        program = argv[0]
        if unknown in program:
            return
        found = self.find_program(program, outer_setup)
        if found.path:
            return
        reason = programs.why_not(program, found, cwd=self.cwd, cwd_key=checks.key("cwd"),
                                  setup_key=self._setup_key(checks, outer_setup, outer_key))
        if "/" in program:
            fix = "fix the path, chmod +x it, or start a script with its interpreter ({python} path/to/script.py)"
        else:
            fix = (f"give its full path, or add {checks.key('setup')} lines that put it on PATH "
                   "(e.g. activating its venv)")
        checks.fail("command", f"{reason}; {fix}{hint}")


@dataclass(kw_only=True)
class GymConfig(ProcessConfig):
    """``job=gym``: ``ng_run`` + ``ng_collect_rollouts`` against the service."""

    config_paths: list[str]  # Gym's +config_paths (resources server, model, agent)
    agent_name: str | None
    input_jsonl: str | None
    limit: int | None
    num_samples_in_parallel: int | None
    gym_bin: str | None  # folder with ng_run and ng_collect_rollouts; None: found on PATH
    startup_timeout_s: float  # ng_run started to all its servers ready
    ng_run_args: list[str]  # more ng_run overrides
    collect_args: list[str]  # more ng_collect_rollouts overrides

    def validate(self, checks: Checks) -> None:
        super().validate(checks)
        checks.require(
            bool(self.config_paths), "config_paths",
            f"NeMo Gym needs its configs (resources server, model, agent), e.g. {checks.key('config_paths')}="
            "[resources_servers/.../configs/x.yaml,responses_api_models/vllm_model/configs/vllm_model.yaml]",
        )
        checks.require(bool(self.agent_name), "agent_name",
                       "required; the agent of your config_paths that runs the rollouts")
        checks.require(bool(self.input_jsonl), "input_jsonl", "required; the tasks, as NeMo Gym JSONL")
        if self.input_jsonl:
            checks.require(
                (Path(self.cwd or ".") / self.input_jsonl).is_file(), "input_jsonl",
                f"no file {self.input_jsonl!r} (a relative path is read from {checks.key('cwd')}, {self.cwd})",
            )
        for name in ("limit", "num_samples_in_parallel"):
            checks.at_least(self, name, 1, or_null=True)
        checks.above(self, "startup_timeout_s", 0)
        owned_by = f"{checks.key('config_paths')}/agent_name/input_jsonl/limit/num_samples_in_parallel"
        for name in ("ng_run_args", "collect_args"):
            for arg in getattr(self, name):
                checks.require(arg.split("=", 1)[0].lstrip("+~") not in GYM_OWNED_OVERRIDES, name,
                               f"{arg!r} is written by the gym job itself (from the service's endpoints and "
                               f"{owned_by}); remove it")

    def check_programs(
        self, checks: Checks, outer_setup: Sequence[str] = (), outer_key: str = "", hint: str = ""
    ) -> None:
        if self.gym_bin is not None:
            for program in GYM_PROGRAMS:
                checks.require(
                    os.access(Path(self.gym_bin) / program, os.X_OK), "gym_bin",
                    f"no executable {program} in {self.gym_bin}; point it at the bin folder of the venv NeMo Gym is "
                    f"installed in, or null to find it on PATH (after {checks.key('setup')}){hint}",
                )
            return
        found: dict[str, programs.Found] = {}
        for program in GYM_PROGRAMS:
            found[program] = self.find_program(program, outer_setup)
            if found[program].problem:  # the setup lines failed or hang: no use running them again
                break
        missing = [program for program, where in found.items() if where.path is None]
        if not missing:
            return
        setup_key = self._setup_key(checks, outer_setup, outer_key)
        after = f" after {setup_key}" if setup_key else ""
        problem = found[missing[0]].problem
        reason = (f"cannot tell whether NeMo Gym is on PATH{after}: {problem}" if problem else
                  f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH{after} "
                  f"({checks.key('gym_bin')} is null, so NeMo Gym's programs are looked for there)")
        checks.fail("gym_bin", f"{reason}; install NeMo Gym in a venv (Python >= 3.12) and set "
                               f"{checks.key('gym_bin')}=/path/to/venv/bin, the folder holding ng_run{hint}")

    @property
    def output(self) -> Path:
        return Path(self.run_dir) / GYM_OUTPUT

    def path_first(self) -> str | None:
        """``gym_bin``, then the folder of the interpreter its venv was made from: ng_run builds a uv
        venv per Gym server for the exact Python version of Gym's venv, and uv (downloads off) accepts
        only a base interpreter, never the venv's own python3.12 ("No interpreter found for Python
        3.12.1 in managed installations or search path")."""
        if self.gym_bin is None:
            return None
        base = venv_base_dir(Path(self.gym_bin).expanduser())
        return os.pathsep.join([self.gym_bin, base] if base else [self.gym_bin])

    def program(self, name: str) -> str:
        return str(Path(self.gym_bin) / name) if self.gym_bin else name

    def install(self, outer_setup: Sequence[str] = ()) -> GymInstall | None:
        """The Gym this config runs: its ``ng_run`` found as the job finds it."""
        return gym_install(self.program("ng_run") if self.gym_bin else self.find_program("ng_run", outer_setup).path)

    def policy_models(self, install: GymInstall | None = None) -> dict[str, dict]:
        """Gym's ``vllm_model`` servers that talk to the service (``base_url: ${policy_base_url}``),
        as ``config_paths`` and ``ng_run_args`` set them: server instance -> its keys, merged in
        Gym's order (later files, then the overrides, win). A judge's vllm_model elsewhere is not
        one. A relative path is looked for as Gym (0.7) does: in ``cwd``, then in the install
        (``install``). A file that cannot be read here is skipped (ng_run says what is wrong with it)."""
        roots = [Path(self.cwd or "."), *([install.site] if install else [])]
        servers: dict[str, dict] = {}
        for path in self.config_paths:
            file = next((root / path for root in roots if (root / path).is_file()), None)
            try:
                loaded = yaml.safe_load(file.read_text()) if file else None
            except (OSError, yaml.YAMLError):
                continue
            for instance, server in (loaded or {}).items() if isinstance(loaded, dict) else ():
                model = server.get("responses_api_models", {}).get("vllm_model") if isinstance(server, dict) else None
                if isinstance(model, dict):
                    servers.setdefault(instance, {}).update(model)
        for arg in self.ng_run_args:
            key, _, value = arg.lstrip("+~").partition("=")
            instance, _, name = key.partition(GYM_VLLM_MODEL_KEY)
            if name and "." not in name and instance in servers:
                servers[instance][name] = yaml.safe_load(value) if value else None
        return {name: s for name, s in servers.items() if s.get("base_url") == GYM_POLICY_BASE_URL}

    def records_token_ids(self, install: GymInstall | None = None) -> bool:
        """Gym's training variant (``return_token_id_information: true``, as in
        vllm_model_for_training.yaml): it asks for token ids and logprobs as ``token_id:N`` and
        POSTs ``<root>/tokenize``, what the readiness gate then checks."""
        return any(s.get("return_token_id_information") is True for s in self.policy_models(install).values())

    def supplies_prefix(self, install: GymInstall | None = None) -> bool:
        """``supply_prefix_token_ids: true`` (Gym 0.6+, vllm_model_supply_prefix.yaml): Gym sends
        ``required_prefix_token_ids`` and fails a call whose ``prompt_token_ids`` do not begin with
        them; stock vLLM ignores that extension, our gateway implements it."""
        return any(s.get("supply_prefix_token_ids") is True for s in self.policy_models(install).values())

    def ng_run_argv(self, endpoints: Endpoints, install: GymInstall | None = None) -> list[str]:
        """``install``: the Gym that runs it (``gym_install``); keys its release lacks are not
        written, None: only those every supported release has."""
        urls = endpoints.current_base_urls()
        # One replica as a plain string: Gym's openai_model takes only a string, its vllm_model both.
        url = urls[0] if len(urls) == 1 else "[" + ",".join(urls) + "]"
        # Without a key Gym's model configs still interpolate ${policy_api_key}; OpenAI clients want a non-empty one.
        key = GYM_API_KEY_OVERRIDE if endpoints.api_key_file else "+policy_api_key=EMPTY"
        wait = ([f"++model_endpoint_readiness_timeout_seconds={GYM_ENDPOINT_WAIT_S}"]
                if _has(install, "model_endpoint_readiness_timeout_seconds") else [])
        return [
            self.program("ng_run"), f"+config_paths=[{','.join(self.config_paths)}]", f"+policy_base_url={url}",
            f"+policy_model_name={endpoints.model}", key, *wait, *self._through_gateway(endpoints, install),
            *self.ng_run_args,
        ]

    def _through_gateway(self, endpoints: Endpoints, install: GymInstall | None) -> list[str]:
        """Gym's vllm_model behind our gateway: it re-reads the gateway's URL from the endpoint file
        when a successor serves elsewhere (responses_api_models/vllm_model/app.py, endpoint_file),
        and names each rollout (its session id as ``conversation_params.conversation_id``, which
        the gateway keys sessions by), so a rollout's turns stay on one replica. Only for configs
        that define that model server (by its instance name): an override would create one."""
        if not endpoints.endpoint_file:
            return []
        writes = {"endpoint_file": endpoints.endpoint_file, "endpoint_connection_retries": GYM_ENDPOINT_RETRIES,
                  "forward_session_id_as_conversation_id": "true"}
        return [f"++{instance}{GYM_VLLM_MODEL_KEY}{k}={v}"
                for instance in self.policy_models(install) for k, v in writes.items() if _has(install, k)]

    def collect_argv(self) -> list[str]:
        argv = [
            self.program("ng_collect_rollouts"), f"+agent_name={self.agent_name}",
            f"+input_jsonl_fpath={self.input_jsonl}", f"+output_jsonl_fpath={self.output}",
        ]
        if self.limit is not None:
            argv.append(f"+limit={self.limit}")
        if self.num_samples_in_parallel is not None:
            argv.append(f"+num_samples_in_parallel={self.num_samples_in_parallel}")
        return argv + list(self.collect_args)


def gym_model_calls(row: dict) -> list[tuple[list[int], list[int]]]:
    """The model calls of one ``ng_collect_rollouts`` output row, in order: each call's
    ``(prompt_token_ids, generation_token_ids)``, as Gym's training model configs record them on the
    output items of ``row["response"]``. A call that produced several items (text and a tool call)
    may carry its ids on each of them: those count once."""
    calls: list[tuple[list[int], list[int]]] = []
    for item in (row.get("response") or {}).get("output") or []:
        if "prompt_token_ids" not in item:
            continue  # a tool result, or an item of a model without token ids
        call = ([int(t) for t in item["prompt_token_ids"]], [int(t) for t in item["generation_token_ids"]])
        if not calls or calls[-1] != call:
            calls.append(call)
    return calls


def gym_prefix_contiguity(output: Path) -> tuple[int, int]:
    """(contiguous, checked) over the consecutive model calls of each row of Gym's ``output``
    (``server.onpolicy.prefix_contiguity``); rows without ids are not checked, a torn line neither."""
    rollouts = []
    for line in output.read_text().splitlines():
        try:
            rollouts.append(gym_model_calls(json.loads(line)))
        except (ValueError, TypeError, KeyError):
            continue
    return prefix_contiguity(rollouts)


def venv_base_dir(bin_dir: Path) -> str | None:
    """The folder of the interpreter the venv holding ``bin_dir`` was made from (``home`` in its
    ``pyvenv.cfg``); None when ``bin_dir`` is not a venv's."""
    try:
        lines = (bin_dir.parent / "pyvenv.cfg").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            return value.strip()
    return None


@dataclass
class CommandResult:
    argv: list[list[str]]  # every program run, in order
    wall_s: float
    logs: list[str]
    output: str | None = None  # job=gym: the rollouts file
    gym_version: str | None = None  # job=gym: the NeMo Gym release that ran, when it could be told

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def command_argv(command: str | None, values: dict[str, str]) -> list[str]:
    """Split ``command`` as a shell would, then fill each word: a value with spaces stays one word."""
    argv = fill_command(command or "", values, "job.command", {"api_key": "the key is in $POLICY_API_KEY, never in argv"})
    if not argv:
        raise ValueError(
            "job.command: required; the program to run, e.g. "
            "'job.command=\"{python} eval.py --base-url {base_url} --model {model}\"'"
        )
    return argv


def placeholder_values(endpoints: Endpoints, run_dir: str) -> dict[str, str]:
    return {
        "base_urls": ",".join(urls := endpoints.current_base_urls()), "base_url": urls[0], "model": endpoints.model,
        "run_dir": run_dir, "python": sys.executable,
    }


# ---------------------------------------------------------------- the job


def run(cfg: CommandConfig | GymConfig) -> CommandResult:
    """The submitit job: run the program(s); raise ``CommandFailed`` unless they succeed."""
    if cfg.endpoints is None or not cfg.run_dir:
        raise ValueError("run() needs cfg.endpoints and cfg.run_dir (the launcher fills them in)")
    stop = _stop_on_signals()
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    runner = _Runner(cfg, stop)
    t0 = time.monotonic()
    install = None
    if isinstance(cfg, GymConfig):
        install = _gym(cfg, runner)
    else:
        argv = command_argv(cfg.command, placeholder_values(cfg.endpoints, cfg.run_dir))
        runner.check(runner.start("command", argv))
    return CommandResult(
        argv=[p.argv for p in runner.started], wall_s=time.monotonic() - t0, logs=[str(p.log) for p in runner.started],
        output=str(cfg.output) if isinstance(cfg, GymConfig) else None,
        gym_version=install.release if install else None,
    )


def _gym(cfg: GymConfig, runner: _Runner) -> GymInstall | None:
    install = cfg.install()
    if install is None:
        print("job=gym: cannot tell which NeMo Gym release ng_run is (no single nemo_gym-*.dist-info in "
              "<its bin folder>/../lib/python3*/site-packages): only the overrides every release knows are written "
              f"(not {', '.join(GYM_KEY_SINCE)})", file=sys.stderr, flush=True)
    elif cfg.supplies_prefix(install) and not _has(install, "supply_prefix_token_ids"):
        raise CommandFailed(
            f"supply_prefix_token_ids is set, but NeMo Gym {install.release} has no such key (it came with "
            f"{'.'.join(map(str, GYM_KEY_SINCE['supply_prefix_token_ids']))}) and would ignore it"
        )
    servers = runner.start("ng_run", cfg.ng_run_argv(cfg.endpoints, install), stop_signal=signal.SIGINT)
    try:
        runner.wait_for_line(servers, GYM_READY, cfg.startup_timeout_s)
        collect = runner.start("ng_collect_rollouts", cfg.collect_argv())
        runner.check(
            collect, hint="ng_collect_rollouts fails the whole collection when one model call fails; see its log "
                          "for which"
        )
    finally:
        runner.stop(servers)
    if not cfg.output.is_file():
        raise CommandFailed(f"ng_collect_rollouts succeeded but wrote no {cfg.output}; log {collect.log}")
    return install


class _Stop(threading.Event):
    signum: int | None = None


def _stop_on_signals() -> _Stop:
    """A cancel (SIGTERM; SIGINT by hand) or the time-limit warning (SIGUSR2) stops the programs in
    order rather than killing the job."""
    stop = _Stop()

    def handle(signum: int, frame: object) -> None:
        stop.signum = stop.signum or signum
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, handle)
    return stop


@dataclass
class _Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen
    stop_signal: int


class _Runner:
    """Starts the job's programs as children and stops them: on request, on a cancel, always."""

    def __init__(self, cfg: ProcessConfig, stop: _Stop) -> None:
        self.cfg, self.stop_requested = cfg, stop
        self.started: list[_Process] = []
        # Unbuffered: ng_run's readiness line and a crashing program's last words reach the log at once.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **cfg.env, **cfg.endpoints.environ()}
        if cfg.path_first():
            self.env["PATH"] = f"{cfg.path_first()}{os.pathsep}{self.env.get('PATH', '')}"

    def start(self, name: str, argv: list[str], stop_signal: int = signal.SIGTERM) -> _Process:
        log = self.cfg.log_dir / f"{name}.log"
        launch = argv
        if self.cfg.setup:
            # `exec "$@"`: the program replaces bash, so our signals reach it, and its argv needs no quoting.
            launch = ["bash", "-c", "set -e\n" + "\n".join(self.cfg.setup) + '\nexec "$@"', name, *argv]
        try:
            popen = process.start(
                launch, log, self.env, cwd=self.cfg.cwd or None, death_signal=stop_signal, header=shlex.join(argv)
            )
        except OSError as e:  # not found, not executable, cwd missing
            raise CommandFailed(f"{name}: cannot start {argv[0]!r}: {e}") from None
        started = _Process(name, argv, log, popen, stop_signal)
        self.started.append(started)
        return started

    def check(self, p: _Process, hint: str = "") -> None:
        """Wait for ``p``; raise unless it exited 0."""
        while p.popen.poll() is None:
            self._stop_if_requested()
            time.sleep(_POLL_S)
        if p.popen.returncode:
            raise CommandFailed(_exit_message(p, hint))

    def wait_for_line(self, p: _Process, pattern: re.Pattern, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not pattern.search(p.log.read_text(errors="replace")):
            self._stop_if_requested()
            if p.popen.poll() is not None:
                raise CommandFailed(_exit_message(p, "it ended before its servers were ready"))
            if time.monotonic() > deadline:
                raise CommandFailed(
                    f"{p.name}: not ready after {timeout_s:g}s (job.startup_timeout_s); "
                    f"log {p.log}:\n{process.log_tail(p.log)}"
                )
            time.sleep(_POLL_S)

    def stop(self, p: _Process) -> None:
        process.stop(p.popen, self.cfg.stop_grace_s, p.stop_signal)

    def _stop_if_requested(self) -> None:
        if self.stop_requested.is_set():
            for p in reversed(self.started):
                self.stop(p)
            if self.stop_requested.signum == signal.SIGUSR2:
                raise CommandStopped("stopped near the time limit (SIGUSR2)", signal.SIGUSR2)
            raise CommandFailed("stopped: the job was cancelled")


def _exit_message(p: _Process, hint: str) -> str:
    return (
        f"{p.name} {process.exit_description(p.popen.returncode)}" + (f" ({hint})" if hint else "")
        + f"; log {p.log}:\n{process.log_tail(p.log, lines=30)}"
    )

