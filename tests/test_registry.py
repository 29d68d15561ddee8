import json
import multiprocessing as mp
import os
import stat
import subprocess
import sys
import threading
import time

import pytest

from server.registry import Entry, Registry


def make_entry(replica=0, namespace="ns", service="policy", state="ready", heartbeat_at=None, port=8000):
    now = time.time()
    return Entry(
        namespace=namespace, service=service, replica=replica, model="m", host="127.0.0.1", port=port,
        engine="vllm", engine_version="0.32.0", job_id="1", node="n", pid=os.getpid(), state=state,
        started_at=now, heartbeat_at=now if heartbeat_at is None else heartbeat_at,
    )


def test_publish_read_remove_roundtrip(tmp_path):
    reg = Registry(tmp_path)
    entry = make_entry(replica=3)
    path = reg.publish(entry)
    assert path == tmp_path / "ns" / "policy" / "3-1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert reg.entries() == [entry]
    assert json.loads(path.read_text())["base_url"] == "http://127.0.0.1:8000/v1"
    assert reg.remove("ns", "policy", 3)
    assert reg.entries() == []
    assert not (tmp_path / "ns").exists()  # empty folders pruned
    assert not reg.remove("ns", "policy", 3)


def test_ready_filters_state_staleness_service_and_namespace(tmp_path):
    reg = Registry(tmp_path, ttl_s=30)
    reg.publish(make_entry(0))
    reg.publish(make_entry(1, state="starting"))
    reg.publish(make_entry(2, state="draining"))
    reg.publish(make_entry(3, heartbeat_at=time.time() - 31))
    reg.publish(make_entry(4, service="judge"))
    reg.publish(make_entry(5, namespace="other"))
    assert [e.replica for e in reg.ready("policy", "ns")] == [0]
    assert [e.replica for e in reg.ready("policy")] == [0, 5]
    assert len(reg.entries("ns")) == 5


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    reg = Registry(tmp_path)
    reg.publish(make_entry(0))
    folder = tmp_path / "ns" / "policy"
    (folder / "1.json").write_text('{"namespace": "ns", "service": "pol')  # torn write
    (folder / "2.json").write_text(json.dumps({"namespace": "ns"}))  # missing keys
    (folder / "3.json").write_text(json.dumps({**make_entry(3).to_json(), "state": "bogus"}))
    (folder / ".0.json.123.tmp").write_text("garbage")  # a writer's temp file is never read
    with caplog.at_level("WARNING"):
        entries = reg.entries()
    assert [e.replica for e in entries] == [0]
    assert sum("skipping unreadable registry entry" in r.message for r in caplog.records) == 3


def test_heartbeat_refreshes_a_stale_entry(tmp_path):
    reg = Registry(tmp_path, ttl_s=10)
    entry = make_entry(0, heartbeat_at=time.time() - 60)
    reg.publish(entry)
    assert reg.ready("policy") == []
    reg.heartbeat(entry, state="ready")
    assert [e.replica for e in reg.ready("policy")] == [0]


def _writer(root, replica, rounds):
    reg = Registry(root)
    entry = make_entry(replica, port=9000 + replica)
    for i in range(rounds):
        entry.started_at = float(i)
        reg.heartbeat(entry)


def _reader(root, rounds, queue):
    reg = Registry(root)
    seen_bad = 0
    for _ in range(rounds):
        for e in reg.entries():
            if e.port != 9000 + e.replica:
                seen_bad += 1
    queue.put(seen_bad)


def test_concurrent_writers_and_readers_in_several_processes(tmp_path, caplog):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(tmp_path), r, 300)) for r in range(4)]
    readers = [ctx.Process(target=_reader, args=(str(tmp_path), 300, queue)) for _ in range(2)]
    for p in writers + readers:
        p.start()
    for p in writers + readers:
        p.join(60)
        assert p.exitcode == 0
    assert [queue.get(timeout=5) for _ in readers] == [0, 0]
    entries = Registry(tmp_path).entries()
    assert [(e.replica, e.started_at) for e in entries] == [(r, 299.0) for r in range(4)]
    assert not list((tmp_path / "ns" / "policy").glob(".*.tmp"))


def test_wait_times_out_with_a_message_naming_the_service(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(make_entry(0))
    assert len(reg.wait("policy", 1, timeout_s=1)) == 1
    with pytest.raises(TimeoutError, match=r"1/2 replicas of service 'policy'"):
        reg.wait("policy", 2, timeout_s=0.3, poll_s=0.1)


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "server.registry", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_cli_urls_list_and_wait(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(make_entry(0, port=8001))
    reg.publish(make_entry(1, port=8002))
    out = _cli("--root", str(tmp_path), "urls", "policy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "http://127.0.0.1:8001/v1,http://127.0.0.1:8002/v1"
    listed = _cli("--root", str(tmp_path), "list")
    assert "8001" in listed.stdout and "policy" in listed.stdout
    assert _cli("--root", str(tmp_path), "wait", "policy", "--count", "2", "--timeout", "5").returncode == 0
    waited = _cli("--root", str(tmp_path), "wait", "policy", "--count", "3", "--timeout", "0.5")
    assert waited.returncode == 1 and "2/3 replicas" in waited.stderr
    missing = _cli("--root", str(tmp_path), "urls", "judge")
    assert missing.returncode == 1 and "no ready replica of service 'judge'" in missing.stderr


def test_cli_refuses_to_guess_between_namespaces(tmp_path):
    reg = Registry(tmp_path)
    reg.publish(make_entry(0, namespace="run-a", port=8001))
    reg.publish(make_entry(0, namespace="run-b", port=8002))
    env = {k: v for k, v in os.environ.items() if k != "GYMLAUNCH_NAMESPACE"}
    out = _cli("--root", str(tmp_path), "urls", "policy", env=env)
    assert out.returncode != 0 and "--namespace" in out.stderr and "run-a" in out.stderr
    out = _cli("--root", str(tmp_path), "--namespace", "run-b", "urls", "policy", env=env)
    assert out.stdout.strip() == "http://127.0.0.1:8002/v1"


def test_folders_are_private_and_api_keys_are_removed_with_the_namespace(tmp_path):
    reg = Registry(tmp_path / "root")
    key_path = reg.create_api_key("ns")
    entry = make_entry(0)
    entry.api_key_file = str(key_path)
    reg.publish(entry)
    for folder in (tmp_path / "root", tmp_path / "root" / "ns", tmp_path / "root" / "ns" / "policy"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = reg.entries()[0].read_api_key()
    assert key and len(key) >= 32 and key != Registry(tmp_path / "r2").create_api_key("ns").read_text()
    assert [e.replica for e in reg.entries("ns")] == [0]  # the key file is not taken for a service
    assert reg.remove_namespace("ns") == 1
    assert not (tmp_path / "root" / "ns").exists()


def test_the_pool_lock_file_lives_as_long_as_its_namespace(tmp_path):
    reg = Registry(tmp_path)
    lock_file = tmp_path / ".pool-a.lock"
    with reg.pool_lock("pool-a"):
        reg.create_api_key("pool-a")  # a pool launched under the lock
    assert lock_file.exists()
    with reg.pool_lock("pool-a"):
        reg.remove_namespace("pool-a")  # the last run stopped it
    assert not lock_file.exists() and list(tmp_path.iterdir()) == []


def test_a_run_waiting_on_a_removed_pool_lock_locks_again(tmp_path):
    reg = Registry(tmp_path)
    reg.create_api_key("pool-b")
    order: list[str] = []
    holding = threading.Event()

    def last_run_stops_the_pool() -> None:
        with reg.pool_lock("pool-b"):
            holding.set()
            time.sleep(0.3)  # the other run is now blocked on this lock file
            reg.remove_namespace("pool-b")
            order.append("stopped")

    stopper = threading.Thread(target=last_run_stops_the_pool)
    stopper.start()
    holding.wait(5)
    def third_run() -> None:
        with reg.pool_lock("pool-b"):
            order.append("third")

    with reg.pool_lock("pool-b"):
        order.append("joined")
        reg.create_api_key("pool-b")  # it launches a new pool
        # It holds the lock of the file now at the path, not of the removed one: a third run waits.
        third = threading.Thread(target=third_run)
        third.start()
        third.join(0.5)
        assert third.is_alive()
    third.join(5)
    stopper.join()
    assert order == ["stopped", "joined", "third"]
    assert (tmp_path / ".pool-b.lock").exists()  # its new pool lives: so does its lock


def test_a_replicas_successor_publishes_beside_it_and_each_removes_only_its_own(tmp_path):
    """A time-limit rollover: the old job and its successor serve the same replica index at once."""
    reg = Registry(tmp_path)
    old, successor = make_entry(replica=1), make_entry(replica=1, port=8001)
    successor.job_id = "2"
    reg.publish(old)
    reg.publish(successor)
    assert reg.entries() == [old, successor]
    assert reg.entry("ns", "policy", 1, "2") == successor
    reg.heartbeat(old, state="draining")
    assert [e.port for e in reg.ready("policy", "ns")] == [8001]
    assert reg.remove("ns", "policy", 1, "1")  # the old job's drain ends: its own entry only
    assert reg.entries() == [successor]
    assert reg.remove("ns", "policy", 1)  # without a job id: every job of the replica
    assert reg.entries() == [] and not (tmp_path / "ns").exists()
