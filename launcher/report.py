"""The run report: ``report.html`` beside ``summary.json``, built from the run folder alone.

``write(run_dir)`` reads what the run left and writes one self-contained page (plotly.js inline: it
opens offline, e.g. on a login node, and asks no network for anything):

- a timeline of each job the run kept (every replica, the gateway, the collector/command/Gym job,
  successors and replacements each in their own lane) coloured by state, with the run's phases on
  top: from ``events.jsonl`` (written by ``launcher/events.py``);
- rollouts (and failures) completed over time, request latency p50/p90/p99 per time bucket and the
  reward distribution: from ``rollouts.jsonl`` (``finished_at``, ``turns[i].at`` / ``latency_s``,
  ``reward``) and ``failures.jsonl`` (``at``);
- the phases' durations and the run's status: from ``summary.json``.

Every input may be missing or cut short (a run that failed early, a launcher killed mid-run): the
report says what it could not show and why instead of a chart, and skips lines it cannot parse.
The time charts share one axis, seconds since the run's first recorded moment, so they line up.

``python -m launcher.report <run folder>`` writes it again; for a sweep folder (Hydra's
``multirun.yaml`` in it) the sweep's comparison (``launcher.sweep``).

Why Plotly (plotly.py, MIT): its wheel carries plotly.js, which one page embeds once (4.8 MB,
opened offline, no CDN); its horizontal bars with a ``base`` are its documented Gantt/timeline; it
needs only narwhals and packaging (pure Python); and a figure's data stays on its div (``gd.data``),
where the browser test reads it. Bokeh's inline page is smaller (1.3 MB of JS) but brings numpy,
pillow, tornado and contourpy to the launcher; Altair needs vega, vega-lite and vega-embed inlined
by other means.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

REPORT = "report.html"
TEMPLATE = "plotly_white"
MAX_LINE_POINTS = 2000  # a cumulative curve of a long run is thinned to this many points: the page stays light
LATENCY_BUCKETS = 40  # at most
REQUESTS_PER_BUCKET = 10  # on average at least: a p90 of two requests would be their maximum
PERCENTILES = (50, 90, 99)

# A state's colour wherever it shows: the same word is the same colour in every lane.
STATE_COLOURS = {
    "SUBMITTED": "#c7c7c7", "PENDING": "#f2b701", "RUNNING": "#9ecae1", "REQUEUED": "#e377c2",
    "starting": "#6baed6", "healthy": "#4292c6", "checking": "#2171b5", "ready": "#2ca02c",
    "draining": "#ff7f0e", "dead": "#d62728", "replaced": "#7f7f7f",
    "COMPLETED": "#98df8a", "FAILED": "#d62728", "CANCELLED": "#8c564b",
}
# States after which a job does nothing more: shown as a mark, not as a bar lasting to the run's end.
FINAL_STATES = {"dead", "replaced", "COMPLETED", "FAILED", "CANCELLED"}
FINAL_MARK = 0.01  # of the run's span
RUN = "run"  # events.jsonl's who for the run's own phases
END = "end"  # the run's last event: its detail is the run's status


@dataclass
class Segment:
    lane: str
    state: str
    start: float  # unix time
    end: float
    detail: str | None


@dataclass
class RunData:
    """What a run folder holds, as the report needs it."""

    summary: dict | None = None
    events: list[dict] = field(default_factory=list)
    rows: int = 0  # rows of rollouts.jsonl read
    finished: list[float] = field(default_factory=list)  # each rollout's finished_at
    rewards: list[float] = field(default_factory=list)
    requests: list[tuple[float, float]] = field(default_factory=list)  # each model call's (at, latency_s)
    failures: list[float] = field(default_factory=list)  # each failure's at
    first: float = math.inf  # the earliest moment anything records (a rollout's start: finished_at - latency_s)
    last: float = -math.inf

    def saw(self, *moments: float) -> None:
        self.first = min(self.first, *moments)
        self.last = max(self.last, *moments)


def _number(value) -> float | None:
    """A finite JSON number; None for anything else (a missing field, a string, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _objects(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSONL file, one a line; lines that are not one (a torn last line) are skipped."""
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    yield obj
    except FileNotFoundError:
        return


def read(run_dir: Path) -> RunData:
    data = RunData()
    try:
        data.summary = json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, ValueError):
        pass
    for event in _objects(run_dir / "events.jsonl"):
        at = _number(event.get("at"))
        if at is not None and isinstance(event.get("who"), str) and isinstance(event.get("state"), str):
            data.events.append({**event, "at": at})
            data.saw(at)
    data.events.sort(key=lambda e: e["at"])
    # Row by row, keeping only the numbers: rollouts.jsonl of a long run is gigabytes of token ids.
    for row in _objects(run_dir / "rollouts.jsonl"):
        data.rows += 1
        if (reward := _number(row.get("reward"))) is not None:
            data.rewards.append(reward)
        if (finished := _number(row.get("finished_at"))) is not None:
            data.finished.append(finished)
            data.saw(finished, finished - (_number(row.get("latency_s")) or 0.0))
        for turn in row.get("turns") or ():
            if isinstance(turn, dict):
                at, latency = _number(turn.get("at")), _number(turn.get("latency_s"))
                if at is not None and latency is not None:
                    data.requests.append((at, latency))
                    data.saw(at, at - latency)
    for failure in _objects(run_dir / "failures.jsonl"):
        if (at := _number(failure.get("at"))) is not None:
            data.failures.append(at)
            data.saw(at)
    return data


# ---------------------------------------------------------------- what the charts show


def _lane_order(lane: str) -> tuple:
    """The run first, then the gateway, the replicas by index, the job, anything else."""
    who = lane.split(" · ")[0]
    if who == RUN:
        return (0, 0, lane)
    if who == "gateway":
        return (1, 0, lane)
    if who.startswith("replica "):
        index = who.split(" ", 1)[1]
        return (2, int(index) if index.isdigit() else math.inf, lane)
    return (3 if who == "job" else 4, 0, lane)


def segments(events: list[dict], end: float) -> list[Segment]:
    """Each job's states as segments: a state lasts until the next event of the same job (same who and
    job_id: a successor or a replacement gets a lane of its own) or until ``end``; a job's last state
    when final (dead, replaced, COMPLETED, ...) is a mark (``FINAL_MARK`` of the run's span). The
    run's ``end`` event closes the run's lane and is no segment itself."""
    mark = FINAL_MARK * (end - events[0]["at"]) if events else 0.0
    by_lane: dict[str, list[dict]] = {}
    for event in events:
        job = event.get("job_id")
        lane = event["who"] if job in (None, "") else f"{event['who']} · job {job}"
        by_lane.setdefault(lane, []).append(event)
    found = []
    for lane in sorted(by_lane, key=_lane_order):
        lane_events = by_lane[lane]
        for event, after in zip(lane_events, [*lane_events[1:], None]):
            if event["who"] == RUN and event["state"] == END:
                continue
            until = after["at"] if after else event["at"] + mark if event["state"] in FINAL_STATES else end
            found.append(Segment(lane, event["state"], event["at"], until,
                                 event.get("detail") if isinstance(event.get("detail"), str) else None))
    return found


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: a latency that some request really had."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency_buckets(requests: list[tuple[float, float]], start: float) -> list[tuple[float, dict[int, float], int]]:
    """(bucket middle in seconds since ``start``, {percentile: latency}, requests) per time bucket
    that had a request; equal buckets from the first request to the last (so every middle lies
    where requests were), at most ``LATENCY_BUCKETS``, ``REQUESTS_PER_BUCKET`` requests on average
    at least."""
    if not requests:
        return []
    first, last = min(at for at, _ in requests), max(at for at, _ in requests)
    count = max(1, min(LATENCY_BUCKETS, len(requests) // REQUESTS_PER_BUCKET))
    width = (last - first) / count
    buckets: dict[int, list[float]] = {}
    for at, latency in requests:
        buckets.setdefault(min(int((at - first) / width), count - 1) if width else 0, []).append(latency)
    return [(first - start + (k + 0.5) * width, {p: percentile(v, p) for p in PERCENTILES}, len(v))
            for k, v in sorted(buckets.items())]


def _thinned(xs: list[float]) -> tuple[list[float], list[int]]:
    """A cumulative count over sorted times, at most ``MAX_LINE_POINTS`` points, the last one kept."""
    xs = sorted(xs)
    step = max(1, math.ceil(len(xs) / MAX_LINE_POINTS))
    keep = [*range(step - 1, len(xs), step)]
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [i + 1 for i in keep]


# ---------------------------------------------------------------- figures


def layout(fig: go.Figure, height: int, **settings) -> go.Figure:
    """The look every figure of the reports shares; ``settings`` on top."""
    fig.update_layout(**{"template": TEMPLATE, "height": height, "margin": dict(l=10, r=10, t=10, b=40), **settings})
    return fig


def timeline(data: RunData, start: float, end: float) -> go.Figure:
    found = segments(data.events, end)
    lanes = sorted({s.lane for s in found}, key=_lane_order)
    fig = go.Figure()
    phases = [s for s in found if s.lane == RUN]
    if phases:  # one neutral trace, each phase named on its bar: the legend keeps to the jobs' states
        fig.add_bar(name="phase", y=[s.lane for s in phases], base=[s.start - start for s in phases],
                    x=[s.end - s.start for s in phases], orientation="h", text=[s.state for s in phases],
                    textposition="inside", insidetextanchor="middle", marker=dict(color="#dadfeb", line=dict(color="white", width=2)),
                    hovertext=[_hover(s, start) for s in phases], hoverinfo="text")
    for state in dict.fromkeys(s.state for s in found if s.lane != RUN):
        these = [s for s in found if s.lane != RUN and s.state == state]
        fig.add_bar(name=state, y=[s.lane for s in these], base=[s.start - start for s in these],
                    x=[s.end - s.start for s in these], orientation="h",
                    marker=dict(color=STATE_COLOURS.get(state)), hovertext=[_hover(s, start) for s in these],
                    hoverinfo="text")
    return layout(fig, 120 + 34 * len(lanes), barmode="overlay",
                   yaxis=dict(categoryorder="array", categoryarray=lanes[::-1]),
                   xaxis=_time_axis(start, end), legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"),
                   margin=dict(l=10, r=10, t=60, b=40))


def _hover(s: Segment, start: float) -> str:
    detail = f"<br>{html.escape(s.detail)}" if s.detail else ""
    return f"{html.escape(s.lane)}<br>{html.escape(s.state)}: {s.start - start:.1f}s to {s.end - start:.1f}s{detail}"


def _time_axis(start: float, end: float) -> dict:
    moment = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start))
    return dict(title=f"seconds since {moment}", range=[0, max(end - start, 1.0) * 1.02])  # the last point whole


def completions(data: RunData, start: float, end: float) -> go.Figure:
    fig = go.Figure()
    for name, times in (("rollouts", data.finished), ("failures", data.failures)):
        if times:
            xs, counts = _thinned(times)
            fig.add_scatter(name=name, x=[x - start for x in xs], y=counts, mode="lines", line_shape="hv")
    return layout(fig, 300, xaxis=_time_axis(start, end), yaxis=dict(title="completed", rangemode="tozero"))


def latencies(data: RunData, start: float, end: float) -> go.Figure:
    buckets = latency_buckets(data.requests, start)
    fig = go.Figure()
    for p in PERCENTILES:
        fig.add_scatter(name=f"p{p}", x=[b[0] for b in buckets], y=[b[1][p] for b in buckets], mode="lines+markers",
                        hovertext=[f"p{p} {b[1][p]:.3f}s of {b[2]} requests" for b in buckets], hoverinfo="text")
    return layout(fig, 300, xaxis=_time_axis(start, end), yaxis=dict(title="request latency (s)", rangemode="tozero"))


def rewards(data: RunData) -> go.Figure:
    # Bins centred on the values: rewards are often a few values (0, 0.5, 1), each its own thin bar,
    # on the usual 0..1 scale (wider when they go beyond), so that all-zero rewards do not fill the chart.
    low, high = min(data.rewards), max(data.rewards)
    size = (high - low) / 20 or 0.05
    fig = go.Figure(go.Histogram(x=data.rewards, name="rollouts",
                                 xbins=dict(start=low - size / 2, end=high + size / 2, size=size)))
    return layout(fig, 300, xaxis=dict(title="reward", range=[min(low, 0) - size, max(high, 1) + size]),
                  yaxis=dict(title="rollouts"), bargap=0.05)


def phases(summary: dict) -> go.Figure:
    names = list(summary["phases"])
    seconds = [summary["phases"][n] for n in names]
    fig = go.Figure(go.Bar(x=seconds, y=names, orientation="h", text=[f"{s:.1f}s" for s in seconds],
                           textposition="auto", marker=dict(color="#636efa")))
    return layout(fig, 80 + 30 * len(names), xaxis=dict(title="seconds"),
                   yaxis=dict(categoryorder="array", categoryarray=names[::-1]))


# ---------------------------------------------------------------- the page


def figure_html(fig: go.Figure, div_id: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, default_height=f"{fig.layout.height}px",
                       config={"displaylogo": False, "responsive": True})


def section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def facts_table(rows: list[tuple[str, object]]) -> str:
    """Two columns, what and its value; rows whose value is None are left out."""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="facts">{cells}</table>'


def grid_table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #2a3f5f; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin: 1.6em 0 0.3em; }
.note { color: #6b7a90; font-style: italic; }
table { border-collapse: collapse; } th, td { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #e5ecf6; }
.facts th { font-weight: 600; } .grid thead th { background: #e5ecf6; }
.status-succeeded { color: #2ca02c; } .status-failed { color: #d62728; } .status-interrupted, .status-stopped { color: #ff7f0e; }
"""


def page(title: str, heading: str, parts: list[str]) -> str:
    """A whole page: plotly.js inline once for every figure of it."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>'
            f"<body><h1>{heading}</h1>{''.join(parts)}</body></html>\n")


def write_page(path: Path, text: str) -> Path:
    """Whole or not at all: a browser open on the older page never reads half of the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render(run_dir: Path, data: RunData) -> str:
    summary = data.summary or {}
    collection = summary.get("collection") or {}
    status = summary.get("status")
    heading = html.escape(f"run {summary.get('run_id', run_dir.name)}")
    if status:
        heading += f': <span class="status-{html.escape(status)}">{html.escape(status)}</span>'
    error = summary.get("error")
    parts = [facts_table([
        ("run folder", str(run_dir)),
        ("error", error.splitlines()[0] if error else None),
        ("rollouts written", collection.get("rollouts_written")),
        ("failures", collection.get("failures")),
        ("mean reward", None if collection.get("mean_reward") is None else f"{collection['mean_reward']:.3f}"),
        ("generated tokens/s", collection.get("generated_tokens_per_s")),
    ])]
    if data.summary is None:
        parts.append(note("no summary.json: the launcher did not finish this run (killed?); status and phases unknown"))
    start, end = data.first, data.last
    # The run's end event closes every lane; without it (a launcher that died) the last thing seen does.
    ends = [e["at"] for e in data.events if e["who"] == RUN and e["state"] == END]
    end = ends[-1] if ends else end
    parts.append(section("Timeline", figure_html(timeline(data, start, end), "timeline") if data.events
                         else note("no events recorded (events.jsonl is missing or empty)")))
    parts.append(section("Rollouts completed over time", figure_html(completions(data, start, end), "completions")
                         if data.finished or data.failures else note(
                             f"no completion times: {data.rows} rows in rollouts.jsonl, none with finished_at")))
    parts.append(section("Request latency over time (p50, p90, p99 per time bucket)",
                         figure_html(latencies(data, start, end), "latency") if data.requests else note(
                             f"no request times: {data.rows} rows in rollouts.jsonl, no turn with at and latency_s")))
    parts.append(section("Reward distribution", figure_html(rewards(data), "rewards") if data.rewards
                         else note(f"no rewards: {data.rows} rows in rollouts.jsonl")))
    parts.append(section("Phases", figure_html(phases(summary), "phases") if summary.get("phases")
                         else note("no phases recorded (summary.json missing or the run ended before its first)")))
    return page(f"gymlaunch {summary.get('run_id', run_dir.name)}", heading, parts)


def write(run_dir: str | Path) -> Path:
    """Writes ``<run_dir>/report.html`` from what the folder holds; returns its path."""
    run_dir = Path(run_dir)
    return write_page(run_dir / REPORT, render(run_dir, read(run_dir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.report", description=(
        "Write report.html in a run folder (or a sweep folder's comparison) from what the folder holds."))
    parser.add_argument("folder", type=Path, help="a run folder (summary.json, events.jsonl, rollouts.jsonl) "
                                                  "or a sweep folder (multirun.yaml)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"launcher.report: no such folder: {args.folder}", file=sys.stderr)
        return 2
    if (args.folder / "multirun.yaml").is_file():
        from launcher import sweep  # the sweep's comparison builds on this module's page

        print(sweep.write(args.folder).report)
    else:
        print(write(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
