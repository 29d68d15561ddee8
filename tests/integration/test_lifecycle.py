"""Run lifecycle from any shell: status, down, and servers that outlive a killed launcher only
by the orphan grace period. Uses the stand-in server (server/standin.py, no model) through
``server=openai_command``, so these tests cost seconds, not vLLM starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.registry import Registry
from tests.support import ROOT, serve_standin, standin_pids, sweep, sweep_summaries


def cli(module: str, *args: str, registry_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, "--root", str(registry_root), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_servers_stop_themselves_after_the_launcher_is_killed(tmp_path):
    root = tmp_path / "registry"
    before = set(standin_pids())
    proc, url = serve_standin(tmp_path / "run", root)
    (namespace,) = Registry(root).namespaces()
    status = cli("launcher.status", registry_root=root)
    assert namespace in status.stdout and url in status.stdout and "ready" in status.stdout
    mine = set(standin_pids()) - before
    assert mine

    proc.send_signal(signal.SIGKILL)  # no teardown: the launcher's node is "lost"
    proc.wait()
    killed = time.monotonic()
    while set(standin_pids()) & mine or Registry(root).entries(namespace):
        assert time.monotonic() - killed < 30, "servers outlived their launcher"
        time.sleep(0.2)
    print(f"last server gone {time.monotonic() - killed:.1f}s after SIGKILL (orphan_grace_s=3)")
    # What the killed launcher could not clean (run records) goes with `down`.
    down = cli("launcher.down", namespace, registry_root=root)
    assert down.returncode == 0, down.stderr
    assert Registry(root).namespaces() == []


def test_down_from_another_shell_stops_a_running_launcher(tmp_path):
    root = tmp_path / "registry"
    proc, _ = serve_standin(tmp_path / "run", root, "run.name=downme")
    down = cli("launcher.down", "downme", registry_root=root)
    assert down.returncode == 0, down.stderr
    assert Registry(root).entries() == []
    out, _ = proc.communicate(timeout=60)
    # A stop, not a crash: the interrupt code, and no death report of the servers it stopped.
    assert proc.returncode == 130, out
    assert "stopped from another shell (stopped by launcher.down on" in out and "ended while in use" not in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and "launcher.down" in summary["error"]
    assert Registry(root).namespaces() == [] and list(root.iterdir()) == []


def test_a_sweep_with_one_server_config_starts_one_pool(tmp_path):
    root = tmp_path / "registry"
    out = sweep(tmp_path, root)
    assert out.returncode == 0, out.stdout + out.stderr
    first, second = sweep_summaries(tmp_path)
    assert first["status"] == second["status"] == "succeeded"
    assert first["namespace"] == second["namespace"] and first["run_id"] != second["run_id"]
    assert (first["joined_servers"], second["joined_servers"]) == (False, True)
    assert [s["job_id"] for s in first["servers"]] == [s["job_id"] for s in second["servers"]]
    assert first["gateway"]["job_id"] == second["gateway"]["job_id"]  # and one gateway
    assert first["collection"]["rollouts_written"] > 0 and second["collection"]["rollouts_written"] > 0
    # Torn down once the sweep ended (other tests' stand-ins may come and go meanwhile: look at ours).
    port = first["servers"][0]["base_url"].rsplit(":", 1)[1].split("/")[0]
    assert Registry(root).namespaces() == [] and not standin_pids(port)
    assert list(root.iterdir()) == []  # no lock file either
    assert "stopped: no run of the sweep uses them any more" in out.stdout
    assert "did not stop in time" not in out.stdout  # each job seen gone once it ended
