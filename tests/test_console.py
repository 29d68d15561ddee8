"""launcher.console: the live view of a big fleet stays a screenful."""

from __future__ import annotations

import io

from rich.console import Console

from launcher.console import LIVE_ROWS, servers_table
from launcher.gateways import GatewayStatus
from launcher.readiness import ReplicaStatus


class _Job:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


def _render(table) -> str:
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    return console.file.getvalue()


def test_a_big_fleet_live_shows_counts_and_the_replicas_not_ready_only():
    states = ["ready"] * 40 + ["checking"] * 14 + ["PENDING (Priority)"] * 10
    replicas = [ReplicaStatus(replica=i, job=_Job(f"7_{i}"), state=s) for i, s in enumerate(states)]
    text = _render(servers_table("policy", replicas, live=True))
    assert "service policy: 40 ready, 14 checking, 10 PENDING (Priority)" in text
    assert text.count(" 7_") == LIVE_ROWS and " 7_0 " not in text  # ready ones are counted, not listed
    assert "and 8 more not ready" in text
    assert _render(servers_table("policy", replicas)).count(" 7_") == 64  # the final table lists all


def test_a_small_fleet_live_lists_every_replica():
    replicas = [ReplicaStatus(replica=i, job=_Job(f"7_{i}"), state="ready") for i in range(3)]
    text = _render(servers_table("policy", replicas, live=True))
    assert text.count(" 7_") == 3 and "more not ready" not in text


def test_the_gateway_has_a_row_below_its_replicas_even_in_a_big_fleet():
    replicas = [ReplicaStatus(replica=i, job=_Job(f"7_{i}"), state="ready") for i in range(64)]
    gateway = GatewayStatus(job=_Job("8"), state="checking", restarts=1,
                            deaths=[{"job_id": "6", "reason": "job ended in use (FAILED)"}])
    lines = _render(servers_table("policy", replicas, live=True, gateway=gateway)).splitlines()
    row = next(line for line in lines if "gateway" in line)
    assert " 8 " in row and "checking" in row and "1 (job ended in use (FAILED))" in row


def test_a_gateway_that_never_got_ready_is_named_by_its_job_in_the_summary():
    from launcher.console import summary_table
    gateway = {"job_id": "1000002", "base_url": None, "restarts": 0, "rollovers": []}
    text = _render(summary_table({"run_id": "r", "namespace": "r", "status": "failed", "gateway": gateway,
                                 "phases": {}, "summary_path": "s.json"}))
    assert "job 1000002, never ready" in text and "None" not in text


def test_the_summary_gives_the_multi_turn_prefix_contiguity_when_some_rollout_had_two_calls():
    from launcher.console import summary_table
    base = {"run_id": "r", "namespace": "r", "status": "succeeded", "phases": {}, "summary_path": "s.json"}
    text = _render(summary_table({**base, "collection": {"prefix_contiguous": 11, "prefix_checked": 12}}))
    assert "multi-turn prefix contiguity" in text and "11/12 (92%)" in text
    assert "contiguity" not in _render(summary_table({**base, "collection": {"prefix_contiguous": 0,
                                                                            "prefix_checked": 0}}))


def test_an_interrupted_runs_summary_shows_rows_written_of_the_total_and_each_replicas_fate():
    from launcher.console import summary_table
    dead = {"job_id": "5", "reason": "killed by signal 9 (SIGKILL)", "when": "in use", "at": 1.0}
    servers = [
        {"replica": 0, "requests": 48, "retries": 2, "failures": 0, "deaths": [], "restarts": 0, "down_s": 0.0,
         "jobs": [{"job_id": "4", "served": True, "ended": None, "state": "ready"}]},
        {"replica": 1, "requests": 20, "retries": 0, "failures": 1, "deaths": [dead], "restarts": 1, "down_s": 34.04,
         "jobs": [{"job_id": "5", "served": True, "ended": "died in use: ..."},
                  {"job_id": "9", "served": False, "ended": None, "state": "starting"}]},
    ]
    text = " ".join(_render(summary_table({
        "run_id": "r", "namespace": "r", "status": "interrupted", "phases": {}, "summary_path": "s.json",
        "collection": None, "rollouts": {"written": 39, "total": 96, "failed": 1}, "servers": servers,
        "requests_counted_by": "gateway"})).split())
    assert "rollouts written │ 39/96" in text and "failures │ 1" in text, text
    assert "48 requests (2 retried) [gateway]; 0 deaths, 0 restarts, down 0.0s" in text, text
    assert "20 requests (1 failed) [gateway]; 1 death (killed by signal 9 (SIGKILL)), 1 restart, down 34.0s;" in text
    assert "job 9 never ready (starting)" in text, text  # the row wraps at 120 columns
