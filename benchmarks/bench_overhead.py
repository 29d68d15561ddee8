"""What the launcher itself costs on top of the engine's start and the job's work.

    python benchmarks/bench_overhead.py                    # the embedded default (CPU vLLM), 2 rounds
    python benchmarks/bench_overhead.py --rounds 3 job.num_repeats=2    # overrides go to both sides

Each round measures, one after the other (rounds alternate which goes first, so that a warming
cache or a neighbour's burst does not favour one side):

- launcher: ``python -m launcher OVERRIDES``, wall time from start to exit, and the phase times of
  its summary.json (servers ready, of which the readiness gate; rollouts, of which the collector's
  own wall time; teardown);
- by hand: the same engine command the server job runs (``server.engines.build_launch`` on the
  same composed config, started with ``server.process.start``), timed from start to its health
  route answering 200 (polled every 20 ms); then a registry entry published for it and
  ``python -m jobs.rollouts`` with the same collector settings, timed from start to exit; their
  sum is what the run cannot do without.

The ratio launcher / (engine + collection) is the median over rounds. Not a test: numbers depend
on the machine and on what else runs on it (on a CPU, sampling at temperature 0.7 makes the
collection's length vary from run to run too).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from a checkout

from launcher.__main__ import CONF_DIR, CONFIG_NAME  # noqa: E402
from launcher.spec import RolloutsJob, RunSpec, load_spec  # noqa: E402
from server import process  # noqa: E402
from server.engines import build_launch, engine_version  # noqa: E402
from server.job import free_port  # noqa: E402
from server.registry import Entry, Registry  # noqa: E402

NAMESPACE, HEALTH_POLL_S = "bench-by-hand", 0.02


@dataclass
class Round:
    launcher_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    gate_s: float | None = None
    collector_wall_s: float | None = None
    launcher_rollouts: int | None = None
    launcher_tokens: int | None = None
    launcher_cpu_s: float | None = None  # the launcher process's own CPU time (its jobs not included)
    engine_s: float = 0.0
    collection_s: float = 0.0
    hand_rollouts: int | None = None
    hand_tokens: int | None = None
    hand_wall_s: float | None = None  # the collection's own wall time, as collect() reports it
    engine_stop_s: float = 0.0

    @property
    def by_hand_s(self) -> float:
        return self.engine_s + self.collection_s

    @property
    def ratio(self) -> float:
        return self.launcher_s / self.by_hand_s


def compose(overrides: list[str]) -> RunSpec:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = load_spec(hydra_compose(CONFIG_NAME, overrides=overrides))
    if not isinstance(spec.job, RolloutsJob):
        sys.exit("bench_overhead measures the built-in collector (job=rollouts)")
    return spec


def run_launcher(overrides: list[str], work: Path, i: int, r: Round) -> None:
    run_dir, registry_root = work / f"launcher-{i}", work / f"registry-launcher-{i}"
    env = {**os.environ, "GYMLAUNCH_REGISTRY_ROOT": str(registry_root)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    cpu = CpuWatch(proc.pid)
    out, _ = proc.communicate()
    r.launcher_s = time.monotonic() - t0
    r.launcher_cpu_s = cpu.stop()
    if proc.returncode:
        sys.exit(f"the launcher failed ({proc.returncode}):\n{out[-6000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    r.phases = summary["phases"]
    r.gate_s = summary["servers"][0]["readiness_gate_s"]
    r.collector_wall_s = summary["collection"]["wall_s"]
    r.launcher_rollouts = summary["collection"]["rollouts_written"]
    r.launcher_tokens = summary["collection"]["generated_tokens"]


class CpuWatch:
    """A process's own user+system CPU seconds, sampled from /proc until it ends (the last sample)."""

    def __init__(self, pid: int) -> None:
        self.path, self.last, self.done = Path(f"/proc/{pid}/stat"), 0.0, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(0.1):
            try:
                fields = self.path.read_text().rsplit(")", 1)[1].split()
            except OSError:
                return
            if fields[0] == "Z":
                return
            self.last = (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.last


def run_by_hand(spec: RunSpec, work: Path, i: int, r: Round) -> None:
    """The engine command the server job runs, then ``python -m jobs.rollouts`` against it."""
    from server.models import prepare

    engine = spec.server.engine_spec()
    model_path = str(prepare(spec.model.embedded, Path(spec.model.cache_dir) if spec.model.cache_dir else None)) \
        if spec.model.embedded else spec.model.path  # instant once prepared: not timed, as in the job
    registry_root = work / f"registry-hand-{i}"
    registry = Registry(registry_root)
    key_file = registry.create_api_key(NAMESPACE)
    api_key = key_file.read_text().strip()
    host, port = "127.0.0.1", free_port("127.0.0.1")
    launch = build_launch(engine, model_path, host, port, api_key)
    log = work / f"engine-hand-{i}.log"
    health = f"http://{host}:{port}{launch.health_path}"

    t0 = time.monotonic()
    proc = process.start(launch.argv, log, {**os.environ, **engine.env, **launch.env}, header=launch.loggable())
    try:
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"the engine exited ({proc.returncode}):\n{process.log_tail(log)}")
                try:
                    if client.get(health).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(HEALTH_POLL_S)
        r.engine_s = time.monotonic() - t0

        now = time.time()
        registry.publish(Entry(
            namespace=NAMESPACE, service=spec.server.service, replica=0, model=engine.served_name, host=host,
            port=port, engine=engine.engine, engine_version=engine_version(engine.engine), job_id=f"pid:{proc.pid}",
            node=os.uname().nodename, pid=os.getpid(), engine_pid=proc.pid, state="ready", started_at=now,
            heartbeat_at=now, api_key_file=str(key_file),
        ))
        c = spec.job.collector
        out = work / f"hand-{i}"
        argv = [
            sys.executable, "-m", "jobs.rollouts", "--service", spec.server.service, "--tasks", c.tasks,
            "--output-dir", str(out), "--namespace", NAMESPACE, "--root", str(registry_root),
            "--num-repeats", str(c.num_repeats), "--max-concurrency", str(c.max_concurrency),
            "--max-turns", str(c.max_turns), "--temperature", str(c.sampling.temperature),
            "--max-tokens", str(c.sampling.max_tokens),
        ]
        t1 = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        r.collection_s = time.monotonic() - t1
        if done.returncode:
            sys.exit(f"python -m jobs.rollouts failed ({done.returncode}):\n{done.stderr[-4000:]}")
        collected = json.loads(done.stdout)
        r.hand_rollouts, r.hand_tokens, r.hand_wall_s = (
            collected["rollouts_written"], collected["generated_tokens"], collected["wall_s"])
    finally:
        t2 = time.monotonic()
        process.stop(proc, spec.server.stop_grace_s)
        r.engine_stop_s = time.monotonic() - t2
        registry.remove_namespace(NAMESPACE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="launcher overrides, applied to both sides (key=value)")
    args = parser.parse_args(argv)
    spec = compose(args.overrides)
    c = spec.job.collector
    if (c.top_logprobs, c.sampling.top_p, c.request_timeout_s) != (0, 1.0, 120.0):
        print("note: top_logprobs, sampling.top_p and request_timeout_s are not options of python -m jobs.rollouts; "
              "the by-hand collection runs with their defaults", file=sys.stderr)
    launch = build_launch(spec.server.engine_spec(), "<model>", "127.0.0.1", 0, None)
    print(f"engine: {launch.loggable()}")
    print(f"collection: {spec.job.num_rollouts} rollouts ({c.tasks}, num_repeats={c.num_repeats}, "
          f"max_concurrency={c.max_concurrency})")
    print(f"launcher: python -m launcher {shlex.join(args.overrides)}\n")

    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        for i in range(args.rounds):
            r = Round()
            sides = [lambda: run_launcher(args.overrides, work, i, r), lambda: run_by_hand(spec, work, i, r)]
            for side in sides if i % 2 == 0 else reversed(sides):
                side()
            rounds.append(r)
            print(
                f"round {i + 1} ({'launcher first' if i % 2 == 0 else 'by hand first'}): "
                f"launcher {r.launcher_s:.1f}s | engine {r.engine_s:.1f}s + collection {r.collection_s:.1f}s "
                f"= {r.by_hand_s:.1f}s | ratio {r.ratio:.2f}, overhead {r.launcher_s - r.by_hand_s:+.1f}s "
            )
            print("  launcher phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.phases.items())
                  + f"; readiness gate {r.gate_s}s; outside the phases {r.launcher_s - sum(r.phases.values()):.2f}s; "
                  f"the launcher process's own CPU {r.launcher_cpu_s:.1f}s")
            print(f"  collection: {r.launcher_rollouts} vs {r.hand_rollouts} rollouts, {r.launcher_tokens} vs "
                  f"{r.hand_tokens} tokens generated, collect()'s own wall {r.collector_wall_s}s vs {r.hand_wall_s}s "
                  f"(launcher vs by hand); by hand the engine stopped in {r.engine_stop_s:.2f}s (not counted)",
                  flush=True)

    med = statistics.median
    ready, rollouts, teardown = (med(r.phases.get(k, 0.0) for r in rounds)
                                 for k in ("servers ready", "rollouts", "teardown"))
    launcher_s, engine_s, collection_s = med(r.launcher_s for r in rounds), med(r.engine_s for r in rounds), \
        med(r.collection_s for r in rounds)
    outside = med(r.launcher_s - sum(r.phases.values()) for r in rounds)
    print(f"\nmedian over {len(rounds)} rounds: launcher / (engine + collection) = {med(r.ratio for r in rounds):.2f} "
          f"({launcher_s:.1f}s vs {engine_s:.1f}s + {collection_s:.1f}s)")
    print("where the launcher's extra time goes (medians):")
    print(f"  servers ready {ready:.2f}s vs engine by hand {engine_s:.2f}s: {ready - engine_s:+.2f}s "
          f"(job start, health poll, readiness gate {med(r.gate_s or 0 for r in rounds):.2f}s)")
    own = med(r.collector_wall_s or 0 for r in rounds)
    print(f"  rollouts {rollouts:.2f}s vs collection by hand {collection_s:.2f}s: {rollouts - collection_s:+.2f}s, "
          f"of which collect()'s own wall {own:.2f}s vs {med(r.hand_wall_s or 0 for r in rounds):.2f}s by hand "
          f"(sampling: {med(r.launcher_tokens or 0 for r in rounds):.0f} vs {med(r.hand_tokens or 0 for r in rounds):.0f} "
          f"tokens) and the collector job's start and end {rollouts - own:.2f}s")
    print(f"  teardown {teardown:.2f}s; servers start {med(r.phases.get('servers start', 0.0) for r in rounds):.2f}s; "
          f"outside the phases (interpreter, Hydra, config checks, summary) {outside:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
