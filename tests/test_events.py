"""The run's state-change observer (launcher/events.py): what it records from consecutive looks."""

from __future__ import annotations

import json

from launcher.events import RunEvents, Seen, job_state


def recorded(tmp_path) -> list[tuple]:
    return [(e["who"], e["job_id"], e["state"], e["detail"])
            for e in map(json.loads, (tmp_path / "events.jsonl").read_text().splitlines())]


def test_each_change_once_and_a_superseded_job_replaced(tmp_path):
    lines: list[str] = []
    events = RunEvents(tmp_path, lines.append)
    events.phase("servers ready")
    events.observe([Seen("replica 0", "1", "SUBMITTED")])
    events.observe([Seen("replica 0", "1", "SUBMITTED")])  # no change: nothing
    events.observe([Seen("replica 0", "1", *job_state("PENDING (Resources)"))])
    events.observe([Seen("replica 0", "1", "UNKNOWN")])  # Slurm's accounting lagging: no change, no end
    events.observe([Seen("replica 0", "1", "ready")])
    events.observe([Seen("replica 0", "1", *job_state("died: exited with code 3"))], {"1": "exited with code 3"})
    events.observe([Seen("replica 0", "2", "SUBMITTED")], {"1": "exited with code 3"})  # its replacement
    events.end("succeeded")
    assert recorded(tmp_path) == [
        ("run", None, "servers ready", None),
        ("replica 0", "1", "SUBMITTED", None),
        ("replica 0", "1", "PENDING", "Resources"),
        ("replica 0", "1", "ready", None),
        ("replica 0", "1", "dead", "exited with code 3"),
        ("replica 0", "2", "SUBMITTED", None),
        ("replica 0", "1", "replaced", "by job 2"),
        ("run", None, "end", "succeeded"),
    ]
    assert len(lines) == 8 and lines[2].endswith(" replica 0 (job 1): PENDING (Resources)"), lines


def test_a_successor_that_died_starting_is_dead_not_replaced(tmp_path):
    events = RunEvents(tmp_path, None)
    events.observe([Seen("gateway", "1", "ready"), Seen("gateway", "2", "starting")])
    events.observe([Seen("gateway", "1", "ready")], {"2": "job ended starting"})
    assert recorded(tmp_path)[-1] == ("gateway", "2", "dead", "job ended starting")


def test_progress_lines_on_a_change_at_most_every_few_seconds_and_the_last_always(tmp_path):
    lines: list[str] = []
    events = RunEvents(tmp_path, lines.append)
    for written in range(10):
        events.progress(written, 10, 0)
    events.progress(10, 10, 0, final=True)
    assert [line.split(" ", 2)[2] for line in lines] == ["rollouts: 0/10 written, 0 failed",
                                                         "rollouts: 10/10 written, 0 failed"]
    assert not (tmp_path / "events.jsonl").exists()  # progress is rollouts.jsonl's to record, not an event
