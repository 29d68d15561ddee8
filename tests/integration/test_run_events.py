"""What a run tells while it runs, through the whole launcher on this machine (local cluster, the
stand-in engine: what is proven is the launcher's, not vLLM's): the state changes as timestamped
lines when no terminal shows the live view, their record in events.jsonl, ``launcher.status`` on a
running run, the gateway's 503 while a replica starts, and commands printed on one line at any width."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import httpx

from server.registry import Registry
from tests.support import ROOT, STANDIN_SERVER, launcher_env, run_launcher, start_launcher

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
SLOW_STANDIN = ('server.command="{python} -m server.standin --host {host} --port {port} --model {served_name} '
                '--seconds-per-token 0.05"')
PHASES = ["servers start", "servers ready", "gateway ready", "rollouts", "teardown", "end"]


def events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    for e in parsed:  # the shared format (report.html reads it), exactly
        assert set(e) == {"at", "who", "job_id", "state", "detail"} and isinstance(e["at"], float), e
    return parsed


def test_a_piped_run_prints_each_state_change_as_a_timestamped_line_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    out = run_launcher(tmp_path / "registry", *STANDIN_SERVER, f"hydra.run.dir={run_dir}", "server.replicas=2")
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    replicas = {s["replica"]: s["job_id"] for s in summary["servers"]}
    gateway, job = summary["gateway"]["job_id"], json.loads((run_dir / ".run.json").read_text())
    lines = out.stdout.splitlines()

    def line(text: str) -> int:
        found = [i for i, x in enumerate(lines) if re.fullmatch(STAMP + re.escape(text), x)]
        assert found, f"no timestamped line {text!r} in:\n{out.stdout}"
        return found[0]

    # Each job through its states, in order, each change once.
    for replica, job_id in replicas.items():
        assert line(f"replica {replica} (job {job_id}): SUBMITTED") < line(f"replica {replica} (job {job_id}): ready")
    assert line(f"gateway (job {gateway}): SUBMITTED") < line(f"gateway (job {gateway}): ready")
    rollouts = [i for i, x in enumerate(lines) if re.fullmatch(STAMP + r"job \(job \d+\): COMPLETED", x)]
    assert len(rollouts) == 1, out.stdout
    assert line("rollouts: 24/24 written, 0 failed") < rollouts[0]
    # Teardown names what it waits for, and for how long.
    ids = ", ".join([*replicas.values(), gateway])
    stop = line(f"stopping server jobs and gateway {ids}: waiting up to 30s for them to end (stop grace 15s + "
                "15s), then killing what is left")
    assert line("run: teardown") < stop < line("run: end (succeeded)")
    assert any(re.fullmatch(STAMP + re.escape(f"server jobs and gateway {ids} ended after ") + r"[\d.]+s", x)
               for x in lines[stop:]), out.stdout

    recorded = events(run_dir)
    assert [e["state"] for e in recorded if e["who"] == "run"] == PHASES
    assert recorded[-1] == {**recorded[-1], "who": "run", "state": "end", "detail": "succeeded"}
    assert [e["at"] for e in recorded] == sorted(e["at"] for e in recorded)
    for replica, job_id in replicas.items():
        states = [e["state"] for e in recorded if e["who"] == f"replica {replica}" and e["job_id"] == job_id]
        assert states[0] == "SUBMITTED" and states[-1] == "ready" and "starting" in states, states
    states = [e["state"] for e in recorded if e["who"] == "gateway"]
    assert states[0] == "SUBMITTED" and states[-1] == "ready", states
    assert [e["state"] for e in recorded if e["who"] == "job"] == ["SUBMITTED", "RUNNING", "COMPLETED"]
    assert {e["job_id"] for e in recorded if e["who"] == "job"} == set(job["job_ids"])


def test_status_lists_every_job_of_a_running_run_its_folder_and_rows_written(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    proc = start_launcher(root, *STANDIN_SERVER, SLOW_STANDIN, f"hydra.run.dir={run_dir}", "server.replicas=2",
                          "job.num_repeats=4")
    try:
        for line in proc.stdout:
            if line.startswith("submitted rollouts: job "):
                job_id = line.split()[3].rstrip(",")
                break
        else:
            raise AssertionError("the run ended before its rollouts job was submitted")
        while not (run_dir / "rollouts.jsonl").is_file() or not (run_dir / "rollouts.jsonl").read_text():
            assert proc.poll() is None  # the job runs once it wrote a row
            time.sleep(0.1)
        status = subprocess.run([sys.executable, "-m", "launcher.status", "--root", str(root)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60, env=launcher_env(root))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    print(status.stdout, status.stderr)
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "4/4 jobs alive" in text, text  # two replicas, the gateway, the rollouts job
    assert re.search(rf"rollouts job\s+│\s+{job_id}\s+│\s+RUNNING", text), text
    for who in ("policy/0", "policy/1", "policy@gateway"):
        assert re.search(rf"{re.escape(who)}\s+│\s+\d+\s+│\s+ready", text), text
    rows = re.search(rf"{re.escape(str(run_dir.resolve()))}, rows (\d+)/96 written", text)
    assert rows and 1 <= int(rows.group(1)) <= 96, text


def test_the_gateways_503_says_a_replica_is_starting_and_the_live_lines_show_the_gateway_as_it_is(tmp_path):
    """A replica whose engine takes 25 s to come up (a script that sleeps, then execs the stand-in):
    its entry is `starting` all that while, the gateway serves already."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    slow = tmp_path / "slow-start"
    slow.write_text("#!/bin/sh\nsleep 25\nexec \"$@\"\n")
    slow.chmod(0o755)
    proc = start_launcher(
        root, *STANDIN_SERVER, "job=none", f"hydra.run.dir={run_dir}", "gateway.wait_s=0.5",
        f'server.command="{slow} {{python}} -m server.standin --host {{host}} --port {{port}} --model {{served_name}}"',
    )
    try:
        registry, deadline = Registry(root), time.monotonic() + 60
        while not [e for e in registry.entries(service="policy@gateway") if e.state == "healthy"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        (gateway,) = registry.entries(service="policy@gateway")
        (replica,) = registry.entries(service="policy")
        assert replica.state == "starting"
        answer = httpx.post(f"{gateway.base_url}/chat/completions", timeout=30,
                            headers={"Authorization": f"Bearer {gateway.read_api_key()}"},
                            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    print(answer.status_code, answer.text, out, sep="\n")
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    message = answer.json()["error"]["message"]
    assert "1 replica starting, retry" in message and "start the servers" not in message, message
    # While the replica still started, the gateway was shown as its entry said, not SUBMITTED.
    lines = out.splitlines()
    healthy = [i for i, x in enumerate(lines) if re.fullmatch(STAMP + rf"gateway \(job {gateway.job_id}\): healthy", x)]
    ready = [i for i, x in enumerate(lines) if re.fullmatch(STAMP + r"replica 0 \(job \d+\): (ready|checking)", x)]
    assert healthy and (not ready or healthy[0] < ready[0]), out


# ---------------------------------------------------------------- commands to copy, at any width

def long_run_dir(tmp_path: Path) -> Path:
    """A run folder whose resume command is longer than a piped console's 200 columns."""
    return tmp_path / ("a-run-folder-with-a-long-name-" * 8) / "run"


def test_the_resume_command_is_one_line_in_a_pipe_at_any_width(tmp_path):
    run_dir = long_run_dir(tmp_path)
    out = run_launcher(tmp_path / "registry", *STANDIN_SERVER, f"hydra.run.dir={run_dir}", "job=command",
                       "job.command='false'", env={"COLUMNS": "40"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"to resume: python -m launcher run.resume={run_dir}\n" in out.stdout, out.stdout


def run_in_terminal(argv: list[str], env: dict[str, str], columns: int, until: str | None = None,
                    timeout_s: float = 120) -> str:
    """``argv`` on a pseudo-terminal ``columns`` wide, its whole output, escape sequences removed
    (with ``until``: SIGINT once the output holds it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**env, "COLUMNS": str(columns), "TERM": "xterm"})
    os.close(slave)
    data, deadline, interrupted = b"", time.monotonic() + timeout_s, False
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        data += chunk
        if until and not interrupted and until in _plain(data):
            proc.send_signal(signal.SIGINT)
            interrupted = True
        assert time.monotonic() < deadline, _plain(data)
    proc.wait(timeout=60)
    os.close(master)
    return _plain(data)


def _plain(data: bytes) -> str:
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", data.decode(errors="replace"))
    return text.replace("\r\n", "\n").replace("\r", "")


def test_commands_are_one_line_on_a_narrow_terminal(tmp_path):
    root = tmp_path / "registry"
    env = launcher_env(root)
    launcher = [sys.executable, "-m", "launcher", *STANDIN_SERVER]
    run_dir = tmp_path / "failed-run"
    out = run_in_terminal([*launcher, f"hydra.run.dir={run_dir}", "job=command", "job.command='false'"], env, 40)
    print(out)
    assert f"to resume: python -m launcher run.resume={run_dir}\n" in out, out

    serve = run_in_terminal([*launcher, f"hydra.run.dir={tmp_path / 'served'}", "job=none"], env, 40,
                            until="/models\n")
    print(serve)
    namespace = re.search(r"python -m server.registry --namespace (\S+) urls policy\n", serve)
    assert namespace, serve
    key_file = root / namespace.group(1) / ".api_key"
    assert re.search(rf'curl -H "Authorization: Bearer \$\(cat {re.escape(str(key_file))}\)" '
                     r"http://127\.0\.0\.1:\d+/v1/models\n", serve), serve
