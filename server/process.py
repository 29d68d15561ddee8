"""Child processes of a job: the one place that starts, signals and stops them.

A job's programs (an engine, NeMo Gym's servers, a user's command) run as
children of the job, never detached: the cluster's process tracking and our
signals must reach them. Each starts in its own process group, so stopping it
reaches the workers it forks, and with a parent-death signal, so the kernel
stops it if the job dies without cleaning up: no orphaned GPU process.

Imports nothing from launcher/.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TAIL_BYTES = 64 * 1024
_MAX_OPEN_FILES = 1 << 20


def start(
    argv: list[str], log_path: Path, env: Mapping[str, str], *, cwd: str | None = None,
    death_signal: int = signal.SIGTERM, header: str | None = None,
) -> subprocess.Popen:
    """Start ``argv`` as a child in its own process group, its output appended to ``log_path``.

    ``header`` (default: the argv) is written to the log first; pass a masked command line when
    the argv holds a secret. Raises ``OSError`` when the program cannot be started.
    """
    with open(log_path, "ab") as f:  # the child keeps its own descriptor
        f.write(f"\n### {time.strftime('%F %T')} starting: {header or ' '.join(argv)}\n".encode())
        f.flush()
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd,
            preexec_fn=lambda: _child_setup(death_signal),
        )


def _child_setup(death_signal: int) -> None:
    # Own process group: a terminal's Ctrl-C reaches the job, which then stops the program in
    # order, and killpg reaches the program's workers. The kernel sends ``death_signal`` if the job
    # dies first. SIGINT back to default: local jobs are started with it ignored
    # (launcher/executors.py), and some programs (ng_run) shut down only on SIGINT.
    os.setpgid(0, 0)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, death_signal)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    # The time-limit warning (SIGUSR2) is the job's to act on (a server drains, then stops its engine;
    # a command job stops its programs), but Slurm sends it to every process of the job: its default
    # action would kill the child at once, failing the requests in flight. Ignored stays ignored
    # across exec.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def signal_group(pid: int, sig: int) -> None:
    """``sig`` to the process group led by ``pid``; nothing if it is gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, grace_s: float, stop_signal: int = signal.SIGTERM) -> None:
    """``stop_signal`` to the child's group, SIGKILL to what is left after ``grace_s``; reaps it."""
    if proc.poll() is None:
        signal_group(proc.pid, stop_signal)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored %s for %.0fs; killing it", proc.pid, signal.Signals(stop_signal).name, grace_s)
    # The child's own workers share its group: reap stragglers too.
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_marked(key: str, value: str) -> list[int]:
    """SIGKILL to every process of this user whose environment holds ``key=value``, and their pids:
    what a program's own daemons leave behind after its group is stopped (Ray's workers run in
    process groups of their own, and rename their command line, but keep the environment)."""
    marker = f"{key}={value}".encode()
    killed = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if pid == os.getpid() or marker not in environ.read_bytes().split(b"\0"):
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (OSError, ValueError):  # gone, or another user's
            continue
    if killed:
        log.warning("killed %d leftover process(es) marked %s: %s", len(killed), marker.decode(), killed)
    return killed


def kill_when_alive(pid: int, group: bool, wait_s: float = 10.0) -> None:
    """Last resort for a process (or group) another job should have stopped: wait, then SIGKILL."""
    kill = os.killpg if group else os.kill
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not alive(pid, group):
            return
        time.sleep(0.2)
    try:
        kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int, group: bool = False) -> bool:
    """Whether the process (or a process of the group) ``pid`` still runs. A zombie does not: it has
    exited and waits for its parent, often init, to reap it (the engine's workers, orphaned when the
    engine exits; some inits reap only every second or so), and no signal changes that."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        stats = Path("/proc").glob("[0-9]*/stat") if group else [Path(f"/proc/{pid}/stat")]
        for stat in stats:
            try:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if state != "Z" and (not group or pgrp == str(pid)):
                return True
        return False
    except OSError:  # no /proc: what kill(0) said
        return True


def exit_description(returncode: int) -> str:
    """``exited with code 1`` or ``killed by signal 9 (SIGKILL)``: what a report says of an exit."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log (reading at most its last 64 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            text = f.read().decode(errors="replace").strip()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) if text else f"(empty log {path})"


def open_files_limit() -> int:
    """The soft ``RLIMIT_NOFILE``: descriptors this process may hold."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one, at most 2^20 (a process may; clusters often
    leave the soft at 1,024 while allowing far more), so that a server's connections do not run out
    of descriptors at a thousand clients. Children inherit it. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # At most 2^20 (the kernel's default fs.nr_open): some programs loop over every possible
    # descriptor (closing them before an exec), and containers may allow a billion. (Never
    # RLIM_INFINITY: Linux refuses open-file limits above fs.nr_open.)
    target = min(hard, _MAX_OPEN_FILES)
    if soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("open-file limit stays %d (hard %d): %s", soft, hard, e)
        return soft
    log.info("open-file limit raised from %d to %d", soft, target)
    return target
