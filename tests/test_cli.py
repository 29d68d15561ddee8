"""The command lines: options before or after a subcommand, and refusals that touch nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.down import DownError, down
from server.registry import Entry, Registry

ROOT = Path(__file__).resolve().parents[1]


def _entry(namespace: str, job_id: str, cluster: str, port: int = 8001) -> Entry:
    now = time.time()
    return Entry(
        namespace=namespace, service="policy", replica=0, model="m", host="127.0.0.1", port=port, engine="vllm",
        engine_version="0", job_id=job_id, node="n", pid=os.getpid(), state="ready", started_at=now,
        heartbeat_at=now, cluster=cluster,
    )


def _registry_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GYMLAUNCH_NAMESPACE"}
    return subprocess.run([sys.executable, "-m", "server.registry", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("order", ["options first", "options last"])
def test_registry_cli_takes_options_before_or_after_the_subcommand(tmp_path, order):
    Registry(tmp_path).publish(_entry("run-a", "pid:1", cluster="", port=8001))
    Registry(tmp_path).publish(_entry("run-b", "pid:1", cluster="", port=8002))
    options = ["--root", str(tmp_path), "--namespace", "run-b"]
    argv = [*options, "urls", "policy"] if order == "options first" else ["urls", "policy", *options]
    out = _registry_cli(*argv)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "http://127.0.0.1:8002/v1"


def test_an_option_after_the_subcommand_does_not_reset_one_before_it(tmp_path):
    Registry(tmp_path).publish(_entry("run-a", "pid:1", cluster=""))
    out = _registry_cli("--root", str(tmp_path), "wait", "policy", "--count", "1", "--timeout", "5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "http://127.0.0.1:8001/v1"


def test_down_refuses_a_job_id_whose_scheduler_is_unknown(tmp_path, monkeypatch):
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    registry = Registry(tmp_path)
    registry.publish(_entry("run-y", "1", cluster=""))  # an entry that does not say which scheduler runs job 1

    with pytest.raises(DownError, match="cancel it yourself"):
        down(registry, "run-y", wait_s=1)

    assert sent == []
    assert [e.job_id for e in registry.entries("run-y")] == ["1"]  # nothing removed either
