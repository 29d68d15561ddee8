"""server.job.free_port: ports picked by jobs starting at once on one node stay apart (a node-local
record), also when the kernel would hand the same free port out again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from server import job
from tests.support import ROOT


def test_picks_from_processes_starting_at_once_are_distinct_and_recorded(tmp_path, monkeypatch):
    record = tmp_path / "picked.json"
    monkeypatch.setattr(job, "_PICKED_PORTS", record)
    pick = (f"import server.job as j, pathlib; j._PICKED_PORTS = pathlib.Path({str(record)!r}); "
            "print(*[j.free_port('127.0.0.1') for _ in range(20)])")
    procs = [subprocess.Popen([sys.executable, "-c", pick], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    ports = [int(p) for proc in procs for p in proc.communicate(timeout=60)[0].split()]
    assert len(ports) == len(set(ports)) == 120
    assert set(map(int, json.loads(record.read_text()))) == set(ports)


def test_a_recorded_port_is_not_picked_again_although_free(tmp_path, monkeypatch):
    record = tmp_path / "picked.json"
    monkeypatch.setattr(job, "_PICKED_PORTS", record)
    with socket.socket() as s:  # what the kernel handed out last: free again once closed
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
    record.write_text(json.dumps({str(taken): time.time(), "1": time.time() - job._PICK_WINDOW_S - 1}))
    picks = {job.free_port("127.0.0.1") for _ in range(200)}
    assert taken not in picks
    assert set(map(int, json.loads(record.read_text()))) == picks | {taken}  # the expired pick is dropped
