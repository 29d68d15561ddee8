"""The built-in rollout collector: Gym-format tasks in, rollouts with token ids and rewards out.

Tasks are JSONL in NeMo Gym's input shape (``responses_create_params`` with a
Responses-API ``input`` and ``tools``, plus a ``verifier``). Each (task,
repeat) becomes one conversation with one replica of a service found in the
registry: chat completions, local tools from ``jobs.tools`` run between
turns, a reward from ``jobs.verifiers`` at the end. Every finished
conversation is one line of ``rollouts.jsonl`` (or of ``failures.jsonl``),
written as soon as it ends so that a watcher can count progress. A row explains
its own reward: it names the model served, the sampling params sent, the
verifier with what it read (``jobs.verifiers.Verdict``), and when the rollout
and each of its turns ended and took.

Requests go through ``jobs.pool.EndpointPool``: a conversation sticks to one
replica, and moves to another one (and stays there) when its replica stops
answering. Collection is resumable: run it again on the same output folder and
it does only the (task, repeat) pairs that ``rollouts.jsonl`` lacks, each row
written exactly once even if a run was killed at any point.

``collect`` is synchronous and takes one picklable config, so that it can be
submitted as a submitit job; the concurrency lives inside it. SIGTERM (a
cancel: submitit's job wrapper would only log it) or SIGINT stops it within a
moment: no conversation starts any more, those in flight are cancelled (a row
is one write, so none is torn), and ``collect`` raises ``CollectionStopped``;
a re-run on the same output folder does the rest, each (task, repeat) once.
SIGUSR2 (the time-limit warning) stops it the same way; submitted as
``jobs.requeue.Requeueable(collect)`` the job is then requeued and that re-run
happens by itself.

Two collectors never write into one output folder: ``collect`` holds an exclusive
lock on ``<output_dir>/.collector.lock`` (``LOCK_FILE``, this module's alone; the
holder's host, pid and job id are written in it) for as long as it runs, and a
second one refuses to start with ``OutputBusy`` naming the folder and the holder.
The lock goes with the process, however it ends; the file stays.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import httpx

from jobs import tools, verifiers
from jobs.pool import EndpointPool, NoEndpointError
from server import onpolicy
from server.replicas import REPLICA_HEADER, SESSION_HEADER
from server.checks import Checks
from server.registry import GATEWAY_ENGINE, NAMESPACE_ENV, ROOT_ENV, Entry, Registry

log = logging.getLogger(__name__)

DEMO_TASKS = str(Path(__file__).parent / "tasks" / "demo.jsonl")


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256

    def validate(self, checks: Checks) -> None:
        checks.at_least(self, "temperature", 0)
        checks.must(self, "top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        checks.at_least(self, "max_tokens", 1)


@dataclass
class CollectorConfig:
    service: str = "policy"
    tasks: str = DEMO_TASKS
    output_dir: str = "rollouts"
    namespace: str | None = None
    registry: Optional[Registry] = None  # None: the default root and settings
    num_repeats: int = 1
    max_concurrency: int = 16
    max_turns: int = 4  # model calls per conversation
    top_logprobs: int = 0
    request_timeout_s: float = 120.0
    # Each next turn's prompt begins with exactly the ids of the previous prompt + generation
    # (server/onpolicy.py): through a gateway it splices (gateway.on_policy), else the collector.
    on_policy: bool = True
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def validate(self, checks: Checks) -> None:
        for name in ("num_repeats", "max_concurrency", "max_turns"):
            checks.at_least(self, name, 1)
        checks.must(self, "top_logprobs", "in 0..20", lambda v: 0 <= v <= 20)
        self.sampling.validate(checks.at("sampling"))


@dataclass
class CollectSummary:
    tasks: int
    rollouts_written: int  # rows in rollouts.jsonl: this run's and those of earlier runs on the same output_dir
    rollouts_written_this_run: int
    failures: int  # this run's, as listed in failures.jsonl
    mean_reward: float | None  # over every row in rollouts.jsonl; None when there is none
    generated_tokens: int  # this run's answered requests, failed rollouts included: the servers did that work
    wall_s: float
    generated_tokens_per_s: float
    rollouts_path: str
    failures_path: str
    replicas: dict[str, dict]  # replica id -> this run's requests, failures, retries (jobs.pool.ReplicaStats)
    # This run's rows: consecutive model calls whose next prompt begins with the previous prompt +
    # generation, of those checked (server.onpolicy.prefix_contiguity).
    prefix_contiguous: int = 0
    prefix_checked: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Task:
    id: str
    messages: list[dict]  # chat-completions shape
    tools: list[dict]  # chat-completions shape
    tool_choice: str | dict | None  # applies to the first turn only
    raw: dict  # the line as read: verifiers take their settings from it


class TaskFileError(ValueError):
    """A task file line that cannot be used."""


class CollectionStopped(RuntimeError):
    """SIGTERM, SIGINT or SIGUSR2 (the time-limit warning) stopped the collection; the rows written so far stay, and a re-run on the
    same output_dir does the rest. The message starts with "stopped", like a cancelled command job's."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class RolloutError(Exception):
    """One conversation failed; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- tasks


def load_tasks(path: str | Path) -> list[Task]:
    """Read a task file; any unusable line raises ``TaskFileError`` naming the file and line."""
    tasks: list[Task] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                task = parse_task(json.loads(line))
            except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
                raise TaskFileError(
                    f"{path}:{lineno}: {e} (each line is a JSON object with 'id', "
                    f"'responses_create_params.input' and 'verifier.name')"
                ) from None
            if task.id in seen:
                raise TaskFileError(
                    f"{path}:{lineno}: duplicate task id {task.id!r}; ids name the rollouts and must be unique"
                )
            seen.add(task.id)
            tasks.append(task)
    return tasks


def parse_task(data: dict) -> Task:
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    if "id" not in data:
        raise KeyError("missing 'id'")
    verifiers.get(data)  # an unknown verifier should stop the run before any request
    params = data.get("responses_create_params")
    if not isinstance(params, dict) or "input" not in params:
        raise KeyError("missing 'responses_create_params.input'")
    chat_tools = [chat_tool(t) for t in params.get("tools") or []]
    unknown = sorted({t["function"]["name"] for t in chat_tools} - tools.TOOLS.keys())
    if unknown:
        raise ValueError(f"task offers tools {unknown} that jobs.tools does not implement ({sorted(tools.TOOLS)})")
    messages = chat_messages(params["input"])
    if params.get("instructions"):
        messages.insert(0, {"role": "system", "content": params["instructions"]})
    return Task(
        id=str(data["id"]),
        messages=messages,
        tools=chat_tools,
        tool_choice=chat_tool_choice(params.get("tool_choice")),
        raw=data,
    )


def chat_messages(items: str | list) -> list[dict]:
    """Responses-API ``input`` -> chat-completions ``messages``."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            # Chat templates know "system"; "developer" is the Responses API's name for it.
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text(item["content"])})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and last.get("tool_calls"):  # parallel calls: one message
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
        else:
            raise ValueError(
                f"input item type {kind!r} is not supported (use message, function_call, function_call_output)"
            )
    return messages


def _text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") in ("input_text", "output_text", "text"))


def chat_tool(tool: dict) -> dict:
    """A tool in Responses (flat) or chat-completions (nested) shape -> chat-completions shape."""
    if tool.get("type") != "function":
        raise ValueError(f"only function tools are supported, got {tool.get('type')!r}")
    fn = tool["function"] if "function" in tool else tool
    out = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


def chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict) and "name" in choice:  # Responses' named choice is flat too
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


# ---------------------------------------------------------------- collection

ROLLOUTS_FILE = "rollouts.jsonl"
FAILURES_FILE = "failures.jsonl"
# A killed collector cannot tear more than the last line (one write per row), so fsync only guards
# against the node going down, and a row lost that way is redone, never doubled. An fsync costs
# ~0.3-1 ms on a local disk and more on shared filesystems, on the event loop that serves every
# conversation: sync at most this often rather than once per row.
FSYNC_INTERVAL_S = 1.0
LOCK_FILE = ".collector.lock"


class OutputError(ValueError):
    """An output file that a resumed run cannot continue."""


class OutputBusy(OutputError):
    """Another collector holds the output folder's lock."""


def collect(cfg: CollectorConfig) -> CollectSummary:
    """Run every (task, repeat) that ``rollouts.jsonl`` in ``output_dir`` lacks yet; write its row or failure.

    Running again on the same ``output_dir`` resumes: rows written before are kept and skipped, every
    other (task, repeat), failed or never finished, is tried again. ``failures.jsonl`` is rewritten
    by each run and lists that run's failures only: an earlier failure is not final (this run retries
    it), and the summary's figures about earlier runs come from ``rollouts.jsonl``. So progress is
    lines of one file plus lines of the other, as for a fresh run.
    """
    tasks = load_tasks(cfg.tasks)
    pool = EndpointPool(cfg.service, cfg.namespace, cfg.registry)
    served = served_model(pool)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rollouts_path, failures_path = out / ROLLOUTS_FILE, out / FAILURES_FILE
    start = time.monotonic()
    # The lock first: what follows cuts a torn last line and truncates failures.jsonl.
    with _OutputLock(out), _StopSignals() as stop, _JsonlAppender(rollouts_path) as ok, \
            _JsonlAppender(failures_path, truncate=True) as failed:
        earlier = read_rollouts(rollouts_path, {t.id for t in tasks})
        todo = [_Attempt(t, r) for t in tasks for r in range(cfg.num_repeats) if (t.id, r) not in earlier]
        run = _Run(cfg, pool, served, ok, failed)
        finished = asyncio.run(run.all(todo, stop))
    wall_s = time.monotonic() - start
    if not finished:
        name = signal.Signals(stop.signum).name
        raise CollectionStopped(
            f"stopped by {name} after {wall_s:.1f}s: {len(run.rewards)} rollouts and {run.failed} failures "
            f"written this run, {len(todo) - len(run.rewards) - run.failed} left undone; a re-run on "
            f"{out} does the rest", stop.signum,
        )
    rewards = [*earlier.values(), *run.rewards]
    return CollectSummary(
        tasks=len(tasks),
        rollouts_written=len(rewards),
        rollouts_written_this_run=len(run.rewards),
        failures=run.failed,
        mean_reward=sum(rewards) / len(rewards) if rewards else None,
        generated_tokens=run.generated_tokens,
        wall_s=round(wall_s, 3),
        generated_tokens_per_s=round(run.generated_tokens / wall_s, 2) if wall_s > 0 else 0.0,
        rollouts_path=str(rollouts_path),
        failures_path=str(failures_path),
        replicas={str(r): dataclasses.asdict(s) for r, s in pool.stats().items()},
        prefix_contiguous=run.contiguity[0],
        prefix_checked=run.contiguity[1],
    )


def served_model(pool: EndpointPool) -> Entry:
    """An entry of the service: its model name is what requests carry (a service's replicas share
    one model config, hence one name), its engine says whether it is a gateway."""
    return pool.pick("")  # no replica at all is a setup problem: say so once, not once per rollout


def read_rollouts(path: Path, task_ids: set[str]) -> dict[tuple[str, int], float]:
    """(task_id, repeat) -> reward of each row in ``path``; a torn last line is cut off the file.

    Rows are appended with one write each, so a crash can only tear the last line (no newline at its
    end, or not JSON): it is truncated away and its rollout is redone. A bad line before the last was
    not made by a crash of this collector, and is refused rather than silently dropped.
    """
    done: dict[tuple[str, int], float] = {}
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return done
    with f:
        size = os.fstat(f.fileno()).st_size
        offset = 0  # where the current line starts; everything before it is whole rows
        for lineno, line in enumerate(f, 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline at its end")
                row = json.loads(line)
                task_id, repeat, reward = str(row["task_id"]), int(row["repeat"]), float(row["reward"])
            except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
                if offset + len(line) < size:
                    raise OutputError(
                        f"{path}:{lineno} is not a rollout row ({e}); a crash only tears the last line, so "
                        f"something else damaged it: delete that line to redo its rollout, or move the file "
                        f"away to start over"
                    ) from None
                log.warning(
                    "%s: dropping a torn last line (%d bytes, %s) that a crash left; its rollout is redone",
                    path, len(line), e,
                )
                os.truncate(path, offset)
                break
            if task_id not in task_ids:
                raise OutputError(
                    f"{path}:{lineno} is a rollout of task {task_id!r}, which the task file lacks: this "
                    f"output_dir holds another task set's rollouts; pass the task file they were collected "
                    f"with, or a new output_dir"
                )
            done[(task_id, repeat)] = reward
            offset += len(line)
    return done


class _OutputLock:
    """The output folder's lock (``LOCK_FILE``): ``flock``, which the kernel drops with the process
    (a SIGKILLed collector leaves no stale lock); ``OutputBusy`` when another collector holds it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __enter__(self) -> "_OutputLock":
        self.fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 4096, 0).decode(errors="replace").strip() or "a collector starting"
            os.close(self.fd)
            raise OutputBusy(
                f"{self.folder} is being written by another collector ({holder}); two must never append to "
                f"one {ROLLOUTS_FILE}: stop that one first, or give this one another output folder"
            ) from None
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        holder = f"pid {os.getpid()} on {socket.gethostname()}" + (f", job {job}" if job else "")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, holder.encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


class _JsonlAppender:
    """A JSONL file that rows are appended to whole: one ``write`` per row, so a line-counting watcher
    and a resumed run see complete lines, and a crash can tear the last one only."""

    def __init__(self, path: Path, truncate: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)
        self.synced_at = time.monotonic()

    def write(self, row: dict) -> None:
        data = memoryview((json.dumps(row) + "\n").encode())
        while data:  # a file takes it in one write unless the disk is full, and then the next one raises
            data = data[os.write(self.fd, data) :]
        if time.monotonic() - self.synced_at >= FSYNC_INTERVAL_S:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.synced_at = time.monotonic()

    def __enter__(self) -> "_JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sync()
        finally:
            os.close(self.fd)


class _StopSignals:
    """SIGTERM/SIGINT/SIGUSR2 while ``collect`` runs: remembered, and the event loop is told to stop.

    The handlers only take note (a handler that raised, or logged, could land between a row's
    bytes or inside a lock); the loop sees ``wait()`` return and cancels the conversations. Installed only in the main thread (where
    Python runs signal handlers; a submitit job and the CLI call ``collect`` there), and the
    previous handlers are put back at the end: submitit's, in a job.
    """

    # SIGUSR2: the time-limit warning (jobs.requeue: the job is requeued once stopped)
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._loop = self._event = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the loop has closed: nothing left to stop
                pass

    async def wait(self) -> None:
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        if self.requested:  # it came before the loop ran
            self._event.set()
        await self._event.wait()


@dataclass
class _Attempt:
    """One (task, repeat) conversation; ``entry`` is the replica that answered its last request."""

    task: Task
    repeat: int
    entry: Entry | None = None
    replica: int | None = None  # the replica that answered its last request (behind a gateway: its header)

    @property
    def session_key(self) -> str:
        return f"{self.task.id}/{self.repeat}"


class _Run:
    """State shared by the conversations of one ``collect`` call (one event loop, so no locks)."""

    def __init__(
        self, cfg: CollectorConfig, pool: EndpointPool, served: Entry, rollouts: _JsonlAppender,
        failures: _JsonlAppender,
    ) -> None:
        self.cfg = cfg
        self.pool = pool
        self.model = served.model
        self.sampling = dataclasses.asdict(cfg.sampling)  # sent with every request, and written in every row
        # A gateway splices itself (gateway.on_policy); replicas straight: this collector does.
        self.splices = cfg.on_policy and served.engine != GATEWAY_ENGINE
        self.model_info: onpolicy.ModelInfo | None = None
        self.contiguity = (0, 0)
        self.rollouts = rollouts
        self.failures_file = failures
        self.stop = _StopSignals()  # all() gets the one collect() installed
        self.not_started = 0  # conversations skipped because a stop was requested
        self.rewards: list[float] = []
        self.failed = 0
        self.generated_tokens = 0

    async def all(self, attempts: list[_Attempt], stop: _StopSignals) -> bool:
        """Every attempt, unless ``stop`` fires first: then those in flight are cancelled (a row is
        one synchronous write, so a cancelled conversation has written all of it or nothing) and
        the rest never start. Returns whether every attempt ran to its end."""
        limits = httpx.Limits(
            max_connections=self.cfg.max_concurrency, max_keepalive_connections=self.cfg.max_concurrency
        )
        # trust_env=False: a cluster's HTTP(S)_PROXY must not capture traffic to its own compute nodes.
        async with httpx.AsyncClient(
            timeout=self.cfg.request_timeout_s, limits=limits, trust_env=False
        ) as client:
            semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
            self.stop = stop
            work = asyncio.gather(*(self.one(client, semaphore, a) for a in attempts))
            stopped = asyncio.ensure_future(stop.wait())
            cut_short = True
            try:
                await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
                cut_short = not work.done() or self.not_started > 0
            finally:
                stopped.cancel()
                if not work.done():
                    if stop.requested:
                        log.warning("%s: stopping the collection", signal.Signals(stop.signum).name)
                    work.cancel()  # gather cancels each conversation, and ends once they all have
                    try:
                        await work
                    except asyncio.CancelledError:
                        pass
            if cut_short:
                return False
            work.result()  # what no conversation caught (a BaseException) ends the collection
            return True

    async def one(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, attempt: _Attempt) -> None:
        async with semaphore:
            if self.stop.requested:  # the cancel is on its way: start nothing meanwhile
                self.not_started += 1
                return
            started = time.monotonic()
            try:
                row = await self.converse(client, attempt)
                verdict = verifiers.judge(attempt.task.raw, row["output"], row["tool_calls"])
            except NoEndpointError as e:
                return self.fail(attempt, "no_endpoint", str(e))
            except RolloutError as e:
                return self.fail(attempt, e.reason, str(e))
            except httpx.HTTPError as e:  # no answer even after the pool's retries on other replicas
                return self.fail(attempt, "connection_error", f"{type(e).__name__}: {e}")
            except Exception as e:  # a bug must cost one rollout, not the whole collection
                log.exception("rollout %s crashed", attempt.session_key)
                return self.fail(attempt, "exception", f"{type(e).__name__}: {e}")
            self.rewards.append(verdict.reward)
            # What explains the reward goes in the row itself, not in a header: a resumed run may
            # append rows made with other settings, and a row read alone still tells its own.
            self.rollouts.write({
                "task_id": attempt.task.id, "repeat": attempt.repeat, **row, "reward": verdict.reward,
                "model": self.model, "sampling": self.sampling,
                "verifier": {"name": attempt.task.raw["verifier"]["name"], **verdict.read},
                "finished_at": time.time(), "latency_s": round(time.monotonic() - started, 4),
            })
            contiguous, checked = onpolicy.prefix_contiguity(
                [[(t["prompt_token_ids"], t["generation_token_ids"]) for t in row["turns"]]])
            self.contiguity = (self.contiguity[0] + contiguous, self.contiguity[1] + checked)

    async def converse(self, client: httpx.AsyncClient, attempt: _Attempt) -> dict:
        task = attempt.task
        messages = copy.deepcopy(task.messages)
        turns: list[dict] = []
        calls: list[dict] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for turn in range(self.cfg.max_turns):
            body = self.request_body(task, messages, first=turn == 0)
            if self.cfg.on_policy and turns and turns[-1]["prompt_token_ids"] and turns[-1]["generation_token_ids"]:
                body[onpolicy.PREFIX_FIELD] = turns[-1]["prompt_token_ids"] + turns[-1]["generation_token_ids"]
            sent = time.monotonic()
            data = await self.post(client, attempt, body, turn)
            record, message = _parse_reply(data)
            record["at"], record["latency_s"] = time.time(), round(time.monotonic() - sent, 4)
            turns.append(record)
            for key in usage:
                usage[key] += record["usage"].get(key) or 0
            self.generated_tokens += record["usage"].get("completion_tokens") or 0
            tool_calls = message.get("tool_calls") or []
            if not tool_calls:
                text = message.get("content") or ""
                messages.append({"role": "assistant", "content": text})
                return {
                    "messages": messages,
                    "output": text,
                    "turns": turns,
                    "finish_reason": record["finish_reason"],
                    "usage": usage,
                    # The last one: the pool moves a conversation whose replica went away.
                    "replica": attempt.replica,
                    "tool_calls": calls,
                }
            messages.append({"role": "assistant", "content": message.get("content"), "tool_calls": tool_calls})
            for call in tool_calls:
                result = _run_tool(call, calls)
                messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
        raise RolloutError("turn_limit", f"no text answer after {self.cfg.max_turns} turns (max_turns)")

    def request_body(self, task: Task, messages: list[dict], first: bool) -> dict:
        body = {
            "model": self.model,
            "messages": messages,
            **self.sampling,
            "logprobs": True,
            "return_token_ids": True,
        }
        if self.cfg.top_logprobs > 0:
            body["top_logprobs"] = self.cfg.top_logprobs
        if task.tools:
            body["tools"] = task.tools
            # A forced call on every turn would never let the model answer.
            body["tool_choice"] = task.tool_choice if first and task.tool_choice is not None else "auto"
        return body

    async def post(self, client: httpx.AsyncClient, attempt: _Attempt, body: dict, turn: int) -> dict:
        # The session header: a gateway keeps the conversation's turns on one replica (a replica
        # ignores it). The request id: the engine's logs name each turn (vLLM logs it with
        # --enable-log-requests, as chatcmpl-<id>), so which replica served what can be read there.
        session = quote(attempt.session_key, safe="/")  # header values are ASCII; task ids may not be
        headers = {SESSION_HEADER: session, "X-Request-Id": f"{session}/{turn}-{secrets.token_hex(3)}"}
        if self.splices and onpolicy.PREFIX_FIELD in body:
            return await self.spliced(client, attempt, body, headers, turn)
        attempt.entry, response = await self.pool.post(
            client, "/chat/completions", body, session_key=attempt.session_key, headers=headers,
        )
        attempt.replica = _replica_of(attempt.entry, response)
        url = f"{attempt.entry.base_url}/chat/completions"
        if response.status_code >= 400:
            raise RolloutError("http_error", f"HTTP {response.status_code} from {url}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError:
            text = response.text[:200]
            raise RolloutError("invalid_response", f"{url} answered with non-JSON: {text!r}") from None

    async def spliced(self, client: httpx.AsyncClient, attempt: _Attempt, body: dict, headers: dict,
                      turn: int) -> dict:
        """The turn through ``server.onpolicy.chat``, each of its steps a pool request (failover
        included; the steps are stateless, so they may land on different replicas)."""

        async def call(method: str, path: str, payload) -> tuple[int, object]:
            attempt.entry, response = await self.pool.post(
                client, path, payload, session_key=attempt.session_key, headers=headers, method=method, root=True)
            attempt.replica = attempt.entry.replica
            try:
                return response.status_code, response.json()
            except ValueError:
                raise RolloutError("invalid_response", f"{attempt.entry.root_url}{path} answered {response.status_code} "
                                   f"with non-JSON: {response.text[:200]!r}") from None

        try:
            if self.model_info is None:
                self.model_info = await onpolicy.model_info(call)
            status, data = await onpolicy.chat(call, body, self.model_info)
        except onpolicy.Unsupported as e:
            # As the gateway does: said once, and the turns go as they are (the summary's contiguity
            # figure shows what that cost). The replicas share one engine config: it holds for all.
            if self.splices:
                log.warning("on-policy splicing unsupported by the replicas, turns are sent unchanged: %s", e)
                self.splices = False
            return await self.post(client, attempt, body, turn)
        except RuntimeError as e:
            raise RolloutError("http_error", str(e)) from None
        if status >= 400:
            raise RolloutError("http_error", f"HTTP {status} from {attempt.entry.root_url}: {str(data)[:500]}")
        if not data[onpolicy.RESPONSE_FIELD]["spliced"]:
            log.warning("rollout %s: turn not spliced: %s", attempt.session_key, data[onpolicy.RESPONSE_FIELD]["reason"])
        return data

    def fail(self, attempt: _Attempt, reason: str, error: str) -> None:
        self.failed += 1
        log.warning("rollout %s failed (%s): %s", attempt.session_key, reason, error)
        replica = attempt.replica
        row = {"task_id": attempt.task.id, "repeat": attempt.repeat, "reason": reason, "error": error}
        self.failures_file.write({**row, "replica": replica, "at": time.time()})


def _replica_of(entry: Entry, response: httpx.Response) -> int:
    """The replica that answered: the gateway names it (``<replica>-<job id>``), else the entry is one."""
    named = response.headers.get(REPLICA_HEADER, "").partition("-")[0]
    return int(named) if named.isdigit() else entry.replica


def _parse_reply(data: dict) -> tuple[dict, dict]:
    """vLLM's chat completion -> (the per-turn record, the assistant message)."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
        content = (choice.get("logprobs") or {}).get("content") or []
        record = {
            "prompt_token_ids": data.get("prompt_token_ids"),
            "generation_token_ids": choice.get("token_ids"),
            "generation_logprobs": [float(t["logprob"]) for t in content],
            "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage") or {},
        }
        if any(t.get("top_logprobs") for t in content):
            record["generation_top_logprobs"] = [
                {alt["token"]: float(alt["logprob"]) for alt in t.get("top_logprobs") or []} for t in content
            ]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise RolloutError(
            "invalid_response", f"not a chat completion ({type(e).__name__}: {e}): {str(data)[:200]}"
        ) from None
    return record, message


def _run_tool(call: dict, calls: list[dict]) -> str:
    try:
        name = call["function"]["name"]
        arguments = call["function"].get("arguments") or "{}"
        result = tools.call_tool(name, arguments)
    except Exception as e:
        raise RolloutError("tool_error", f"tool call {call!r} raised {type(e).__name__}: {e}") from e
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = arguments  # the verifier sees what the model wrote
    calls.append({"name": name, "arguments": parsed, "result": result})
    return result


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.rollouts", description=__doc__.split("\n")[0])
    parser.add_argument("--service", default=CollectorConfig.service, help="service name in the registry (default: %(default)s)")
    parser.add_argument("--tasks", default=CollectorConfig.tasks, help="task JSONL (default: the bundled demo tasks)")
    parser.add_argument("--output-dir", required=True, help="where rollouts.jsonl and failures.jsonl go")
    parser.add_argument(
        "--namespace", default=os.environ.get(NAMESPACE_ENV), help=f"run namespace (default: ${NAMESPACE_ENV})"
    )
    parser.add_argument(
        "--root", default=None, help=f"registry root (default: ${ROOT_ENV} or ~/.gymlaunch/registry)"
    )
    parser.add_argument("--num-repeats", type=int, default=CollectorConfig.num_repeats, help="rollouts per task")
    parser.add_argument("--max-concurrency", type=int, default=CollectorConfig.max_concurrency, help="conversations in flight")
    parser.add_argument("--max-turns", type=int, default=CollectorConfig.max_turns, help="model calls per conversation")
    parser.add_argument("--temperature", type=float, default=SamplingParams.temperature)
    parser.add_argument("--max-tokens", type=int, default=SamplingParams.max_tokens, help="per model call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = CollectorConfig(
        service=args.service,
        tasks=args.tasks,
        output_dir=args.output_dir,
        namespace=args.namespace or None,
        registry=Registry(args.root),
        num_repeats=args.num_repeats,
        max_concurrency=args.max_concurrency,
        max_turns=args.max_turns,
        sampling=SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens),
    )
    try:
        summary = collect(cfg)
    except (TaskFileError, OutputError, NoEndpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CollectionStopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    print(json.dumps(summary.to_json(), indent=1))
    return 1 if summary.failures and not summary.rollouts_written_this_run else 0


if __name__ == "__main__":
    sys.exit(main())
