"""Teardown in seconds: a Ctrl-C mid-collection leaves no job process and no registry entry within
5 s, and the collector stopped by a cancel's SIGTERM stops at once under submitit's job wrapper
(which would only log the signal) and leaves whole rows that a re-run completes exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.rollouts import ROLLOUTS_FILE, CollectorConfig, SamplingParams, collect
from launcher.executors import LocalBackend, Resources
from launcher.spec import ClusterSpec
from server.registry import Registry
from server.standin import Faults, StandIn
from tests.support import MODEL, ROOT, STANDIN, STANDIN_SERVER, launcher_env, processes_of, publish, rows

TEARDOWN_TARGET_S = 5.0


def interrupt_mid_collection(run_dir: Path, registry_root: Path, *overrides: str,
                             started: Path | None = None) -> tuple[float, float, str]:
    """``python -m launcher`` until its collector has written 2 rows (or until ``started`` exists),
    then SIGINT (a Ctrl-C); returns the seconds until the launcher exited, until nothing of the run
    was left, and its output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=launcher_env(registry_root),
    )
    written = run_dir / ROLLOUTS_FILE

    def under_way() -> bool:
        if started is not None:
            return started.exists()
        return written.exists() and written.read_bytes().count(b"\n") >= 2

    try:
        deadline = time.monotonic() + 600
        while not under_way():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the job did not get under way in 600 s"
            time.sleep(0.05)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        exited = time.monotonic() - interrupted
        while set(processes_of(registry_root)) - {proc.pid} or Registry(registry_root).namespaces():
            assert time.monotonic() - interrupted < 120, "the run's jobs outlived their teardown"
            time.sleep(0.02)
        return exited, time.monotonic() - interrupted, out
    finally:
        if proc.poll() is None:
            proc.kill()


def assert_torn_down_in_time(label: str, run_dir: Path, exited: float, gone: float, out: str) -> None:
    print(f"\n[teardown] {label}: launcher exited {exited:.2f} s after SIGINT, every job process and "
          f"registry entry gone after {gone:.2f} s")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted", out
    assert "did not stop in time" not in out, out  # nothing had to be killed
    assert gone <= TEARDOWN_TARGET_S, out


def test_ctrl_c_mid_collection_tears_down_within_5_s_and_a_rerun_resumes(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    # Slow answers (0.05 s a token: a conversation takes seconds) and 96 rollouts: still collecting.
    slow = [o for o in STANDIN_SERVER if not o.startswith("server.command=")]
    assert_torn_down_in_time("stand-in", run_dir, *interrupt_mid_collection(
        run_dir, root, *slow, f'server.command="{STANDIN} --seconds-per-token 0.05"', "job.num_repeats=4",
    ))
    assert list(root.iterdir()) == []
    collector_log = next(p for p in (run_dir / "submitit").glob("*/*_log.err") if "CollectionStopped" in p.read_text())
    assert "stopped by SIGTERM" in collector_log.read_text()
    first = rows(run_dir / ROLLOUTS_FILE)
    assert len(first) == len(set(first)) < 96

    # The same folder again, answers at full speed: it does only what the first run left undone.
    again = subprocess.run(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *STANDIN_SERVER, "job.num_repeats=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=launcher_env(root),
    )
    assert again.returncode == 0, again.stdout + again.stderr
    every = rows(run_dir / ROLLOUTS_FILE)
    assert len(every) == len(set(every)) == 96 and every[: len(first)] == first
    collection = json.loads((run_dir / "summary.json").read_text())["collection"]
    assert collection["rollouts_written_this_run"] == 96 - len(first)


def test_ctrl_c_mid_collection_with_vllm(tmp_path):
    """The embedded default (real vLLM, CPU): the same measure; vLLM itself takes ~2 s to stop."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    assert_torn_down_in_time("vLLM", run_dir, *interrupt_mid_collection(run_dir, root))


def test_ctrl_c_on_a_command_job_tears_down_within_5_s(tmp_path):
    root, run_dir, started = tmp_path / "registry", tmp_path / "run", tmp_path / "started"
    program = tmp_path / "busy.py"
    program.write_text(f"import time\nopen({str(started)!r}, 'w').close()\ntime.sleep(600)\n")
    assert_torn_down_in_time("job=command", run_dir, *interrupt_mid_collection(
        run_dir, root, *STANDIN_SERVER, "job=command", f'job.command="{{python}} {program}"', started=started,
    ))


def test_a_cancelled_collector_job_stops_at_once_and_a_rerun_completes_each_once(tmp_path):
    """Under submitit's local job wrapper, as the launcher submits it: the cancel's SIGTERM stops it
    (it used to be ignored until the launcher killed the job), with rows whole."""
    server = StandIn(model=MODEL, faults=Faults(seconds_per_token=0.02)).start()
    try:
        root = tmp_path / "registry"
        publish(root, [server])
        tasks = tmp_path / "tasks.jsonl"
        tasks.write_text("".join(
            json.dumps({"id": f"t{i}", "responses_create_params": {"input": f"What is {i} + 1?"},
                        "verifier": {"name": "number", "expected": i + 1}}) + "\n" for i in range(8)
        ))
        cfg = CollectorConfig(
            tasks=str(tasks), output_dir=str(tmp_path / "out"), namespace="run1", registry=Registry(root),
            num_repeats=4, max_concurrency=4, sampling=SamplingParams(max_tokens=16),
        )
        backend = LocalBackend(ClusterSpec(kind="local"), tmp_path / "submitit")
        job = backend.submit(collect, cfg, Resources(name="rollouts", timeout_min=10))
        written = Path(cfg.output_dir) / ROLLOUTS_FILE
        deadline = time.monotonic() + 60
        while not (written.exists() and written.read_bytes().count(b"\n") >= 2):
            assert not backend.finished(job), backend.log_tail(job)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        said = []
        t0 = time.monotonic()
        backend.stop([job], grace_s=15, say=said.append)
        took = time.monotonic() - t0
        print(f"\n[teardown] collector job stopped {took:.2f} s after its cancel")
        assert not [x for x in said if "did not stop in time" in x] and took < 2.0, said  # nothing killed
        with pytest.raises(Exception, match="CollectionStopped: stopped by SIGTERM"):
            job.result()
        first = rows(written)
        assert len(first) == len(set(first)) < 32

        again = collect(cfg)
        every = rows(written)
        assert sorted(every) == sorted((f"t{i}", r) for i in range(8) for r in range(4))  # each exactly once
        assert again.rollouts_written_this_run == 32 - len(first)
    finally:
        server.stop()


def _ignores_sigterm(pid_file: str) -> None:
    """A job that will not stop when asked."""
    import os

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def test_a_forced_cancel_kills_the_local_job_not_only_its_controller(tmp_path):
    """Killing submitit's local controller alone left its job running, orphaned (a collector that
    ignored SIGTERM went on for a minute after the launcher had exited)."""
    backend = LocalBackend(ClusterSpec(kind="local"), tmp_path / "submitit")
    pid_file = tmp_path / "pid"
    job = backend.submit(_ignores_sigterm, str(pid_file), Resources(name="stubborn", timeout_min=10))
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert not backend.finished(job), backend.log_tail(job)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    task = int(pid_file.read_text())
    backend.cancel(job)  # SIGTERM, forwarded and ignored
    time.sleep(0.5)
    assert not backend.finished(job) and Path(f"/proc/{task}").exists()
    backend.force_cancel(job)
    deadline = time.monotonic() + 5
    while _running(task) or not backend.finished(job):
        assert time.monotonic() < deadline, "the job outlived its controller"
        time.sleep(0.02)


def _running(pid: int) -> bool:
    """``pid`` exists and is no zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
