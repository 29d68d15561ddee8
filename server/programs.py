"""Is a program there? Found the way the job that starts it will find it, before anything is submitted.

A word with a ``/`` is a path (relative ones from the program's working folder). A bare name is
looked for on ``PATH``: the job's environment's, after its setup lines when it has any. Those run
here as the job runs them (``bash -c``, in the program's folder, with its environment, bounded by
``SETUP_TIMEOUT_S``), followed by ``type -P NAME``: the executable ``exec`` would start.

What the setup lines found is remembered for the process: the launcher checks a config twice (before
Hydra runs, then in the run itself), and setup lines can be slow (``module load``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

SETUP_TIMEOUT_S = 20.0
_SETUP_DONE = "__gymlaunch_setup_done__"


@dataclass(frozen=True)
class Found:
    """Where a program is (``path``), or why it is not found (``path`` None, ``problem`` set when
    the lookup itself could not be made: the setup lines failed or took too long)."""

    path: str | None
    problem: str | None = None


def find(
    program: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None, setup: Sequence[str] = (),
    shell_setup: Sequence[str] = (), path_first: str | None = None, timeout_s: float | None = None,
) -> Found:
    """Look ``program`` up as a job would start it.

    ``env`` is added to this process's environment; ``path_first`` goes first on ``PATH``;
    ``shell_setup`` are lines the job's shell runs first (a cluster's, without ``set -e``),
    ``setup`` the program's own (with ``set -e``); they run for at most ``timeout_s``
    (default ``SETUP_TIMEOUT_S``).
    """
    full = {**os.environ, **(env or {})}
    if path_first:
        full["PATH"] = f"{path_first}{os.pathsep}{full.get('PATH', '')}"
    cwd = cwd or os.getcwd()
    if "/" in program:
        path = Path(cwd) / Path(program).expanduser()
        return Found(str(path) if path.is_file() and os.access(path, os.X_OK) else None)
    if not setup and not shell_setup:
        return Found(shutil.which(program, path=full.get("PATH", "")))
    return _after_setup(program, tuple(sorted(full.items())), cwd, tuple(setup), tuple(shell_setup),
                        SETUP_TIMEOUT_S if timeout_s is None else timeout_s)


@functools.lru_cache(maxsize=64)
def _after_setup(program: str, env_items: tuple, cwd: str, setup: tuple, shell_setup: tuple,
                 timeout_s: float) -> Found:
    env = dict(env_items)
    script = "\n".join([*shell_setup, "set -e", *setup, "set +e", f"echo {_SETUP_DONE}", 'type -P -- "$1"'])
    try:
        # Its own process group: a setup line still running at the timeout goes with it.
        bash = subprocess.Popen(
            ["bash", "-c", script, "gymlaunch-check", program], env=env, cwd=cwd if Path(cwd).is_dir() else None,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
    except OSError as e:  # no bash
        return Found(None, f"cannot run bash to look for it: {e}")
    try:
        stdout, stderr = bash.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bash.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bash.communicate(timeout=2)
        return Found(None, f"the setup lines did not finish within {timeout_s:g}s here")
    _, marker, after = stdout.partition(_SETUP_DONE)
    if not marker:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return Found(None, f"the setup lines failed here (exit {bash.returncode}: {last})")
    return Found(after.strip().splitlines()[-1] if after.strip() else None)


def why_not(program: str, found: Found, *, cwd: str | None, cwd_key: str, setup_key: str | None) -> str:
    """Why ``program`` cannot be started (``found.path`` is None), naming the keys that decide it:
    ``cwd_key`` (where a relative path is read from), ``setup_key`` (lines run before it, if any)."""
    if "/" in program:
        path = Path(cwd or os.getcwd()) / Path(program).expanduser()
        where = "" if Path(program).expanduser().is_absolute() else f" (relative to {cwd_key}, {cwd or os.getcwd()})"
        if path.is_file():
            return f"{path}{where} is not executable"
        return f"no file {path}{where}"
    after = f" after {setup_key}" if setup_key else ""
    if found.problem:
        return f"cannot tell whether {program} is on PATH{after}: {found.problem}"
    return f"{program} is not on PATH{after}"
