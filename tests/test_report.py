"""The run report and the sweep comparison built from folders written to the shared formats
(docs/architecture.md, "Contracts"); drawn in a real browser by tests/integration/test_reports.py."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from launcher import report, sweep
from tests.support import ROOT, RUN_START, write_run_folder


def figure_ids(page: str) -> list[str]:
    return re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', page)


def test_a_run_folder_gives_every_chart_from_its_own_files(tmp_path):
    folder = write_run_folder(tmp_path / "run")
    data = report.read(folder)
    # Every whole line read, each file's torn last line skipped.
    assert (data.rows, len(data.rewards), len(data.finished), len(data.failures)) == (96, 96, 96, 3)
    assert len(data.requests) == 96 + 32  # every third rollout made two model calls
    assert len(data.events) == 38
    page = (report.write(folder)).read_text()
    assert figure_ids(page) == ["timeline", "completions", "latency", "rewards", "phases"]
    assert 'class="note"' not in page  # nothing missing, nothing explained away
    assert 'class="status-succeeded">succeeded' in page
    # Self-contained: plotly.js inline, no script or stylesheet fetched from anywhere.
    assert "plotly.js v" in page and not re.search(r'<script[^>]+src=|<link[^>]+href=', page)


def test_each_job_gets_a_lane_and_each_state_lasts_until_the_next(tmp_path):
    data = report.read(write_run_folder(tmp_path / "run"))
    end = RUN_START + 95
    found = report.segments(data.events, end)
    lanes = list(dict.fromkeys(s.lane for s in found))
    assert lanes == ["run", "gateway · job 13", "replica 0 · job 11", "replica 1 · job 12", "replica 1 · job 15",
                     "job · job 14"]
    spans = {(s.lane, s.state): (s.start - RUN_START, s.end - RUN_START) for s in found}
    assert spans["run", "rollouts"] == (30, 89) and spans["run", "teardown"] == (89, 95)
    assert ("run", "end") not in spans  # the end closes the lane
    assert spans["replica 1 · job 12", "ready"] == (23, 40)
    assert spans["replica 1 · job 12", "dead"] == (40, 40.5)
    # A final state with nothing after it is a mark, not a bar to the end of the run.
    start, stop = spans["replica 1 · job 12", "replaced"]
    assert start == 40.5 and stop == pytest.approx(40.5 + 0.95)
    assert spans["replica 1 · job 15", "ready"] == (64, 90) and spans["replica 1 · job 15", "draining"] == (90, 95)


def test_latency_percentiles_are_per_time_bucket():
    # 20 requests in the first second, latencies 0.05..1.0; 20 more 100 s later, each 7 s.
    requests = [(1000 + i / 20, (i + 1) / 20) for i in range(20)] + [(1100.0 + i / 20, 7.0) for i in range(20)]
    buckets = report.latency_buckets(requests, start=990)
    width = (1100.95 - 1000) / 4  # 4 buckets: 10 requests each on average; the two between had none
    assert len(buckets) == 2
    (middle, first, n), (later, last, m) = buckets
    assert (n, m) == (20, 20)
    assert first == {50: 0.5, 90: 0.9, 99: 1.0}  # nearest rank: latencies some request had
    assert last == {50: 7.0, 90: 7.0, 99: 7.0}
    assert (middle, later) == pytest.approx((10 + width / 2, 10 + 3.5 * width))  # seconds since start
    # A burst of 0.2 s (an interrupted run): its one bucket lies where its requests were, on the time axis.
    ((middle, _, n),) = report.latency_buckets([(1000 + i / 100, 0.5) for i in range(19)], start=1000)
    assert n == 19 and 0 <= middle <= 0.18


def test_what_a_run_did_not_record_is_said_not_drawn(tmp_path):
    """A run before events.jsonl and the rows' timing fields (or one that failed before its rollouts):
    the charts it can draw, and a line saying why each other is missing."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "rollouts.jsonl").write_text(json.dumps({"task_id": "t", "repeat": 0, "reward": 1.0, "turns": [{}]}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"run_id": "r", "status": "failed", "error": "boom\ntrace",
                                                     "phases": {"servers start": 1.0}, "collection": None}))
    page = report.write(folder).read_text()
    assert figure_ids(page) == ["rewards", "phases"]
    assert "no events recorded (events.jsonl is missing or empty)" in page
    assert "no completion times: 1 rows in rollouts.jsonl, none with finished_at" in page
    assert "no request times: 1 rows in rollouts.jsonl, no turn with at and latency_s" in page
    assert 'class="status-failed">failed' in page and "<td>boom</td>" in page


def test_an_empty_folder_still_gets_a_page(tmp_path):
    page = report.write(tmp_path).read_text()
    assert figure_ids(page) == []
    assert "no summary.json: the launcher did not finish this run" in page


def test_the_cli_rewrites_a_report_and_names_a_missing_folder(tmp_path):
    folder = write_run_folder(tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "launcher.report", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(folder / "report.html") and (folder / "report.html").stat().st_size > 4_000_000
    missing = subprocess.run([sys.executable, "-m", "launcher.report", str(tmp_path / "nope")], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and f"no such folder: {tmp_path / 'nope'}" in missing.stderr


def point(folder, overrides: list[str], status="succeeded", reward=0.5, tokens_per_s=100.0) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "status": status, "overrides": overrides,
        "collection": {"rollouts_written": 8, "failures": 1, "mean_reward": reward, "generated_tokens_per_s": tokens_per_s},
    }))


def test_a_sweep_compares_its_points_on_the_values_they_differ_in(tmp_path):
    common = ["server=openai_command", "job.num_repeats=2"]
    for i, (t, p) in enumerate([(0.2, 0.9), (0.8, 0.9), (0.2, 1.0), (0.8, 1.0)] * 3):
        if i < 11:  # 11 points: 10 sorts after 9, not after 1
            point(tmp_path / str(i), [*common, f"job.sampling.temperature={t}", f"job.sampling.top_p={p}"],
                  reward=i / 10, tokens_per_s=10.0 * i)
    (tmp_path / "11" / ".hydra").mkdir(parents=True)  # a point that never wrote a summary: Hydra's record of it
    (tmp_path / "11" / ".hydra" / "overrides.yaml").write_text(
        "- server=openai_command\n- job.num_repeats=2\n- job.sampling.temperature=0.8\n- job.sampling.top_p=1.0\n")
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    done = sweep.write(tmp_path)
    assert done.swept == ["job.sampling.temperature", "job.sampling.top_p"]
    assert [p.folder for p in done.points] == [str(i) for i in range(12)]
    assert done.points[11].status == "no summary" and done.points[11].mean_reward is None
    with open(done.csv) as f:
        table = list(csv.reader(f))
    assert table[0] == ["point", "job.sampling.temperature", "job.sampling.top_p", "status", "rollouts", "failures",
                        "mean reward", "tokens/s"]
    assert table[2] == ["1", "0.8", "0.9", "succeeded", "8", "1", "0.100", "10.000"]
    assert table[12] == ["11", "0.8", "1.0", "no summary", "", "", "", ""]
    saved = json.loads(done.json.read_text())
    assert saved["swept"] == done.swept and saved["points"][3]["overrides"][-1] == "job.sampling.top_p=1.0"
    page = done.report.read_text()
    assert figure_ids(page) == ["sweep"] and "job.sampling.temperature=0.8, job.sampling.top_p=1.0" in page
    # The CLI finds it is a sweep folder (Hydra's multirun.yaml) and writes the comparison again.
    again = subprocess.run([sys.executable, "-m", "launcher.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == str(done.report), again.stderr
