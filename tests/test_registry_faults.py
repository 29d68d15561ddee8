"""What the shared filesystem and its other users can do to the registry, and what survives it: a
folder pruned under a writer, an entry with a field of the wrong type, a name that would make a
path outside its folder, a folder replaced by a file for a moment (a hiccup), a root that cannot be
used. (The same hiccup in a whole launcher run: tests/integration/test_registry_outage.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from server.checks import Checks
from server.job import EngineFailed, EntryHeartbeat
from server.registry import Entry, Registry, gateway_service
from tests.support import ROOT, entry, replaced_by_a_file

PUBLISHES = 600  # per writer: before, 6 to 17 of 2,000 publishes failed with two writers


def test_two_writers_publishing_and_removing_in_one_service_folder_never_fail(tmp_path):
    """Before: 70 FileNotFoundError in ~7,000 publishes (6 to 17 in 2,000 here): one writer's remove
    pruned the folder between the other's mkdir and its temp file's open."""
    failures: list[OSError] = []

    def publish_and_remove(replica: int) -> None:
        registry, mine = Registry(tmp_path), entry(replica)
        for _ in range(PUBLISHES):
            try:
                registry.publish(mine)
                registry.remove(mine.namespace, mine.service, mine.replica, mine.job_id)
            except OSError as e:
                failures.append(e)

    writers = [threading.Thread(target=publish_and_remove, args=(replica,)) for replica in (0, 1)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert failures == []
    assert list(tmp_path.iterdir()) == []  # and the empty folders were still pruned


def test_an_entry_with_a_mistyped_field_is_skipped_naming_the_file_and_the_field(tmp_path, caplog):
    """Before: ``heartbeat_at: "soon"`` made ``registry list`` and ``urls`` exit 1 with a TypeError."""
    registry = Registry(tmp_path)
    registry.publish(entry(0, port=8000))
    folder = tmp_path / "run1" / "policy"
    bad = {"1-x.json": ("heartbeat_at", "soon"), "2-x.json": ("port", "x"), "3-x.json": ("state", 5),
           "4-x.json": ("engine_pid", "12"), "5-x.json": ("replica", True)}
    for name, (field, value) in bad.items():
        (folder / name).write_text(json.dumps({**entry(int(name[0])).to_json(), field: value}))
    (folder / "6-x.json").write_text("[1, 2]")
    with caplog.at_level("WARNING"):
        assert [e.port for e in registry.entries()] == [8000]
    for name, (field, value) in bad.items():
        assert any(name in r.message and f"{field}:" in r.message for r in caplog.records), (name, caplog.text)
    for command in (["list"], ["urls", "policy"]):
        out = subprocess.run([sys.executable, "-m", "server.registry", "--root", str(tmp_path), *command],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "127.0.0.1:8000" in out.stdout
        assert "heartbeat_at: expected float, got 'soon'" in out.stderr


def test_the_optional_and_numeric_fields_take_what_writers_write(tmp_path):
    written = {**entry(0).to_json(), "engine_pid": None, "api_key_file": None, "heartbeat_at": 12, "started_at": 1.5}
    assert Entry.from_json(written).heartbeat_at == 12


@pytest.mark.parametrize("name", ["..", "../../escape", ".hidden", "a/b", "a..b", "", "x\0y", "é"])
def test_names_that_would_make_a_path_elsewhere_are_refused(tmp_path, name):
    """Before: ``server.service=..`` wrote entries into the root, a namespace ``../../escape`` two
    levels above it. Library users get a ValueError (the launcher refuses before: test_refusals)."""
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match="must match"):
        registry.publish(entry(0, service=name))
    with pytest.raises(ValueError, match="must match"):
        registry.publish(entry(0, namespace=name))
    with pytest.raises(ValueError, match="must match"):
        registry.create_api_key(name)
    if name:  # no namespace: every one
        with pytest.raises(ValueError, match="must match"):
            registry.entries(name)
    with pytest.raises(ValueError):
        registry.admit("run1", "policy", 0, "../x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["--namespace", "../x", "list"], ["urls", ".."]])
def test_the_cli_refuses_such_a_name_as_a_usage_error(tmp_path, command):
    out = subprocess.run([sys.executable, "-m", "server.registry", "--root", str(tmp_path), *command],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must match" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_gateways_service_name_is_a_name(tmp_path):
    registry = Registry(tmp_path)
    registry.publish(entry(0, service=gateway_service("policy")))
    assert [e.service for e in registry.entries()] == ["policy@gateway"]


def test_a_folder_no_writer_could_have_named_breaks_no_listing(tmp_path):
    """Someone's ``mkdir 'a b'`` in the root or in a namespace is no namespace or service: passed over."""
    registry = Registry(tmp_path)
    registry.publish(entry(0))
    (tmp_path / "a b").mkdir()
    (tmp_path / "run1" / "x y").mkdir()
    assert registry.namespaces() == ["run1"]
    assert [(e.namespace, e.service) for e in registry.entries()] == [("run1", "policy")]


@pytest.mark.parametrize("make", ["a file", "under a file"])
def test_a_registry_root_that_cannot_be_used_is_named(tmp_path, make):
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" if make == "a file" else tmp_path / "file" / "registry"
    checks = Checks("registry")
    Registry(root).validate(checks)
    assert checks.errors == [f"registry.root: {root}" + (" is not a folder" if make == "a file" else
                                                         f" cannot be created: {tmp_path / 'file'} is not a folder")]
    checks = Checks("registry")
    Registry(tmp_path / "new" / "registry").validate(checks)
    assert checks.errors == [] and not (tmp_path / "new").exists()


def test_a_heartbeat_survives_a_hiccup_and_fails_only_past_the_ttl(tmp_path):
    """Before: one write that failed (the service folder unusable for a moment) killed the replica."""
    registry = Registry(tmp_path / "registry", heartbeat_s=0.05, ttl_s=0.3)
    mine = entry(0, state="healthy")
    beat = EntryHeartbeat(registry, mine)
    beat()
    folder = tmp_path / "registry" / "run1" / "policy"
    with replaced_by_a_file(folder, tmp_path / "away"):
        beat(state="ready")  # not written: kept for the next beat
        beat()
    beat()
    assert registry.entries()[0].state == "ready"
    with replaced_by_a_file(folder, tmp_path / "away"):
        beat()
        time.sleep(registry.ttl_s)
        with pytest.raises(EngineFailed, match=r"could not be written for \ds, longer than registry.ttl_s"):
            beat()


def test_an_owner_heartbeat_and_the_teardowns_removals_survive_a_hiccup(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.create_api_key("run1")
    registry.publish(entry(0))
    namespace = tmp_path / "registry" / "run1"
    owner = registry.owner_heartbeat("run1", "run-a").start()
    with replaced_by_a_file(namespace / ".owners", tmp_path / "away"):
        owner.stop()  # its file then ages out, as a killed launcher's
    (namespace / "policy").rename(tmp_path / "away")
    (namespace / "policy").write_text("")
    assert registry.remove_namespace("run1") == 0  # the entry unseen for now: the whole folder goes
    assert not registry.namespace_exists("run1")
