"""The command line before Hydra runs: a config that cannot work is refused before anything exists.

Hydra creates the run folder (``.hydra/``, the log) before it calls the task function, so
``check_before_hydra`` composes the config itself first, with Hydra's own machinery and the
same arguments (config dir and name, ``--config-dir``, ``-m`` and ``hydra.mode``), and runs
``load_spec`` on it: on a multirun, on each point of the sweep (up to ``MAX_SWEEP_POINTS``
and ``SWEEP_CHECK_S``; points past that are checked when they start, as before). A refusal
raises ``Refused`` with the message to print. The commands that run nothing (``--help``,
``--cfg``, ``--info``, ...) are left to Hydra untouched.

Hydra's own refusals get the project's words: an unknown key gets "did you mean" over the
composed config's keys, an unknown option the group's options, a value starting with ``~``
(which Hydra's override grammar takes only inside quotes) is quoted by ``quote_tilde_values``
where that is unambiguous, and the error says how to write it where it is not.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra._internal.utils import (
    create_automatic_config_search_path,
    detect_calling_file_or_module_from_task_function,
    detect_task_name,
    get_args_parser,
)
from hydra._internal.hydra import Hydra
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from jobs.rollouts import ROLLOUTS_FILE
from launcher import resume
from launcher.orchestrate import GrowingLines, check_cluster
from launcher.spec import HOME_PATH_KEYS, RolloutsJob, RunSpec, SpecError, load_spec, unknown_key
from server.registry import Registry

MAX_SWEEP_POINTS = 100
SWEEP_CHECK_S = 15.0
MAX_REFUSED_POINTS = 10  # enough to see what is wrong
_BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
_NOT_A_RUN = ("help", "hydra_help", "cfg", "resolve", "shell_completion", "experimental_rerun")


class Refused(Exception):
    """The config cannot work: nothing was created or submitted. The message says why and names the key."""


# ---------------------------------------------------------------- ~ in override values

# key=~value, where the value has nothing Hydra's grammar gives a meaning (sweeps, lists, quotes,
# interpolations, escapes): quoting it changes nothing but the ~, which Hydra's lexer refuses bare.
_TILDE_VALUE = re.compile(r"^(\+{0,2})([A-Za-z_][\w.@/-]*)=(~[^\s,'\"\[\]{}()$\\]*)$")


def quote_tilde_values(argv: list[str]) -> list[str]:
    """``job.gym_bin=~/gym/.venv/bin`` -> ``job.gym_bin='~/gym/.venv/bin'``, for the keys the launcher
    expands ``~`` in (``spec.HOME_PATH_KEYS``); every other argument as it is (elsewhere a quoted ``~``
    would stay a literal ``~``, e.g. a folder named ``~``)."""
    quoted = []
    for arg in argv:
        m = _TILDE_VALUE.match(arg)
        quoted.append(f"{m[1]}{m[2]}='{m[3]}'" if m and m[2] in HOME_PATH_KEYS else arg)
    return quoted


def _tilde_hint(override: str) -> str:
    key, _, value = override.partition("=")
    if "~" not in value:
        return ""
    quoted = re.sub(r"(~[^,\[\]\s'\"]*)", r'"\1"', value)
    home = f"{key}={value.replace('~/', '$HOME/')}"
    if re.search(r"[\[\]*?{}]", value):
        home = f'"{home}"'  # the shell expands $HOME in double quotes, and globs nothing
    if key.lstrip("+") in HOME_PATH_KEYS:
        return (f"\nHydra takes ~ in a value only inside quotes: write '{key}={quoted}' (the outer quotes are for "
                f"the shell; gymlaunch expands ~ in {key.lstrip('+')}), or let the shell spell it: {home}")
    return (f"\nHydra takes ~ in a value only inside quotes, and {key.lstrip('+')} would keep it as written (a "
            f"folder named ~): let the shell spell your home instead: {home}")


# ---------------------------------------------------------------- the check


def check_before_hydra(argv: list[str], task_function: Callable, config_path: str, config_name: str) -> None:
    """Compose what ``@hydra.main(config_path, config_name)(task_function)`` would run with ``argv``
    and type it with ``load_spec``; ``Refused`` when it cannot work. Returns without looking when
    ``argv`` asks Hydra for something other than a run."""
    args = get_args_parser().parse_args(argv)  # its own usage errors exit here as they would in Hydra
    if any(getattr(args, flag, None) for flag in _NOT_A_RUN) or args.info is not None or (args.run and args.multirun):
        return
    config_name = args.config_name or config_name
    config_path = args.config_path or config_path
    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task_function)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_path)
    if args.config_dir is not None:
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            raise Refused(f"--config-dir: additional config directory {config_dir} not found")
        search_path.prepend(provider="command-line", path=f"file://{config_dir}",
                            anchor=SearchPathQuery(provider="schema"))
    try:
        hydra = Hydra.create_main_hydra2(task_name=detect_task_name(calling_file, calling_module),
                                         config_search_path=search_path)
        overrides = list(args.overrides)
        mode = hydra.get_mode(config_name=config_name, overrides=overrides)
        if mode is None:
            mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
        elif args.multirun:
            mode = RunMode.MULTIRUN
        try:
            if mode == RunMode.RUN:
                cfg = _compose(hydra, config_name, overrides, RunMode.RUN)
                _check_resume(cfg)
                _check(cfg, "hydra.run.dir", None)
            else:
                _check_sweep(hydra, config_name, overrides)
        except (HydraException, OmegaConfBaseException) as e:
            raise Refused(_hydra_message(e)) from None
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None


def _check(cfg: DictConfig, dir_key: str, subdir_key: str | None) -> None:
    """``load_spec`` on ``cfg`` with Hydra's runtime values filled in as ``run_job`` fills them (a config
    may interpolate ``${hydra:runtime.output_dir}``); nothing is created."""
    HydraConfig.instance().set_config(cfg)
    output_dir = str(OmegaConf.select(cfg, dir_key))
    if subdir_key is not None:
        output_dir = os.path.join(output_dir, str(OmegaConf.select(cfg, subdir_key)))
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(output_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        spec = load_spec(cfg)
        # Before the cluster check: a finished run has nothing to ask of a cluster, which may have changed.
        _check_unfinished(spec)
        check_cluster(spec)
    except SpecError as e:  # ClusterRefused too: what the cluster can never run
        raise Refused(str(e)) from None


def _check_unfinished(spec: RunSpec) -> None:
    """``resume.Finished`` when the run to resume has every row written (nothing to submit)."""
    if spec.run.resume is not None and isinstance(spec.job, RolloutsJob):
        folder = Path(spec.run.resume)
        resume.check_unfinished(folder, GrowingLines(folder / ROLLOUTS_FILE)(), spec.job.num_rollouts)


def _check_resume(cfg: DictConfig) -> None:
    """A resume (``launcher.resume``) runs in the folder it resumes, and collects what that run did."""
    folder = OmegaConf.select(cfg, resume.KEY)
    if folder is None:
        return
    if os.path.abspath(str(cfg.hydra.run.dir)) != str(folder):
        raise Refused(f"{resume.KEY}: give it on the command line (python -m launcher {resume.KEY}=<run folder>), "
                      "where it brings the saved config and folder; a config file cannot")
    try:
        resume.check_unchanged(cfg)  # first: a changed key's own refusal would hide that it may not change
        resume.check_interrupted(Path(folder), Registry(**OmegaConf.to_container(cfg.registry, resolve=True)))
    except resume.ResumeRefused as e:
        raise Refused(str(e)) from None


def _check_sweep(hydra: Any, config_name: str, overrides: list[str]) -> None:
    """Each point of a multirun, as Hydra's basic sweeper will make it (other sweepers choose their
    points as they go: their points are checked when they start)."""
    master = _compose(hydra, config_name, overrides, RunMode.MULTIRUN)
    if master.hydra.sweeper.get("_target_") != _BASIC_SWEEPER:
        return
    params = master.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(master.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(arguments)
    points = [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]
    refusals: dict[str, list[tuple[int, str]]] = {}
    deadline = time.monotonic() + SWEEP_CHECK_S
    for num, point in enumerate(points[:MAX_SWEEP_POINTS]):
        if time.monotonic() > deadline or sum(map(len, refusals.values())) >= MAX_REFUSED_POINTS:
            break
        try:
            cfg = hydra.config_loader.load_sweep_config(master, list(point))
        except MissingConfigException as e:  # a swept group option that does not exist
            raise Refused(_missing_option(e, list(point))) from None
        except ConfigCompositionException as e:  # a swept key the config does not have
            unknown = _COULD_NOT_OVERRIDE.search(str(e))
            raise Refused(_unknown_override(master, unknown[1]) if unknown else _hydra_message(e)) from None
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = num
        try:
            _check(cfg, "hydra.sweep.dir", "hydra.sweep.subdir")
        except Refused as e:
            swept = " ".join(o for o in point if o not in master.hydra.overrides.task) or " ".join(point)
            refusals.setdefault(str(e), []).append((num, swept))
    if refusals:
        raise Refused("\n".join(f"{_points(where, len(points))}: {message}" for message, where in refusals.items()))


def _points(where: list[tuple[int, str]], total: int) -> str:
    if len(where) == 1:
        (num, swept), = where
        return f"sweep point #{num} of {total} ({swept})"
    shown = ", ".join(f"#{num} ({swept})" for num, swept in where[:3])
    return f"sweep points {shown}{f' and {len(where) - 3} more' if len(where) > 3 else ''}, of {total}"


# ---------------------------------------------------------------- Hydra's errors in the project's words

_COULD_NOT_OVERRIDE = re.compile(r"Could not override '([^']+)'")


def _compose(hydra: Any, config_name: str, overrides: list[str], mode: RunMode) -> DictConfig:
    """Hydra's composition; every override of a key the config does not have is reported at once,
    each with "did you mean" over the keys of the config composed without them."""
    unknown: list[str] = []
    remaining = list(overrides)
    while True:
        try:
            cfg = _hydra_compose(hydra, config_name, remaining, mode)
            break
        except MissingConfigException as e:
            raise Refused(_missing_option(e, overrides)) from None
        except ConfigCompositionException as e:
            match = _COULD_NOT_OVERRIDE.search(str(e))
            if not match or len(unknown) >= len(overrides):
                if unknown:  # what cannot be composed without them: say both
                    raise Refused("\n".join([*map(_bare_unknown, unknown), _hydra_message(e)])) from None
                raise
            unknown.append(match[1])
            remaining = [o for o in remaining if _override_key(o) != match[1]]
    if unknown:
        raise Refused("\n".join(_unknown_override(cfg, key) for key in unknown))
    return cfg


def _hydra_compose(hydra: Any, config_name: str, overrides: list[str], mode: RunMode) -> DictConfig:
    try:
        return hydra.compose_config(config_name=config_name, overrides=overrides, run_mode=mode)
    except (HydraException, OmegaConfBaseException):
        raise
    except Exception as e:  # what Hydra reports as a one-line error too (e.g. OmegaConf tripping on an override)
        raise Refused(_hydra_message(e)) from None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _bare_unknown(key: str) -> str:
    return f"{key}: no such key"


def _unknown_override(cfg: DictConfig, key: str) -> str:
    """``key`` is not in ``cfg``: the first part of it that is not, with the close keys of its section."""
    parts = key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        section = ".".join(parts[:i])
        if not isinstance(node, DictConfig):
            return f"{key}: {section} is a value, not a section (set {section}=...)"
        if part not in node:
            options = [str(k) for k in node.keys()]
            return unknown_key(section, part, options, rest=".".join(parts[i + 1:]))
        node = node._get_node(part)
    return f"{key}: cannot be overridden"


def _missing_option(e: MissingConfigException, overrides: list[str]) -> str:
    """``server=vlm``: the group's options, the close ones first, spelled as the override was."""
    if e.options is None or not e.missing_cfg_file:
        return _hydra_message(e)
    group, _, option = e.missing_cfg_file.rpartition("/")
    written = [o.split("=", 1)[0] for o in overrides if _override_key(o).split("@")[0] == group]
    key = written[0] if written else group
    close = difflib.get_close_matches(option, e.options, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(f'{key}={c}' for c in close)}? " if close else ""
    return f"{key}={option}: no option {option!r} in group {group}; {hint}options: {', '.join(e.options)}"


def _hydra_message(e: Exception) -> str:
    if isinstance(e, Refused):
        return str(e)
    if isinstance(e, MissingConfigException) and e.options is not None:
        return _missing_option(e, [])
    if isinstance(e, OverrideParseException):
        return f"{e.message.strip()}{_tilde_hint(e.override)}"
    if isinstance(e, SearchPathException):
        return str(e)
    text = str(e).strip()
    # Hydra's messages end with where it searched: noise for a refusal.
    return text.split("\nConfig search path:")[0]
