"""A sweep's comparison: at the end of a multirun (``python -m launcher -m key=a,b ...``) one table
of its points (the overrides that differ between them, status, rollouts, failures, mean reward,
generated tokens/s), printed and written to the sweep folder: ``sweep.json``, ``sweep.csv`` and
``report.html`` (the points side by side: mean reward and tokens/s against the swept values).

``SweepTable`` is a Hydra callback (conf/config.yaml ``hydra.callbacks``): Hydra calls its
``on_multirun_end`` in the process that ran the sweep once every point has ended, with the
basic launcher and with hydra/launcher=submitit_* alike; the points are read from their folders
(``summary.json``, which records the point's ``overrides``; a point without one, from Hydra's
``.hydra/overrides.yaml``), so it sees what the points wrote wherever they ran.
A point that fails is one result of the sweep, not its end (``launcher.__main__.run``): the other
points still run, the table shows it beside them, and the sweep exits 1 at its end
(``SweepTable.not_succeeded``). An interrupted point (Ctrl-C) ends the sweep at once, before
``on_multirun_end``: ``python -m launcher.report <sweep folder>`` writes the comparison of the points
that ran.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from plotly.subplots import make_subplots
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher import report

METRICS = (("mean_reward", "mean reward"), ("generated_tokens_per_s", "generated tokens/s"))


@dataclass
class Point:
    folder: str  # relative to the sweep folder: Hydra's subdir (the job's number by default)
    overrides: list[str]
    status: str  # the run's, or "no summary" (the point did not finish)
    rollouts_written: int | None
    failures: int | None
    mean_reward: float | None
    generated_tokens_per_s: float | None

    @property
    def values(self) -> dict[str, str]:
        """key -> value of each ``key=value`` override (``+key``/``++key`` as key; ``~key`` deleted: "~")."""
        found = {}
        for override in self.overrides:
            key, eq, value = override.partition("=")
            found[key.lstrip("+~")] = value if eq else "~"
        return found


@dataclass
class Comparison:
    points: list[Point]
    swept: list[str]  # the override keys whose values differ between the points
    json: Path
    csv: Path
    report: Path


def _natural(path: Path) -> list:
    """``2`` before ``10``: Hydra numbers its points."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def points(sweep_dir: Path) -> list[Point]:
    """Each folder below ``sweep_dir`` that a point of the sweep wrote (Hydra's ``.hydra`` or a summary)."""
    folders = {p.parent for p in sweep_dir.glob("**/summary.json")}
    folders |= {p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")}
    found = []
    for folder in sorted(folders, key=_natural):
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (FileNotFoundError, ValueError):
            summary = None
        overrides = (summary or {}).get("overrides")
        if overrides is None:
            try:
                overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or []
            except (FileNotFoundError, yaml.YAMLError):
                overrides = []
        collection = (summary or {}).get("collection") or {}
        found.append(Point(
            folder=str(folder.relative_to(sweep_dir)), overrides=[str(o) for o in overrides],
            status=summary["status"] if summary else "no summary",
            rollouts_written=collection.get("rollouts_written"), failures=collection.get("failures"),
            mean_reward=collection.get("mean_reward"),
            generated_tokens_per_s=collection.get("generated_tokens_per_s"),
        ))
    return found


def swept(found: list[Point]) -> list[str]:
    """The keys set differently by some point (or by some and not others), in command-line order."""
    keys = list(dict.fromkeys(k for p in found for k in p.values))
    return [k for k in keys if len({p.values.get(k) for p in found}) > 1]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def rows(found: list[Point], keys: list[str]) -> tuple[list[str], list[list]]:
    """The comparison as header and rows, the same in every form it takes."""
    header = ["point", *keys, "status", "rollouts", "failures", "mean reward", "tokens/s"]
    return header, [[p.folder, *(p.values.get(k, "") for k in keys), p.status, p.rollouts_written, p.failures,
                     _fmt(p.mean_reward), _fmt(p.generated_tokens_per_s)] for p in found]


def table(sweep_dir: Path, found: list[Point], keys: list[str]) -> Table:
    header, body = rows(found, keys)
    t = Table(title=escape(f"sweep {sweep_dir}: {len(found)} points"), title_justify="left")
    for name in header:
        t.add_column(escape(name), justify="right" if name in ("rollouts", "failures", "mean reward", "tokens/s") else "left")
    for row in body:
        t.add_row(*(escape("" if v is None else str(v)) for v in row))
    return t


def _label(point: Point, keys: list[str]) -> str:
    """The point's swept values (one key: its value alone, the axis names the key)."""
    if len(keys) == 1:
        return point.values.get(keys[0], "")
    return ", ".join(f"{k}={point.values.get(k, '')}" for k in keys) or point.folder


def render(sweep_dir: Path, found: list[Point], keys: list[str]) -> str:
    header, body = rows(found, keys)
    parts = [report.section("Points", report.grid_table(header, body))]
    measured = [p for p in found if any(getattr(p, m) is not None for m, _ in METRICS)]
    if measured:
        fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=[title for _, title in METRICS])
        labels = [_label(p, keys) for p in measured]
        for col, (metric, title) in enumerate(METRICS, start=1):
            fig.add_bar(x=labels, y=[getattr(p, metric) for p in measured], name=title, row=1, col=col,
                        text=[_fmt(getattr(p, metric)) for p in measured], textposition="auto")
        report.layout(fig, 420, showlegend=False, margin=dict(l=10, r=10, t=40, b=40))
        fig.update_xaxes(title=", ".join(keys) or "point", type="category")
        parts.append(report.section("Mean reward and generated tokens/s against the swept values",
                                    report.figure_html(fig, "sweep")))
    else:
        parts.append(report.note("no point recorded a mean reward or tokens/s (no rollouts collected)"))
    heading = html.escape(f"sweep {sweep_dir}: {len(found)} points")
    return report.page(f"gymlaunch sweep {sweep_dir.name}", heading, parts)


def write(sweep_dir: str | Path) -> Comparison:
    """Writes sweep.json, sweep.csv and report.html into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    found = points(sweep_dir)
    keys = swept(found)
    json_path = sweep_dir / "sweep.json"
    json_path.write_text(json.dumps({"swept": keys, "points": [asdict(p) for p in found]}, indent=2) + "\n")
    header, body = rows(found, keys)
    out = io.StringIO()
    csv.writer(out).writerows([header, *body])
    csv_path = sweep_dir / "sweep.csv"
    csv_path.write_text(out.getvalue())
    html_path = report.write_page(sweep_dir / report.REPORT, render(sweep_dir, found, keys))
    return Comparison(found, keys, json_path, csv_path, html_path)


class SweepTable(Callback):
    """Hydra callback: the comparison of a multirun's points once they have all ended."""

    # The folders of the last sweep's points that did not succeed, for the sweep's exit code: read from
    # what the points wrote, so it holds wherever they ran (hydra/launcher=submitit_* runs them in jobs).
    not_succeeded: list[str] = []

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        comparison = write(sweep_dir)
        SweepTable.not_succeeded = [p.folder for p in comparison.points if p.status != "succeeded"]
        console = Console()
        shown = table(sweep_dir, comparison.points, comparison.swept)
        if not console.is_terminal:  # a log, CI: nothing limits the width, so the table whole, not squeezed into 80 columns
            console.width = max(console.width, console.measure(shown, options=console.options.update_width(1000)).maximum)
        console.print(shown)
        console.print(escape(f"sweep comparison: {comparison.report} (and {comparison.csv.name}, {comparison.json.name})"),
                      soft_wrap=True)
