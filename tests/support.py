"""What several test modules share. Test modules import this (and get fixtures from conftest.py),
never each other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from server.engines import VLLM_ENTRYPOINT, VLLM_SERVE_ENTRYPOINT, EngineSpec
from server.registry import Entry, Registry

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = ROOT / "tests" / "slurm"  # start[-multinode].sh / stop[-multinode].sh of the Slurm test clusters

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


@contextmanager
def replaced_by_a_file(folder: Path, away: Path) -> Iterator[None]:
    """A hiccup of the shared filesystem that fails for root too (chmod would not): ``folder`` is a
    plain file for a while, so that every write below it gets NotADirectoryError; then it is back
    (kept meanwhile at ``away``, outside the registry)."""
    folder.rename(away)
    folder.write_text("")
    try:
        yield
    finally:
        folder.unlink()
        try:
            away.rename(folder)
        except OSError:  # a writer made the folder again first: its entries are republished anyway
            shutil.rmtree(away)


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


def processes_of(registry_root: Path) -> list[int]:
    """Processes whose environment names ``registry_root``: the launcher's and every job's (the jobs'
    controllers, the jobs, the engines they start), and nobody else's."""
    needle = f"GYMLAUNCH_REGISTRY_ROOT={registry_root}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes() + b"\0":
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def rows(path: Path) -> list[tuple[str, int]]:
    """The (task, repeat) of each row of a rollouts file, which must end with a whole line."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends mid-line"
    return [(r["task_id"], r["repeat"]) for r in map(json.loads, data.splitlines())]


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


def kill_engine_and_finish(proc: subprocess.Popen, registry_root: Path, replica: int,
                           timeout_s: float = 900) -> tuple[str, dict]:
    """SIGKILL replica ``replica``'s engine under a running launcher (``start_launcher``), wait for the
    run to end well (exit 0, its output printed for the test's log); its output and summary.json."""
    (killed,) = [e for e in Registry(registry_root).entries(service=SERVICE) if e.replica == replica]
    os.kill(killed.engine_pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=timeout_s)
    print(out)
    assert proc.returncode == 0, out
    run_dir = next(a.partition("=")[2] for a in proc.args if a.startswith("hydra.run.dir="))
    return out, json.loads((Path(run_dir) / "summary.json").read_text())


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
    """Every running vLLM API server (or a multi-node replica's node) on this machine, pid -> command line."""
    lines = {pid: " ".join(argv) for pid, argv in command_lines().items()}
    modules = (f"-m {VLLM_ENTRYPOINT} ", f"-m {VLLM_SERVE_ENTRYPOINT} ")
    return {pid: line for pid, line in lines.items() if any(m in line for m in modules)}


def engines_on_port(port: int) -> list[int]:
    return [pid for pid, cmd in engine_pids().items() if f"--port {port} " in cmd + " "]


def assert_run_left_nothing(registry_root: Path, summary: dict) -> None:
    """A finished run (its summary.json) left no registry entry, API key, lock file or vLLM."""
    assert Registry(registry_root).entries(summary["namespace"]) == []
    assert not (registry_root / summary["namespace"]).exists()  # nor its API key
    assert not (registry_root / f".{summary['namespace']}.lock").exists()  # nor a lock file
    for server in summary["servers"]:
        if server["base_url"]:
            port = int(server["base_url"].rsplit(":", 1)[1].split("/")[0])
            assert engines_on_port(port) == [], f"vLLM still running on port {port}"


def auth(entry: Entry) -> dict[str, str]:
    return {"Authorization": f"Bearer {entry.read_api_key()}"}


def queued(env: dict[str, str] | None = None) -> list[str]:
    """The Slurm job ids in the queue; of the cluster ``env`` names (e.g. ``{"SLURM_CONF": ...}``, over
    os.environ), else of os.environ's."""
    full = {**os.environ, **env} if env else None
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=full).stdout.split()


# ---------------------------------------------------------------- NeMo Gym stand-ins

# Stand-ins for ng_run and ng_collect_rollouts, behaving like them where the launcher relies on it:
# ng_run prints "All N / N servers ready" and serves until SIGINT (Gym's own shutdown);
# ng_collect_rollouts writes the output JSONL, or exits 1 writing nothing. Both record what they got
# in $STANDIN_RECORD_DIR.
NG_RUN = textwrap.dedent("""
    import json, os, sys, time, httpx
    record = os.path.join(os.environ["STANDIN_RECORD_DIR"], "ng_run")
    key_override = [a for a in sys.argv if a.startswith("+policy_api_key=")][0]
    # What Gym's OmegaConf does with ${oc.env:POLICY_API_KEY}: read it from the environment.
    assert key_override == "+policy_api_key=${oc.env:POLICY_API_KEY}", key_override
    url = [a for a in sys.argv if a.startswith("+policy_base_url=")][0].split("=", 1)[1].strip("[]").split(",")[0]
    status = httpx.get(url + "/models", headers={"Authorization": "Bearer " + os.environ["POLICY_API_KEY"]}).status_code
    with open(record + ".json", "w") as f:
        json.dump({"argv": sys.argv, "models_status": status, "path": os.environ["PATH"],
                   "uv_python_downloads": os.environ.get("UV_PYTHON_DOWNLOADS")}, f)
    print("Waiting for servers to spin up")  # no flush, as Gym: the job makes the output unbuffered
    time.sleep(0.5)
    print("All 2 / 2 servers ready! Polling every 60s")
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:  # Gym's shutdown path: only SIGINT stops it in order
        open(record + ".stopped", "w").close()
        print("NeMo Gym finished!")
""")

NG_COLLECT = textwrap.dedent("""
    import json, os, sys
    record = os.path.join(os.environ["STANDIN_RECORD_DIR"], "ng_collect_rollouts.json")
    args = dict(a.lstrip("+").split("=", 1) for a in sys.argv[1:])
    with open(record, "w") as f:
        json.dump({"argv": sys.argv, "ng_run_up": os.path.exists(os.path.join(os.environ["STANDIN_RECORD_DIR"], "ng_run.json"))}, f)
    if os.environ.get("STANDIN_COLLECT_FAIL"):
        print("one rollout failed: nothing written", file=sys.stderr)
        sys.exit(1)
    rows = [json.loads(line) for line in open(args["input_jsonl_fpath"]) if line.strip()][: int(args.get("limit", 10**9))]
    with open(args["output_jsonl_fpath"], "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "response": {"output": []}, "reward": 1.0}) + "\\n")
""")


def gym_standins(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A bin folder with ng_run / ng_collect_rollouts stand-ins, a record folder, a task file. The
    venv around them looks like NeMo Gym 0.7.0's to the job (its dist-info, its vllm_model configs
    from tests/data/nemo_gym), so it writes the overrides that release reads."""
    bin_dir, records = tmp_path / "gym venv" / "bin", tmp_path / "records"
    bin_dir.mkdir(parents=True)
    records.mkdir()
    site = bin_dir.parent / "lib" / "python3.13" / "site-packages"
    (site / "nemo_gym-0.7.0.dist-info").mkdir(parents=True)
    shutil.copytree(ROOT / "tests" / "data" / "nemo_gym" / "0.7.0" / "responses_api_models", site / "responses_api_models")
    for name, source in (("ng_run", NG_RUN), ("ng_collect_rollouts", NG_COLLECT)):
        program = bin_dir / name
        program.write_text(f"#!{sys.executable}\n{source}")
        program.chmod(0o755)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(
        json.dumps({"responses_create_params": {"input": [{"role": "user", "content": f"q{i}"}]}}) + "\n"
        for i in range(5)
    ))
    return bin_dir, records, tasks


# ---------------------------------------------------------------- a run folder written to the shared formats

RUN_START = 1_765_000_000.0  # the unix time at which the run folder below begins


def write_run_folder(folder: Path) -> Path:
    """A run folder as the launcher leaves it, written by hand to the formats of docs/architecture.md
    ("Contracts"): events.jsonl (two replicas and a gateway; replica 1 dies at +40 s and its
    replacement is ready at +64 s; the collector job), rollouts.jsonl with timing fields (96 rows, one or
    two turns each), failures.jsonl (3), summary.json; a torn last line in each JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    lifecycles = {
        ("run", None): [(0, "servers start"), (1, "servers ready"), (24, "gateway ready"), (30, "rollouts"),
                        (89, "teardown"), (95, "end", "succeeded")],
        ("replica 0", "11"): [(0.2, "SUBMITTED"), (0.3, "PENDING"), (2, "RUNNING"), (2.5, "starting"),
                              (18, "healthy"), (19, "checking"), (22, "ready"), (90, "draining")],
        ("replica 1", "12"): [(0.2, "SUBMITTED"), (2, "RUNNING"), (2.6, "starting"), (20, "checking"), (23, "ready"),
                              (40, "dead", "job 12 ended: exit code 137"), (40.5, "replaced", "by job 15")],
        ("replica 1", "15"): [(40.5, "SUBMITTED"), (41, "RUNNING"), (41.5, "starting"), (60, "checking"),
                              (64, "ready"), (90, "draining")],
        ("gateway", "13"): [(1, "SUBMITTED"), (3, "RUNNING"), (3.5, "starting"), (21, "healthy"), (24, "checking"),
                            (28, "ready"), (90, "draining")],
        ("job", "14"): [(30, "SUBMITTED"), (30.1, "PENDING"), (31, "RUNNING"), (88, "COMPLETED")],
    }
    events = sorted(({"at": RUN_START + t, "who": who, "job_id": job, "state": state, "detail": (detail or [None])[0]}
                     for (who, job), steps in lifecycles.items() for t, state, *detail in steps), key=lambda e: e["at"])
    rows = []
    for i in range(96):
        finished = RUN_START + 32 + i * 0.58
        turns = [{"at": finished - 0.9, "latency_s": 0.5 + (i % 7) * 0.1}] + (
            [{"at": finished, "latency_s": 0.4 + (i % 5) * 0.3}] if i % 3 == 0 else [])
        rows.append({"task_id": f"arith-{i // 4:02d}", "repeat": i % 4, "reward": [1.0, 0.0, 0.5, 1.0][i % 4],
                     "finished_at": finished, "latency_s": 1.4, "turns": turns})
    failures = [{"task_id": "arith-90", "repeat": r, "reason": "connection_error", "at": RUN_START + 40.2 + r}
                for r in range(3)]
    for name, objects in (("events.jsonl", events), ("rollouts.jsonl", rows), ("failures.jsonl", failures)):
        (folder / name).write_text("".join(json.dumps(o) + "\n" for o in objects) + '{"torn": ')
    (folder / "summary.json").write_text(json.dumps({
        "run": "rollouts", "run_id": "rollouts-20251206-054640-ab12", "namespace": "rollouts-20251206-054640-ab12",
        "status": "succeeded", "error": None, "run_dir": str(folder),
        "phases": {"servers start": 0.95, "servers ready": 23.1, "gateway ready": 5.9, "rollouts": 58.7, "teardown": 6.1},
        "collection": {"tasks": 24, "rollouts_written": 96, "failures": 3, "mean_reward": 0.625,
                       "generated_tokens_per_s": 412.5},
    }, indent=2))
    return folder
