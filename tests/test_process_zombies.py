"""server.process.kill_when_alive: a process (or group) that has exited is gone, even while it is
a zombie nobody reaped yet (init reaps orphaned engine workers on its own schedule)."""

import os
import signal
import subprocess
import time

from server.process import kill_when_alive


def test_a_zombie_group_is_not_waited_for():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)  # its own group, as an engine's
    try:
        os.kill(child.pid, signal.SIGKILL)
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        t0 = time.monotonic()
        kill_when_alive(child.pid, group=True, wait_s=5)
        kill_when_alive(child.pid, group=False, wait_s=5)
        assert time.monotonic() - t0 < 0.5
    finally:
        child.kill()
        child.wait()


def test_a_running_group_is_killed_after_the_wait():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        t0 = time.monotonic()
        kill_when_alive(child.pid, group=True, wait_s=0.3)
        assert child.wait(5) == -signal.SIGKILL and time.monotonic() - t0 >= 0.3
    finally:
        child.kill()
        child.wait()
