"""When a replica rolls over to a successor, and when a job's end was its time limit (launcher/fleet.py)."""

import pytest

from launcher.fleet import ended_at_limit, rollover_lead


def test_a_configured_lead_wins_and_zero_turns_rollovers_off():
    assert rollover_lead(40, signal_delay_s=15, time_limit_s=60, slowest_start_s=500) == 40
    assert rollover_lead(0, signal_delay_s=15, time_limit_s=60, slowest_start_s=None) == 0


@pytest.mark.parametrize("slowest_start_s,lead", [
    (None, 120 + 60 + 3 * 60),  # nothing started yet: a minute assumed
    (20, 120 + 60 + 3 * 20),  # Slurm's warning (up to a minute early) plus three starts of the slowest replica
    (3000, 4 * 3600 / 2),  # a slow start never takes more than half the limit
])
def test_the_automatic_lead_leaves_room_for_a_start_before_slurms_warning(slowest_start_s, lead):
    assert rollover_lead(None, signal_delay_s=120, time_limit_s=4 * 3600, slowest_start_s=slowest_start_s) == lead


@pytest.mark.parametrize("state,now,ends_at,expected", [
    ("TIMEOUT", 0, None, True),  # Slurm says so
    ("COMPLETED", 100, 110, True),  # drained at the warning (15 s before the limit)
    ("COMPLETED", 100, 170, True),  # Slurm may send the warning up to a minute early
    ("COMPLETED", 100, 200, False),  # ended long before its warning could come: a death
    ("CANCELLED by 0", 100, 200, False),
    ("FAILED", 100, None, False),  # never seen running with a limit
])
def test_a_job_ended_at_its_limit_when_slurm_says_so_or_once_its_warning_was_due(state, now, ends_at, expected):
    assert ended_at_limit(state, now, ends_at, signal_delay_s=15) is expected
