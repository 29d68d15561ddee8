"""Integration fixtures: a real vLLM (CPU build) serving the embedded SmolLM2, started as
the launcher starts it (a submitit local job running ``server.job.run``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from launcher.executors import LocalBackend, Resources
from launcher.spec import ClusterSpec
from server.engines import EngineSpec
from server.job import ServerJob, run
from server.registry import Entry, Registry

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = ROOT / "server" / "chat_templates" / "chatml_hermes_tools.jinja"
SERVED_NAME = "smollm2-test"


def cpu_engine(**overrides) -> EngineSpec:
    """The embedded default's engine flags (conf/server/vllm_cpu.yaml)."""
    flags = dict(
        served_name=SERVED_NAME, max_model_len=2048, kv_cache_memory_bytes=268435456, enforce_eager=True,
        tool_call_parser="hermes", tool_strict_level="parameter", chat_template=str(CHAT_TEMPLATE),
    )
    return EngineSpec(**{**flags, **overrides})


def engine_pids() -> dict[int, str]:
    """Every running vLLM API server on this machine, pid -> command line."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in cmdline:
            found[int(proc.name)] = cmdline
    return found


def auth(entry: Entry) -> dict[str, str]:
    return {"Authorization": f"Bearer {entry.read_api_key()}"}


def engines_on_port(port: int) -> list[int]:
    return [pid for pid, cmd in engine_pids().items() if f"--port {port} " in cmd + " "]


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    os.environ["GYMLAUNCH_REGISTRY_ROOT"] = str(root)  # for launcher subprocesses too
    return root


@pytest.fixture(scope="session")
def policy_server(tmp_path_factory, registry_root) -> Entry:
    """One shared replica for the tests that only talk to an endpoint."""
    folder = tmp_path_factory.mktemp("policy-server")
    key_file = Registry(registry_root).create_api_key("itest")  # as every launcher run does by default
    job_spec = ServerJob(
        namespace="itest", service="policy", replica=0, engine=cpu_engine(), registry_root=str(registry_root),
        log_dir=str(folder / "logs"), embedded_model="smollm2_135m", heartbeat_s=1.0, startup_timeout_s=600,
        api_key_file=str(key_file),
    )
    backend = LocalBackend(ClusterSpec(kind="local"), folder / "submitit")
    job = backend.submit(run, job_spec, Resources(name="itest-policy", timeout_min=60))
    registry = Registry(registry_root, ttl_s=10)
    deadline = time.monotonic() + 600
    try:
        while not registry.ready("policy", "itest"):
            if job.done():
                pytest.fail(f"shared server job died:\n{backend.log_tail(job)}\n{job_spec.engine_log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "shared server not ready in 600 s"
            time.sleep(0.5)
        yield registry.ready("policy", "itest")[0]
    finally:
        backend.cancel(job)
        deadline = time.monotonic() + 60
        while not backend.finished(job) and time.monotonic() < deadline:
            time.sleep(0.2)
