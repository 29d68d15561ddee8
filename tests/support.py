"""What several test modules share. Test modules import this (and get fixtures from conftest.py),
never each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from server.engines import EngineSpec
from server.registry import Entry, Registry

ROOT = Path(__file__).resolve().parents[1]

# Stand-in replicas of one service, as the unit tests publish them.
MODEL = "stand-in-model"
NAMESPACE, SERVICE = "run1", "policy"


def entry(replica: int, port: int = 9, namespace: str = NAMESPACE, service: str = SERVICE, **kw) -> Entry:
    """A ready, freshly heartbeating registry entry for a replica on 127.0.0.1 (``kw`` overrides)."""
    return Entry(
        namespace=namespace, service=service, replica=replica, model=MODEL, host="127.0.0.1", port=port,
        engine="stand-in", engine_version="0", job_id=f"test-{replica}", node="localhost", pid=os.getpid(),
        **{"state": "ready", "heartbeat_at": time.time(), **kw},
    )


def publish(root: Path, servers: list) -> list[Entry]:
    """Publishes servers (anything with a ``port``) as replicas 0, 1, ... of the service."""
    registry = Registry(root)
    entries = [entry(replica, server.port) for replica, server in enumerate(servers)]
    for e in entries:
        registry.publish(e)
    return entries


# ---------------------------------------------------------------- processes on this machine


def command_lines() -> dict[int, list[str]]:
    """Every process this user can read, pid -> argv."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found[int(proc.name)] = [arg.decode(errors="replace") for arg in argv if arg]
    return found


def standin_pids(port: str | None = None) -> list[int]:
    """Running stand-in servers (on ``port`` only, if given)."""
    return [pid for pid, argv in command_lines().items()
            if "server.standin" in argv and (port is None or port in argv)]


# ---------------------------------------------------------------- the launcher, serving the stand-in

STANDIN = "{python} -m server.standin --host {host} --port {port} --model {served_name}"
# Fast owner heartbeats (orphans stop within seconds), but a TTL that survives a busy machine.
FAST_HEARTBEATS = ["registry.heartbeat_s=0.5", "registry.ttl_s=20", "registry.orphan_grace_s=3"]
# `python -m launcher` overrides that serve the stand-in (server=openai_command) instead of vLLM.
STANDIN_SERVER = ["server=openai_command", f'server.command="{STANDIN}"', "model.embedded=null",
                  "model.path=standin/model", *FAST_HEARTBEATS]


def launcher_env(registry_root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "GYMLAUNCH_REGISTRY_ROOT": str(registry_root), **(env or {})}


def run_launcher(registry_root: Path, *overrides: str, env: dict[str, str] | None = None,
                 timeout_s: float = 300) -> subprocess.CompletedProcess:
    """``python -m launcher OVERRIDES`` to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *overrides], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout_s, env=launcher_env(registry_root, env),
    )


def start_launcher(registry_root: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m launcher OVERRIDES`` in the background; its output (stderr too) in ``stdout``."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *overrides], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=launcher_env(registry_root, env),
    )


def serve_standin(run_dir: Path, registry_root: Path, *overrides: str) -> tuple[subprocess.Popen, str]:
    """A launcher serving the stand-in (job=none); returns it once it prints its URL."""
    proc = start_launcher(registry_root, "job=none", *STANDIN_SERVER, f"hydra.run.dir={run_dir}", *overrides)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving policy at "):
            return proc, line.split()[3]
    raise AssertionError("launcher ended before serving:\n" + "".join(lines))


def sweep(tmp_path: Path, registry_root: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A 2-point Hydra multirun over sampling temperature: the server config is the same."""
    return run_launcher(
        registry_root, "-m", *STANDIN_SERVER, "job.sampling.temperature=0.2,0.8",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, env=env, timeout_s=600,
    )


def sweep_summaries(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text()) for i in (0, 1)]


# ---------------------------------------------------------------- vLLM (CPU build) and Slurm

SERVED_NAME = "smollm2-test"
CHAT_TEMPLATE = ROOT / "server" / "chat_templates" / "chatml_hermes_tools.jinja"


def cpu_engine(**overrides) -> EngineSpec:
    """The embedded default's engine flags (conf/server/vllm_cpu.yaml)."""
    flags = dict(
        served_name=SERVED_NAME, max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
        tool_call_parser="hermes", tool_strict_level="parameter", chat_template=str(CHAT_TEMPLATE),
    )
    return EngineSpec(**{**flags, **overrides})


def engine_pids() -> dict[int, str]:
    """Every running vLLM API server on this machine, pid -> command line."""
    lines = {pid: " ".join(argv) for pid, argv in command_lines().items()}
    return {pid: line for pid, line in lines.items() if "vllm.entrypoints.openai.api_server" in line}


def engines_on_port(port: int) -> list[int]:
    return [pid for pid, cmd in engine_pids().items() if f"--port {port} " in cmd + " "]


def auth(entry: Entry) -> dict[str, str]:
    return {"Authorization": f"Bearer {entry.read_api_key()}"}


def queued() -> list[str]:
    """The Slurm job ids in the queue."""
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
