"""server.job.free_port: ports picked by jobs starting at once on one node stay apart (a node-local
record), also when the kernel would hand the same free port out again; and nothing another local
user does in the shared temp folder makes a pick fail, hang, or write through a link.

Each test gives the code under test a temp folder of its own (``TMPDIR``, no ``XDG_RUNTIME_DIR``),
where the record lives in ``gymlaunch-<uid>/``. Another local user is played by root giving files
to uid 65534 (``nobody``), and, where root's own rights would hide the failure, by a pick run as
uid 65534 in a temp folder root wrote into first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from server import job
from tests.support import ROOT

OTHER_UID = 65534
PICK = "import server.job as j; print(*[j.free_port('127.0.0.1') for _ in range({n})])"
as_root = pytest.mark.skipif(os.getuid() != 0, reason="plays another local user: needs root")


@pytest.fixture
def tmp_dir(tmp_path, monkeypatch) -> Path:
    """The temp folder free_port sees, here and in the processes the test starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(job, "_fallback_dir", None, raising=False)
    return tmp_path


def record_of(tmp_dir: Path, uid: int | None = None) -> Path:
    return tmp_dir / f"gymlaunch-{os.getuid() if uid is None else uid}" / "gymlaunch-picked-ports.json"


def picks(n: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PICK.format(n=n)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [int(p) for p in out.stdout.split()]


def test_picks_from_processes_starting_at_once_are_distinct_and_recorded(tmp_dir):
    procs = [subprocess.Popen([sys.executable, "-c", PICK.format(n=20)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    ports = [int(p) for proc in procs for p in proc.communicate(timeout=60)[0].split()]
    assert len(ports) == len(set(ports)) == 120
    assert set(map(int, json.loads(record_of(tmp_dir).read_text()))) == set(ports)
    folder = record_of(tmp_dir).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(record_of(tmp_dir).stat().st_mode) == 0o600


def test_a_recorded_port_is_not_picked_again_although_free(tmp_dir):
    with socket.socket() as s:  # what the kernel handed out last: free again once closed
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
    record = record_of(tmp_dir)
    record.parent.mkdir(mode=0o700)
    record.write_text(json.dumps({str(taken): time.time(), "1": time.time() - job._PICK_WINDOW_S - 1}))
    picked = {job.free_port("127.0.0.1") for _ in range(200)}
    assert taken not in picked
    assert set(map(int, json.loads(record.read_text()))) == picked | {taken}  # the expired pick is dropped


@as_root
def test_a_record_another_user_made_first_fails_no_pick():
    """Before: the record was /tmp/gymlaunch-picked-ports-<uid>.json; another user who made it
    first (0600, theirs) made every server job of the victim fail with PermissionError."""
    shared = Path(tempfile.mkdtemp(prefix="free-port-shared-"))  # a /tmp of its own, as /tmp: 1777
    try:
        shared.chmod(0o1777)
        # Root, the other user here, got there first: where the victim's record was before (named by
        # the uid at import, which is root's in this process), and where it is now.
        for name in (f"gymlaunch-picked-ports-{os.getuid()}.json", f"gymlaunch-{OTHER_UID}"):
            (shared / name).write_text("{}")
            (shared / name).chmod(0o600)
        # The interpreter is root's (a folder nobody cannot read): the pick drops to the victim's uid
        # once its modules are loaded.
        as_victim = f"import os, server.job as j; os.setgid({OTHER_UID}); os.setuid({OTHER_UID}); "
        out = subprocess.run([sys.executable, "-c", as_victim + PICK.format(n=3).split("; ", 1)[1]], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(shared)})
        assert out.returncode == 0, out.stderr
        assert len(set(map(int, out.stdout.split()))) == 3
    finally:
        shutil.rmtree(shared)


@as_root
def test_another_users_folder_in_the_records_place_is_not_used(tmp_dir, caplog):
    folder = record_of(tmp_dir).parent
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    os.chown(folder, OTHER_UID, OTHER_UID)
    with caplog.at_level("WARNING"):
        first, second = job.free_port("127.0.0.1"), job.free_port("127.0.0.1")
    assert first != second  # the process's own private folder keeps its picks apart
    assert list(folder.iterdir()) == []
    assert "is not a private folder of this user's" in caplog.text
    private = job._private_node_dir()
    assert private != folder and stat.S_IMODE(private.stat().st_mode) == 0o700


@as_root
def test_another_users_file_in_the_records_place_is_not_used(tmp_dir, caplog):
    record = record_of(tmp_dir)
    record.parent.mkdir(mode=0o700)
    record.write_text("theirs")
    os.chown(record, OTHER_UID, OTHER_UID)
    with caplog.at_level("WARNING"):
        assert job.free_port("127.0.0.1") > 0
    assert record.read_text() == "theirs"
    assert "is not this user's own file" in caplog.text


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_link_planted_in_the_records_place_is_not_followed(tmp_dir, tmp_path_factory, where):
    """Before: a link at /tmp/gymlaunch-picked-ports-<uid>.json made the pick overwrite the file it
    pointed at (any file of the victim's)."""
    victims = tmp_path_factory.mktemp("victim")
    victim = victims / "precious.txt"
    victim.write_text("the victim's own data")
    record = record_of(tmp_dir)
    if where == "file":
        record.parent.mkdir(mode=0o700)
        record.symlink_to(victim)
        os.symlink(victim, tmp_dir / f"gymlaunch-picked-ports-{os.getuid()}.json")  # where it was before
    else:
        record.parent.symlink_to(victims, target_is_directory=True)
        os.symlink(victim, victims / record.name)
    assert len(set(picks(3))) == 3
    assert victim.read_text() == "the victim's own data"


def test_a_lock_held_too_long_delays_a_pick_but_never_blocks_it(tmp_dir):
    """Before: another process holding the record's lock (as the other user could, on the shared
    file) blocked every pick for as long as it liked."""
    record = record_of(tmp_dir)
    record.parent.mkdir(mode=0o700)
    record.write_text("{}")
    os.symlink(record, tmp_dir / f"gymlaunch-picked-ports-{os.getuid()}.json")  # where the record was before
    holder = os.open(record, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, "-c", "import logging, server.job as j; logging.basicConfig(); "
                              "j._PICK_LOCK_TIMEOUT_S = 0.5; print(j.free_port('127.0.0.1'))"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        os.close(holder)
    assert out.returncode == 0 and int(out.stdout) > 0, out.stderr
    assert "stayed locked" in out.stderr
