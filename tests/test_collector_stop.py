"""The collector stopped by a signal (a cancel's SIGTERM, a Ctrl-C's SIGINT): it stops within a
moment, even with requests in flight, leaves whole lines only, and a re-run completes each (task,
repeat) exactly once. Against stand-in servers on threads of this process; the signals are real
(sent to this process, handled in the main thread where ``collect`` runs)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from jobs import rollouts
from jobs.rollouts import CollectionStopped, CollectorConfig, SamplingParams, collect
from server.registry import Registry
from tests.support import publish

TASKS, REPEATS = 6, 2
EVERY = sorted((f"t{i}", r) for i in range(TASKS) for r in range(REPEATS))


def _tasks(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"t{i}", "responses_create_params": {"input": f"What is {i} + 1?"},
                    "verifier": {"name": "number", "expected": i + 1}}) + "\n"
        for i in range(TASKS)
    ))
    return path


@pytest.fixture
def setup(tmp_path, standins):
    server = standins(1)[0]
    root = tmp_path / "registry"
    publish(root, [server])
    cfg = CollectorConfig(
        tasks=str(_tasks(tmp_path)), output_dir=str(tmp_path / "out"), namespace="run1", registry=Registry(root),
        num_repeats=REPEATS, max_concurrency=3, sampling=SamplingParams(max_tokens=16),
    )
    return server, cfg


def _lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends mid-line"
    return data.splitlines(keepends=True)


def _keys(path: Path) -> list[tuple[str, int]]:
    return [(row["task_id"], row["repeat"]) for row in map(json.loads, _lines(path))]


def _signal_when(condition, sig: int, timeout_s: float = 20.0) -> dict:
    """A thread that sends ``sig`` to this process once ``condition()`` holds; returns when it did."""
    sent: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, daemon=True).start()
    return sent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_collection_at_once_and_a_rerun_finishes_it(setup, sig, monkeypatch):
    server, cfg = setup
    out = Path(cfg.output_dir)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    # Two rows written, then every answer is held (closed by the collector's own writer, so no
    # third answer can slip through): conversations are in flight, none can end.
    write, written = rollouts._JsonlAppender.write, []

    def write_then_hold(self, row: dict) -> None:
        write(self, row)
        written.append(row)
        if len(written) == 2:
            server.gate.clear()

    monkeypatch.setattr(rollouts._JsonlAppender, "write", write_then_hold)
    sent = _signal_when(lambda: len(written) >= 2 and server.running >= 1, sig)
    with pytest.raises(CollectionStopped, match=rf"stopped by {sig.name} .* a re-run on .* does the rest") as stopped:
        collect(cfg)
    took = time.monotonic() - sent["at"]
    print(f"collect raised {took * 1000:.0f} ms after {sig.name}, with {server.running} answers held")
    assert took < 1.0
    assert stopped.value.signum == sig
    assert {s: signal.getsignal(s) for s in before} == before  # the caller's handlers are back

    first = _keys(out / rollouts.ROLLOUTS_FILE)
    assert 2 <= len(first) < len(EVERY) and len(set(first)) == len(first)
    assert _lines(out / rollouts.FAILURES_FILE) == []  # a cancelled conversation is no failure

    server.gate.set()
    again = collect(cfg)
    assert sorted(_keys(out / rollouts.ROLLOUTS_FILE)) == EVERY  # each exactly once
    assert again.rollouts_written_this_run == len(EVERY) - len(first) and again.failures == 0


def test_a_signal_during_a_row_write_leaves_that_row_whole(setup, monkeypatch):
    """The handler only takes note: the row being written when the signal lands is written whole."""
    server, cfg = setup
    write = rollouts._JsonlAppender.write
    rows = []

    def signalled_while_writing(self, row: dict) -> None:
        rows.append(row)
        if len(rows) == 3:
            server.gate.clear()  # the others stay in flight
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs inside this write
        write(self, row)

    monkeypatch.setattr(rollouts._JsonlAppender, "write", signalled_while_writing)
    with pytest.raises(CollectionStopped):
        collect(cfg)
    monkeypatch.setattr(rollouts._JsonlAppender, "write", write)
    path = Path(cfg.output_dir) / rollouts.ROLLOUTS_FILE
    written = _keys(path)
    assert written[:3] == [(r["task_id"], r["repeat"]) for r in rows[:3]]

    server.gate.set()
    collect(cfg)
    assert sorted(_keys(path)) == EVERY


def test_a_signal_before_any_conversation_starts_none(setup, monkeypatch):
    server, cfg = setup
    real_run = rollouts._Run.all

    async def signalled_first(self, attempts, stop):
        os.kill(os.getpid(), signal.SIGTERM)
        return await real_run(self, attempts, stop)

    monkeypatch.setattr(rollouts._Run, "all", signalled_first)
    with pytest.raises(CollectionStopped, match=f"0 rollouts and 0 failures written this run, {len(EVERY)} left"):
        collect(cfg)
    assert server.requests == [] or all(r.path != "/v1/chat/completions" for r in server.requests)


def test_a_collection_that_ends_is_not_stopped(setup):
    """No signal: the summary, as before; the handlers are the caller's again afterwards."""
    _, cfg = setup
    before = signal.getsignal(signal.SIGTERM)
    summary = collect(cfg)
    assert summary.rollouts_written_this_run == len(EVERY)
    assert signal.getsignal(signal.SIGTERM) is before


def test_collect_in_another_thread_installs_no_handler(setup):
    """Python runs signal handlers in the main thread only: elsewhere collect leaves them alone."""
    _, cfg = setup
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=collect(cfg)))
    thread.start()
    thread.join(30)
    assert result["summary"].rollouts_written_this_run == len(EVERY)
