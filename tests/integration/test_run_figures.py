"""What a run's summary.json and final table say is what happened (issue 20, items 2-4), with real
launcher runs serving the stand-in engine (what is proven is the launcher's bookkeeping, not vLLM's):
per-replica figures behind the gateway after a replica died and its replacement never got ready;
an interrupted run's rows written out of the total; a resume listing every attempt; and a resume of
a finished run that submits nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from jobs.rollouts import ROLLOUTS_FILE
from server.registry import Registry
from tests.support import (
    ROOT, STANDIN, STANDIN_SERVER, kill_engine_and_finish, launcher_env, processes_of, rows, run_launcher,
    start_launcher,
)

TOTAL = 96  # 24 demo tasks x 4 repeats
STANDIN_BASE = [o for o in STANDIN_SERVER if not o.startswith("server.command=")]
# Slow answers (0.05 s a token: a conversation takes seconds), so that collection is still going.
SLOW = [*STANDIN_BASE, f'server.command="{STANDIN} --seconds-per-token 0.05"', "job.num_repeats=4"]

# The first two engine starts serve (replicas 0 and 1); any later one (a replacement) never answers.
SECOND_START_HANGS = """#!/bin/sh
marks="$1"; shift
mkdir -p "$marks"; started=$(ls "$marks" | wc -l); touch "$marks/$$"
[ "$started" -ge 2 ] && exec sleep 3600
exec "$@"
"""


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_rows(proc: subprocess.Popen, run_dir: Path, n: int, output=None) -> None:
    deadline = time.monotonic() + 300
    while _lines(run_dir / ROLLOUTS_FILE) < n:
        assert proc.poll() is None, output.read_text() if output else proc.stdout.read()
        assert time.monotonic() < deadline, f"fewer than {n} rows in 300 s"
        time.sleep(0.05)


def _nothing_left(root: Path) -> None:
    deadline = time.monotonic() + 10
    while processes_of(root) or Registry(root).namespaces():
        assert time.monotonic() < deadline, (processes_of(root), Registry(root).namespaces())
        time.sleep(0.05)


def test_behind_the_gateway_each_replica_has_its_requests_death_restart_and_downtime_until_the_end(tmp_path):
    """Replica 1's engine is SIGKILLed mid-collection and its replacement never gets ready: the run
    ends on replica 0. Each replica's requests are what the gateway sent it (not the gateway's own
    index 0 for all), replica 1's downtime runs to the run's end, its replacement is listed as never
    ready, and the final table shows it."""
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    script = tmp_path / "start.sh"
    script.write_text(SECOND_START_HANGS)
    command = (f"sh {script} {tmp_path / 'starts'} {STANDIN} --seconds-per-token 0.02")
    proc = start_launcher(root, *STANDIN_BASE, f'server.command="{command}"', f"hydra.run.dir={run_dir}",
                          "server.replicas=2", "job.num_repeats=4", "job.max_concurrency=8")
    _wait_for_rows(proc, run_dir, 12)
    out, summary = kill_engine_and_finish(proc, root, replica=1, timeout_s=600)
    first, second = summary["servers"]

    # Requests: counted by the gateway, per replica index, and both replicas served.
    assert summary["requests_counted_by"] == "gateway", summary
    assert first["requests"] > 0 and second["requests"] > 0, summary["servers"]
    served = Counter(row["replica"] for row in map(json.loads, (run_dir / ROLLOUTS_FILE).read_text().splitlines()))
    assert set(served) == {0, 1}, served  # the rows name both, as the gateway's header told the collector
    assert first["requests"] >= served[0] and second["requests"] >= served[1], (served, summary["servers"])
    gateway_retries = sum(summary["gateway"]["counts"].get("retries", {}).values())
    assert first["retries"] + second["retries"] == gateway_retries, summary["gateway"]["counts"]
    assert second["failures"] >= 1  # the gateway found it dead under a request, or its first one after

    # The death, the restart, and downtime until the run ended (its replacement never got ready).
    assert first["deaths"] == [] and first["restarts"] == 0 and first["down_s"] == 0.0, first
    assert len(second["deaths"]) == 1 and "signal 9" in second["deaths"][0]["reason"], second
    assert second["restarts"] == 1 and second["state"] != "ready", second
    down_for = summary["ended"] - second["deaths"][0]["at"]
    assert down_for - 5 <= second["down_s"] <= down_for, (second["down_s"], down_for)
    dead, replacement = second["jobs"]
    assert dead == {"job_id": second["deaths"][0]["job_id"], "served": True,
                    "ended": f"died in use: {second['deaths'][0]['reason']}"}, second["jobs"]
    assert replacement["job_id"] == second["job_id"] and replacement["served"] is False, second["jobs"]
    assert second["base_url"] is None and second["ready_after_s"] is None  # it never served anywhere

    # The final table says the same, one line per replica (the piped output's timestamped state lines
    # name the replicas too: the table's line is the one with its requests).
    table = [line for line in out.splitlines() if " requests" in line]
    line = next(line for line in table if "replica 1 " in line)
    assert f"{second['requests']} requests" in line and "1 death (" in line and "1 restart," in line, line
    assert f"down {second['down_s']:.1f}s" in line and f"job {second['job_id']} never ready" in line, line
    line = next(line for line in table if "replica 0 " in line)
    assert f"{first['requests']} requests" in line and "0 deaths, 0 restarts, down 0.0s" in line, line
    _nothing_left(root)


def test_an_interrupted_run_shows_its_rows_written_and_its_resume_lists_both_attempts(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    output = tmp_path / "first.out"
    with open(output, "w") as out:  # a file, not a pipe: the jobs inherit it
        proc = subprocess.Popen([sys.executable, "-m", "launcher", *SLOW, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=launcher_env(root))
    _wait_for_rows(proc, run_dir, 3, output)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    first_out = output.read_text()
    assert proc.returncode == 130, first_out
    first = json.loads((run_dir / "summary.json").read_text())
    written = len(rows(run_dir / ROLLOUTS_FILE))
    assert first["status"] == "interrupted" and first["collection"] is None, first
    assert first["rollouts"]["written"] == written and first["rollouts"]["total"] == TOTAL, first["rollouts"]
    assert 3 <= written < TOTAL
    table_row = next(line for line in first_out.splitlines() if "rollouts written" in line)
    assert f"{written}/{TOTAL}" in table_row, first_out
    _nothing_left(root)

    resumed = run_launcher(root, f"run.resume={run_dir}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rollouts"] == {"written": TOTAL, "total": TOTAL, "failed": 0}, summary["rollouts"]
    # Both attempts listed; the first one's summary kept as it was written.
    kept = run_dir / "summary.attempt-1.json"
    assert json.loads(kept.read_text()) == first
    attempts = summary["attempts"]
    assert [a["run_id"] for a in attempts] == [first["run_id"], summary["run_id"]], attempts
    assert [a["status"] for a in attempts] == ["interrupted", "succeeded"], attempts
    assert attempts[0]["summary_path"] == str(kept) and attempts[1]["summary_path"] == str(run_dir / "summary.json")
    assert [a["rollouts_written_this_attempt"] for a in attempts] == [written, TOTAL - written], attempts
    assert attempts[0]["started"] == first["started"] and attempts[0]["ended"] == first["ended"]
    assert summary["totals"]["rollouts_written_this_attempt"] == TOTAL and summary["totals"]["attempts"] == 2
    assert f"{TOTAL}/{TOTAL}" in resumed.stdout and "attempts" in resumed.stdout, resumed.stdout
    _nothing_left(root)


def test_resuming_a_finished_run_submits_nothing_and_keeps_its_summary(tmp_path):
    root, run_dir = tmp_path / "registry", tmp_path / "run"
    done = run_launcher(root, *STANDIN_SERVER, "job.num_repeats=4", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (run_dir / "summary.json").read_bytes()
    assert json.loads(summary)["collection"]["generated_tokens_per_s"] > 0
    files = sorted(p.name for p in run_dir.iterdir())
    submitit_jobs = sorted(p.name for p in (run_dir / "submitit").iterdir())

    again = run_launcher(root, f"run.resume={run_dir}")
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert f"{run_dir} is finished: {TOTAL}/{TOTAL} rollouts written; nothing to resume, nothing submitted" in \
        " ".join(again.stdout.split()), out
    assert "submitted" not in out.replace("nothing submitted", ""), out
    assert (run_dir / "summary.json").read_bytes() == summary  # tokens/s, contiguity: as the run wrote them
    assert sorted(p.name for p in run_dir.iterdir()) == files  # no attempt summary, no new log
    assert sorted(p.name for p in (run_dir / "submitit").iterdir()) == submitit_jobs
    _nothing_left(root)
