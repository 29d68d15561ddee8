"""The built-in rollout collector: Gym-format tasks in, rollouts with token ids and rewards out.

Tasks are JSONL in NeMo Gym's input shape (``responses_create_params`` with a
Responses-API ``input`` and ``tools``, plus a ``verifier``). Each (task,
repeat) becomes one conversation with one replica of a service found in the
registry: chat completions, local tools from ``jobs.tools`` run between
turns, a reward from ``jobs.verifiers`` at the end. Every finished
conversation is one line of ``rollouts.jsonl`` (or of ``failures.jsonl``),
written as soon as it ends so that a watcher can count progress.

``collect`` is synchronous and takes one picklable config, so that it can be
submitted as a submitit job; the concurrency lives inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from jobs import tools, verifiers
from jobs.pool import EndpointPool, NoEndpointError
from server.registry import DEFAULT_TTL_S, NAMESPACE_ENV, ROOT_ENV, Entry

log = logging.getLogger(__name__)

API_KEY_ENV = "GYMLAUNCH_API_KEY"
DEMO_TASKS = str(Path(__file__).parent / "tasks" / "demo.jsonl")


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256


@dataclass
class CollectorConfig:
    service: str = "policy"
    tasks: str = DEMO_TASKS
    output_dir: str = "rollouts"
    namespace: str | None = None
    registry_root: str | None = None
    registry_ttl_s: float = DEFAULT_TTL_S
    num_repeats: int = 1
    max_concurrency: int = 16
    max_turns: int = 4  # model calls per conversation
    top_logprobs: int = 0
    request_timeout_s: float = 120.0
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class CollectSummary:
    tasks: int
    rollouts_written: int
    failures: int
    mean_reward: float | None  # None when no rollout was written
    generated_tokens: int  # every answered request, failed rollouts included: the servers did that work
    wall_s: float
    generated_tokens_per_s: float
    rollouts_path: str
    failures_path: str

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


def collect(cfg: CollectorConfig) -> CollectSummary:
    """Run every (task, repeat) once and write ``rollouts.jsonl`` and ``failures.jsonl`` in ``output_dir``."""
    tasks = load_tasks(cfg.tasks)
    pool = EndpointPool(cfg.service, cfg.namespace, cfg.registry_root, ttl_s=cfg.registry_ttl_s)
    pool.pick("")  # no replica at all is a setup problem: say so once, not once per rollout
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rollouts_path, failures_path = out / "rollouts.jsonl", out / "failures.jsonl"
    start = time.monotonic()
    with open(rollouts_path, "w", encoding="utf-8") as ok, open(failures_path, "w", encoding="utf-8") as failed:
        run = _Run(cfg, pool, ok, failed)
        asyncio.run(run.all(tasks))
    wall_s = time.monotonic() - start
    return CollectSummary(
        tasks=len(tasks),
        rollouts_written=len(run.rewards),
        failures=run.failed,
        mean_reward=sum(run.rewards) / len(run.rewards) if run.rewards else None,
        generated_tokens=run.generated_tokens,
        wall_s=round(wall_s, 3),
        generated_tokens_per_s=round(run.generated_tokens / wall_s, 2) if wall_s > 0 else 0.0,
        rollouts_path=str(rollouts_path),
        failures_path=str(failures_path),
    )


class _Run:
    """State shared by the conversations of one ``collect`` call (one event loop, so no locks)."""

    def __init__(self, cfg: CollectorConfig, pool: EndpointPool, rollouts: IO[str], failures: IO[str]) -> None:
        self.cfg = cfg
        self.pool = pool
        self.rollouts = rollouts
        self.failures_file = failures
        self.rewards: list[float] = []
        self.failed = 0
        self.generated_tokens = 0
        self.keys: dict[str | None, str | None] = {}  # api_key_file -> key, read once

    async def all(self, tasks: list[Task]) -> None:
        limits = httpx.Limits(
            max_connections=self.cfg.max_concurrency, max_keepalive_connections=self.cfg.max_concurrency
        )
        # trust_env=False: a cluster's HTTP(S)_PROXY must not capture traffic to its own compute nodes.
        async with httpx.AsyncClient(
            timeout=self.cfg.request_timeout_s, limits=limits, trust_env=False
        ) as client:
            semaphore = asyncio.Semaphore(self.cfg.max_concurrency)
            await asyncio.gather(
                *(self.one(client, semaphore, task, r) for task in tasks for r in range(self.cfg.num_repeats))
            )

    async def one(self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, task: Task, repeat: int) -> None:
        async with semaphore:
            entry: Entry | None = None
            try:
                entry = self.pool.pick(f"{task.id}/{repeat}")
                row = await self.converse(client, entry, task)
                row["reward"] = verifiers.score(task.raw, row["output"], row["tool_calls"])
            except NoEndpointError as e:
                return self.fail(task, repeat, entry, "no_endpoint", str(e))
            except RolloutError as e:
                return self.fail(task, repeat, entry, e.reason, str(e))
            except httpx.HTTPError as e:  # connection refused, timeout, ... (no answer at all)
                return self.fail(task, repeat, entry, "connection_error", f"{type(e).__name__}: {e}")
            except Exception as e:  # a bug must cost one rollout, not the whole collection
                log.exception("rollout %s/%d crashed", task.id, repeat)
                return self.fail(task, repeat, entry, "exception", f"{type(e).__name__}: {e}")
            self.rewards.append(row["reward"])
            self._write(self.rollouts, {"task_id": task.id, "repeat": repeat, **row})

    async def converse(self, client: httpx.AsyncClient, entry: Entry, task: Task) -> dict:
        messages = copy.deepcopy(task.messages)
        turns: list[dict] = []
        calls: list[dict] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        for turn in range(self.cfg.max_turns):
            body = self.request_body(entry, task, messages, first=turn == 0)
            data = await self.post(client, entry, body)
            record, message = _parse_reply(data)
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
                    "replica": entry.replica,
                    "tool_calls": calls,
                }
            messages.append({"role": "assistant", "content": message.get("content"), "tool_calls": tool_calls})
            for call in tool_calls:
                result = _run_tool(call, calls)
                messages.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": result})
        raise RolloutError("turn_limit", f"no text answer after {self.cfg.max_turns} turns (max_turns)")

    def request_body(self, entry: Entry, task: Task, messages: list[dict], first: bool) -> dict:
        body = {
            "model": entry.model,
            "messages": messages,
            **dataclasses.asdict(self.cfg.sampling),
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

    async def post(self, client: httpx.AsyncClient, entry: Entry, body: dict) -> dict:
        url = f"{entry.base_url}/chat/completions"
        response = await client.post(url, json=body, headers=self.auth(entry))
        if response.status_code >= 400:
            raise RolloutError("http_error", f"HTTP {response.status_code} from {url}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError:
            text = response.text[:200]
            raise RolloutError("invalid_response", f"{url} answered with non-JSON: {text!r}") from None

    def auth(self, entry: Entry) -> dict[str, str]:
        """The replica's own key (from its registry entry), else ``$GYMLAUNCH_API_KEY``."""
        if entry.api_key_file not in self.keys:
            self.keys[entry.api_key_file] = entry.read_api_key() or os.environ.get(API_KEY_ENV)
        key = self.keys[entry.api_key_file]
        return {"Authorization": f"Bearer {key}"} if key else {}

    def fail(self, task: Task, repeat: int, entry: Entry | None, reason: str, error: str) -> None:
        self.failed += 1
        log.warning("rollout %s/%d failed (%s): %s", task.id, repeat, reason, error)
        row = {"task_id": task.id, "repeat": repeat, "reason": reason, "error": error}
        self._write(self.failures_file, {**row, "replica": entry.replica if entry is not None else None})

    @staticmethod
    def _write(f: IO[str], row: dict) -> None:
        # One write per line, flushed at once: readers count lines while the run goes on.
        f.write(json.dumps(row) + "\n")
        f.flush()


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
    parser.add_argument("--service", default="policy", help="service name in the registry (default: policy)")
    parser.add_argument("--tasks", default=DEMO_TASKS, help="task JSONL (default: the bundled demo tasks)")
    parser.add_argument("--output-dir", required=True, help="where rollouts.jsonl and failures.jsonl go")
    parser.add_argument(
        "--namespace", default=os.environ.get(NAMESPACE_ENV), help=f"run namespace (default: ${NAMESPACE_ENV})"
    )
    parser.add_argument(
        "--root", default=None, help=f"registry root (default: ${ROOT_ENV} or ~/.gymlaunch/registry)"
    )
    parser.add_argument("--num-repeats", type=int, default=1, help="rollouts per task")
    parser.add_argument("--max-concurrency", type=int, default=16, help="conversations in flight")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = CollectorConfig(
        service=args.service,
        tasks=args.tasks,
        output_dir=args.output_dir,
        namespace=args.namespace or None,
        registry_root=args.root,
        num_repeats=args.num_repeats,
        max_concurrency=args.max_concurrency,
    )
    try:
        summary = collect(cfg)
    except (TaskFileError, NoEndpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_json(), indent=1))
    return 1 if summary.failures and not summary.rollouts_written else 0


if __name__ == "__main__":
    sys.exit(main())
