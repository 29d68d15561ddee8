"""The run report (launcher/report.py) and a sweep's comparison (launcher/sweep.py) of real launcher runs
(the stand-in engine: what is proven is the report's, not vLLM's), opened in a real headless Chromium
(Debian's, driven by Playwright): it loads offline with no console error and no request leaving the
page, every chart on it has data, and a screenshot is kept (outputs/test-artefacts/)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import (ROOT, STANDIN_SERVER, run_launcher, start_launcher, sweep, sweep_summaries,
                           write_run_folder)

CHROMIUM = "/usr/bin/chromium"
# This machine's network is closed: without these Chromium keeps trying Google's hosts (and the
# sandbox needs a user namespace that root in a container may not have).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTEFACTS = ROOT / "outputs" / "test-artefacts"

# Per chart on the page: its traces' types and point counts (x, or y for a chart without x), and for
# lines over time the points inside the shown x range (a point off the axis is no data to the eye).
CHARTS_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(d => ({
    id: d.id, drawn: !!d._fullLayout && !!d.querySelector('.main-svg'),
    lanes: [...new Set(d.data.filter(t => t.orientation === 'h').flatMap(t => [...t.y]))].sort(),
    traces: d.data.map(t => {
        const [low, high] = d._fullLayout.xaxis.range;
        const points = (t.x || t.y || []).length;
        return {type: t.type, points, shown: t.type === 'scatter' ? [...t.x].filter(x => x >= low && x <= high).length : points};
    })}))"""


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium (installed by tests/debian-packages.sh when missing), headless, via Playwright."""
    installed = subprocess.run([str(ROOT / "tests" / "debian-packages.sh"), "chromium"], capture_output=True, text=True,
                               timeout=900)
    assert installed.returncode == 0, f"installing chromium failed:\n{installed.stderr[-3000:]}"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, path: Path, artefact: str, tmp_path: Path) -> list[dict]:
    """``path`` loaded in a fresh page: asserts no console error, no page error, and no request but the
    file itself; returns each chart's traces; a full-page screenshot kept as ``artefact``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')].every(d => d._fullLayout)",
                           timeout=30_000)
    charts = page.evaluate(CHARTS_JS)
    shot = tmp_path / artefact
    page.screenshot(path=str(shot), full_page=True)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTEFACTS / artefact)
    print(f"\nscreenshot of {path}: {ARTEFACTS / artefact}")
    page.close()
    assert errors == [], errors
    assert requests == [path.as_uri()], requests  # nothing from a CDN or anywhere else: it opens offline
    for chart in charts:
        assert chart["drawn"] and chart["traces"], chart
        assert all(t["points"] > 0 and t["shown"] > 0 for t in chart["traces"]), chart
    return charts


ALL_CHARTS = ["timeline", "completions", "latency", "rewards", "phases"]


def test_every_run_writes_a_report_that_opens_offline_with_its_charts(browser, tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "registry"
    done = run_launcher(root, f"hydra.run.dir={run_dir}", *STANDIN_SERVER, "job.num_repeats=2", "server.replicas=2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {run_dir / 'report.html'}" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"run folder: {run_dir}"
    charts = open_page(browser, run_dir / "report.html", "report-run.png", tmp_path)
    assert [c["id"] for c in charts] == ALL_CHARTS
    summary = json.loads((run_dir / "summary.json").read_text())
    jobs = {"gateway": summary["gateway"]["job_id"], **{f"replica {s['replica']}": s["job_id"] for s in summary["servers"]}}
    lanes = [lane for lane in charts[0]["lanes"] if lane != "run"]
    assert [lane for lane in lanes if not lane.startswith("job ·")] == sorted(f"{who} · job {job}" for who, job in jobs.items())
    assert len(lanes) == len(jobs) + 1  # and the collector's
    phases = next(c for c in charts if c["id"] == "phases")
    assert phases["traces"][0]["points"] == len(summary["phases"])


def test_a_failed_run_writes_its_report_too(browser, tmp_path):
    """A server that cannot start: the run fails in seconds, and its report shows the error and phases."""
    run_dir, root = tmp_path / "run", tmp_path / "registry"
    done = run_launcher(root, f"hydra.run.dir={run_dir}", *STANDIN_SERVER,
                        'server.command="{python} -m server.standin --port {port} --model {served_name} --no-such-flag"')
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"report: {run_dir / 'report.html'}" in done.stdout
    charts = open_page(browser, run_dir / "report.html", "report-failed-run.png", tmp_path)
    assert [c["id"] for c in charts] == ["timeline", "phases"]  # no rollouts: no rows to draw
    page = (run_dir / "report.html").read_text()
    assert 'class="status-failed">failed' in page and "ended while starting" in page


def test_an_interrupted_run_writes_its_report_too(browser, tmp_path):
    """Ctrl-C in the middle of the rollouts (slow stand-in): the report of what was written by then."""
    run_dir, root = tmp_path / "run", tmp_path / "registry"
    proc = start_launcher(root, f"hydra.run.dir={run_dir}", STANDIN_SERVER[0],
                          'server.command="{python} -m server.standin --host {host} --port {port} --model {served_name} '
                          '--seconds-per-token 0.05"', *STANDIN_SERVER[2:], "job.num_repeats=4")
    rollouts, deadline = run_dir / "rollouts.jsonl", time.monotonic() + 120
    while not (rollouts.exists() and rollouts.read_bytes().count(b"\n")):  # some written, most not yet
        assert proc.poll() is None and time.monotonic() < deadline, "no rollout written in 120 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert f"report: {run_dir / 'report.html'}" in out
    charts = open_page(browser, run_dir / "report.html", "report-interrupted-run.png", tmp_path)
    assert [c["id"] for c in charts] == ALL_CHARTS
    assert 0 < len(rollouts.read_text().splitlines()) < 96  # interrupted mid-way
    assert 'class="status-interrupted">interrupted' in (run_dir / "report.html").read_text()


def test_a_report_with_every_chart_opens_in_the_browser(browser, tmp_path):
    """A run folder written to the shared formats (events, timed rows, failures): all five charts drawn."""
    from launcher import report

    folder = write_run_folder(tmp_path / "run")
    charts = open_page(browser, report.write(folder), "report-all-charts.png", tmp_path)
    assert [c["id"] for c in charts] == ALL_CHARTS


def test_a_sweep_prints_and_writes_one_table_of_its_points(browser, tmp_path):
    root = tmp_path / "registry"
    done = sweep(tmp_path, root, "job.num_repeats=1")
    assert done.returncode == 0, done.stdout + done.stderr
    summaries = sweep_summaries(tmp_path)
    assert [[o for o in s["overrides"] if o.startswith("job.sampling.temperature=")] for s in summaries] == [
        ["job.sampling.temperature=0.2"], ["job.sampling.temperature=0.8"]]
    # One table, after both points: their swept value, rollouts, failures, mean reward, tokens/s.
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "job.sampling.temperature" in line and "tokens/s" in line)
    for (i, s), line in zip(enumerate(summaries), lines[header + 2:header + 4]):
        c = s["collection"]
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        assert cells == [str(i), ["0.2", "0.8"][i], "succeeded", str(c["rollouts_written"]), str(c["failures"]),
                         f"{c['mean_reward']:.3f}", f"{c['generated_tokens_per_s']:.3f}"], line
    sweep_dir = tmp_path / "sweep"
    assert f"sweep comparison: {sweep_dir / 'report.html'} (and sweep.csv, sweep.json)" in done.stdout
    saved = json.loads((sweep_dir / "sweep.json").read_text())
    assert saved["swept"] == ["job.sampling.temperature"]
    assert [p["mean_reward"] for p in saved["points"]] == [s["collection"]["mean_reward"] for s in summaries]
    assert (sweep_dir / "sweep.csv").read_text().splitlines()[0] == (
        "point,job.sampling.temperature,status,rollouts,failures,mean reward,tokens/s")
    charts = open_page(browser, sweep_dir / "report.html", "report-sweep.png", tmp_path)
    assert [(c["id"], [t["points"] for t in c["traces"]]) for c in charts] == [("sweep", [2, 2])]


def test_a_failed_point_is_a_row_of_the_sweeps_table_not_its_end(tmp_path):
    """Point 0's server never gets healthy in time: the run fails, point 1 still runs, the table shows
    both, and the sweep exits 1 at its end."""
    done = run_launcher(
        tmp_path / "registry", "-m", *STANDIN_SERVER, "server.startup_timeout_s=0.001,60",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "job.num_repeats=1", timeout_s=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    statuses = [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())["status"] for i in (0, 1)]
    assert statuses == ["failed", "succeeded"]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["status"] for p in saved["points"]] == ["failed", "succeeded"]
    assert "sweep points not succeeded: 0" in done.stderr
