"""Resuming a failed or interrupted run in its own folder: ``python -m launcher run.resume=<run folder>``.

Three parts, in the order a resume meets them:

1. The command line (``resume_argv``, before Hydra): the run folder's saved overrides
   (``.hydra/overrides.yaml``, its Hydra overrides and config name from ``.hydra/hydra.yaml``),
   then the resume command's own overrides on top, then ``hydra.run.dir=<run folder>``: the same
   config in the same folder. ``--resume <run folder>`` is the same thing spelled as a flag.
2. The check (``check_unchanged``, on the composed config, before Hydra): an override may change
   how the run is served and submitted (replicas, time limits, concurrency, the cluster), never
   what was collected (``COLLECTED``): the rows already written were made with the saved values.
3. The take-over (``Run`` in launcher/orchestrate.py with ``run.resume`` set): the interrupted
   run's job that writes into the folder (the collector or the program; a SIGKILLed launcher never
   cancelled it) is stopped first (``stop_jobs``), through the backend of the cluster kind that
   submitted it; its servers are joined when every replica is still alive (``live_servers``), else
   what is left of its namespace is removed and new servers start.

Each run records its run id, registry namespace and job ids in ``<run folder>/.run.json``
(``RECORD_FILE``, this module's alone), so that a resume knows them after a SIGKILL.

A run whose rows are all written has nothing to resume: ``check_unfinished`` (before Hydra, in
launcher/cli.py) ends the command with exit 0, nothing submitted and ``summary.json`` untouched.

Every attempt of a run (the first, each resume) is listed in ``summary.json`` (``attempts``): a
resume keeps the summary the attempt before it wrote as ``summary.attempt-<N>.json`` and carries
its list on, so that ``summary.json`` describes the whole run (``totals``: across attempts) and no
attempt's figures are lost to the next one's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from launcher.executors import backend_class
from server.registry import Registry

RECORD_FILE = ".run.json"
KEY = "run.resume"
# What a resumed run must collect exactly as the interrupted one did (dotted prefixes of the config):
# the rows it wrote stay, so the rest must come from the same tasks, model, prompts and sampling.
COLLECTED = (
    "job", "model", "policy", "server.engine", "server.served_name", "server.dtype", "server.max_model_len",
    "server.chat_template", "server.tool_call_parser", "server.tool_strict_level", "server.enable_auto_tool_choice",
)
# The keys under COLLECTED that say how the job is submitted or paced, not what it does: free to change.
HOW_NOT_WHAT = tuple(f"job.{k}" for k in (
    "timeout_min", "partition", "cpus_per_task", "mem_gb", "max_concurrency", "request_timeout_s", "stop_grace_s",
))
# Hydra overrides that place the run: a resume runs in the saved folder, as one run.
_PLACEMENT = ("hydra.run.dir", "hydra.mode", "hydra.sweep.", "hydra.job.num", "hydra.job.id")
_ALIAS = "--resume"
_BARE_VALUE = re.compile(r"^[\w./@:+-]+$")


class ResumeRefused(ValueError):
    """The resume cannot work; the message names ``run.resume`` or the override at fault."""


class Finished(Exception):
    """The run to resume has every row written: nothing to do, nothing submitted (exit 0)."""


# ---------------------------------------------------------------- the command line


def command(run_dir: Path) -> str:
    """The one command that resumes the run in ``run_dir``, quoted for a POSIX shell."""
    return f"python -m launcher {shlex.quote(f'{KEY}={Path(run_dir).resolve()}')}"


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--resume X`` / ``run.resume=X`` unfolded into the saved run's overrides (``argv``
    as it is when it resumes nothing). ``ResumeRefused`` when the folder holds no saved run."""
    argv = _unalias(argv)
    given = [a for a in argv if a.startswith(f"{KEY}=")]
    if not given:
        return argv
    if len(given) > 1:
        raise ResumeRefused(f"{KEY}: given {len(given)} times; resume one run folder")
    if {"-m", "--multirun"} & set(argv):
        raise ResumeRefused(f"{KEY}: resumes one run folder (a sweep's point folder too), not a multirun: drop -m")
    placed = [a for a in argv if _key(a).startswith(_PLACEMENT)]
    if placed:
        raise ResumeRefused(f"{KEY}: runs in the folder it resumes; drop {' '.join(placed)}")
    folder = saved_folder(given[0].split("=", 1)[1])
    hydra_cfg = OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra
    extra = [a for a in argv if a != given[0]]
    extra_keys = {_key(a) for a in extra if not a.startswith("-")}
    saved = [o for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")
             if _key(o) != KEY and _key(o) not in extra_keys]
    hydra_saved = [o for o in hydra_cfg.overrides.hydra
                   if not _key(o).startswith(_PLACEMENT) and _key(o) not in extra_keys]
    flags = []
    if "--config-name" not in extra and "-cn" not in extra:
        flags += ["--config-name", str(hydra_cfg.job.config_name)]
    for source in hydra_cfg.runtime.config_sources:  # a --config-dir of the interrupted run
        if source.provider == "command-line" and "--config-dir" not in extra and "-cd" not in extra:
            flags += ["--config-dir", str(source.path)]
    return [*flags, *saved, *hydra_saved, *extra, f"hydra.run.dir={_hydra_value(folder)}",
            f"{KEY}={_hydra_value(folder)}"]


def saved_folder(value: str) -> Path:
    """The run folder ``value`` names, which must hold the config Hydra saved for the run."""
    folder = Path(value).expanduser().resolve()
    if not folder.is_dir():
        raise ResumeRefused(f"{KEY}: no folder {folder}")
    missing = [name for name in ("config.yaml", "overrides.yaml", "hydra.yaml") if not (folder / ".hydra" / name).is_file()]
    if missing:
        raise ResumeRefused(f"{KEY}: {folder} has no saved config (.hydra/{', .hydra/'.join(missing)} missing): "
                            "not the folder of a python -m launcher run")
    return folder


def check_unchanged(cfg: DictConfig) -> None:
    """``ResumeRefused`` naming each key of ``COLLECTED`` whose value differs from the saved config's."""
    folder = Path(str(cfg.run.resume))
    saved = _flat(OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"), resolve=False))
    now = _flat(OmegaConf.to_container(cfg, resolve=False))
    changed = sorted(
        key for key in set(saved) | set(now)
        if key.startswith(COLLECTED) and not key.startswith(HOW_NOT_WHAT) and saved.get(key) != now.get(key)
    )
    if changed:
        lines = [f"  {key}: {saved.get(key, '(unset)')!r} in the saved config, now {now.get(key, '(unset)')!r}"
                 for key in changed]
        raise ResumeRefused(
            f"{KEY}: would change what {folder} collected; its rows were made with the saved values:\n"
            + "\n".join(lines) + "\nresume with them as saved (drop those overrides), or start a new run")


def _unalias(argv: list[str]) -> list[str]:
    out, args = [], iter(argv)
    for arg in args:
        if arg == _ALIAS:
            value = next(args, None)
            if value is None:
                raise ResumeRefused(f"{_ALIAS}: give the run folder to resume")
            out.append(f"{KEY}={value}")
        elif arg.startswith(f"{_ALIAS}="):
            out.append(f"{KEY}={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _hydra_value(path: Path) -> str:
    """``path`` as a value Hydra's override grammar reads back unchanged."""
    text = str(path)
    if _BARE_VALUE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        flat: dict[str, object] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


# ---------------------------------------------------------------- the run folder's record


@dataclass
class RunRecord:
    """What a resume must know of a run that may have died without a word."""

    run_id: str  # its owner heartbeat's name in the namespace
    namespace: str
    cluster: str  # the cluster kind that knows ``job_ids``
    job_ids: list[str]  # the job that writes into the run folder (collector or program), once submitted
    host: str = ""  # where its launcher runs, and as which process
    pid: int = 0
    rollouts_total: int | None = None  # job=rollouts: the rows it is to write (python -m launcher.status)


def this_launcher() -> dict:
    """``host`` and ``pid`` of a ``RunRecord`` written by this process."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def write_record(run_dir: Path, record: RunRecord) -> None:
    path = Path(run_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{RECORD_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record)) + "\n")
    os.replace(tmp, path)  # a reader sees the old record or the new one


def read_record(run_dir: Path) -> RunRecord | None:
    try:
        return RunRecord(**json.loads((Path(run_dir) / RECORD_FILE).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def check_interrupted(folder: Path, registry: Registry) -> None:
    """``ResumeRefused`` when the run in ``folder`` may still be going: its launcher's process is alive
    on this host, or (launched elsewhere) it heartbeated as its servers' owner within 3 heartbeats."""
    record = read_record(folder)
    if record is None:
        return
    stop = f"stop it first (Ctrl-C there, or python -m launcher.down {record.namespace})"
    if record.host == socket.gethostname():
        if _is_launcher(record.pid):
            raise ResumeRefused(f"{KEY}: the run in {folder} is still going (its launcher is pid {record.pid}); {stop}")
        return
    age = registry.owner_age(record.namespace, record.run_id)
    if age is not None and age < 3 * registry.heartbeat_s:
        raise ResumeRefused(f"{KEY}: the run in {folder} may still be going: its launcher on {record.host} "
                            f"heartbeated {age:.0f}s ago; {stop}, or wait {3 * registry.heartbeat_s:g}s")


def _is_launcher(pid: int) -> bool:
    """``pid`` runs ``python -m launcher`` or ``gymlaunch`` (not a zombie, not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"launcher" in argv or any(arg.endswith(b"gymlaunch") for arg in argv)


# ---------------------------------------------------------------- the take-over


def stop_jobs(kind: str, job_ids: Sequence[str], folder: Path, grace_s: float, say: Callable[[str], None],
              what: str) -> None:
    """Stop the jobs of ``job_ids`` submitted from ``folder`` (a submitit folder) still alive, through the
    backend of ``kind``, and wait until they ended: cancelled, then killed after ``grace_s`` (+15 s, as
    a teardown)."""
    backend = backend_class(kind)
    alive = backend.alive_ids(backend.submitted_from(job_ids, folder))
    if not alive:
        return
    say(f"stopping the interrupted run's {what} (jobs {', '.join(alive)}), still running")
    backend.cancel_ids(alive)
    deadline = time.monotonic() + grace_s + 15
    while (alive := backend.alive_ids(alive)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive:
        say(f"jobs {', '.join(alive)} did not stop in time; killing them")
        backend.cancel_ids(alive, force=True)


def live_servers(registry: Registry, record: RunRecord, kind: str, server_hash: str, service: str,
                 replicas: int) -> list[str] | None:
    """The job ids, by replica, of the interrupted run's servers when every replica is alive, serves
    this run's server configuration on this cluster kind, and was that run's alone (not a sweep's pool
    that other points use) and not yet stopping as an orphan; else None."""
    jobs = registry.recorded_jobs(record.namespace)
    if jobs is None or jobs.kind != kind or record.cluster != kind or jobs.server_hash != server_hash:
        return None
    # No owner left: they are stopping themselves. Another owner: not the interrupted run's to hand over.
    if registry.live_owners(record.namespace) != [record.run_id]:
        return None
    by_replica = {e.replica: e.job_id for e in registry.entries(record.namespace, service)}
    ids = [by_replica.get(i) for i in range(replicas)]
    if None in ids or set(by_replica) != set(range(replicas)):
        return None
    return ids if len(backend_class(kind).alive_ids(ids)) == replicas else None


def clear_namespace(registry: Registry, record: RunRecord, folder: Path, stop_grace_s: float,
                    say: Callable[[str], None]) -> None:
    """What is left of the interrupted run's namespace: its server jobs (submitted from ``folder``)
    stopped, the namespace removed; left alone while other runs (a sweep's points) use it."""
    ns = record.namespace
    if not (registry.root / ns).is_dir() and registry.recorded_jobs(ns) is None:
        return
    others = [o for o in registry.live_owners(ns) if o != record.run_id]
    if others:
        say(f"servers of {ns} stay up for runs {others}")
        return
    jobs = registry.recorded_jobs(ns)
    if jobs is not None:
        stop_jobs(jobs.kind, jobs.all_job_ids, folder, stop_grace_s, say, "servers and gateway")
    registry.remove_namespace(ns)


# ---------------------------------------------------------------- a finished run, the attempts of a run


def check_unfinished(folder: Path, written: int, total: int) -> None:
    """``Finished`` when ``written`` (rows in the folder's rollouts file) reaches the run's ``total``."""
    if written >= total:
        raise Finished(f"{folder} is finished: {written}/{total} rollouts written; nothing to resume, nothing "
                       f"submitted (its summary: {folder / SUMMARY_FILE})")


SUMMARY_FILE = "summary.json"
# What an attempt's entry in ``attempts`` adds up over the run (``totals``).
_SUMMED = ("rollouts_written_this_attempt", "generated_tokens", "collect_wall_s", "prefix_contiguous",
           "prefix_checked")


def attempt_of(summary: dict) -> dict:
    """One attempt's entry in ``attempts``, from the summary it wrote (one written before attempts were
    listed too: what it lacks is None)."""
    collection = summary.get("collection") or {}
    return {
        "run_id": summary.get("run_id"), "status": summary.get("status"),
        "started": summary.get("started"), "ended": summary.get("ended"),
        "rollouts_written_this_attempt": summary.get("rollouts_written_this_attempt",
                                                     collection.get("rollouts_written_this_run")),
        "failures": collection.get("failures"), "generated_tokens": collection.get("generated_tokens"),
        "collect_wall_s": collection.get("wall_s"), "prefix_contiguous": collection.get("prefix_contiguous"),
        "prefix_checked": collection.get("prefix_checked"), "summary_path": summary.get("summary_path"),
    }


def earlier_attempts(run_dir: Path, resumed_run_id: str | None) -> list[dict]:
    """The attempts before a resume, oldest first: those the folder's ``summary.json`` lists (kept as
    ``summary.attempt-<N>.json``, which the last one's entry then names), and the attempt this one
    resumes when it wrote no summary (its launcher was killed)."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        previous = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        previous = None
    earlier = (previous.get("attempts") or [attempt_of(previous)]) if previous else []
    if earlier:
        kept = path.with_name(f"summary.attempt-{len(earlier)}.json")
        if not kept.exists():
            shutil.copyfile(path, kept)
        earlier[-1]["summary_path"] = str(kept)
    if resumed_run_id is not None and resumed_run_id not in {a["run_id"] for a in earlier}:
        earlier.append({**dict.fromkeys(attempt_of({})), "run_id": resumed_run_id,
                        "status": "ended without a summary (its launcher was killed)"})
    return earlier


def totals(attempts: list[dict]) -> dict:
    """The figures of the run as a whole: each summed over the attempts that know it."""
    summed = {key: sum(a[key] for a in attempts if a.get(key) is not None) for key in _SUMMED}
    wall_s = summed["collect_wall_s"]
    return {"attempts": len(attempts), **summed, "collect_wall_s": round(wall_s, 3),
            "generated_tokens_per_s": round(summed["generated_tokens"] / wall_s, 2) if wall_s > 0 else None}
