"""A stand-in for an inference engine: a real OpenAI-compatible HTTP server with no model behind it.

It is NOT an engine. It exists so that tests and demos can drive the whole server-job
lifecycle (start, health, registry, API key, shutdown) and a Gym client's requests on a
machine without a GPU or vLLM. As a process (``server=openai_command``):

    python -m server.standin --host 127.0.0.1 --port 8000 --model NAME [--health-path /healthz]
                             [--seconds-per-token S]
                             [--nnodes N --node-rank R --head-addr A --dist-port P [--own-addr B]]

``--port 0`` takes a free port; the first line it prints names it. In a test, on a thread:

    with StandIn(model="m") as server:  # server.port, server.base_url, server.requests
        server.faults.status = 503       # switches are read per request

Routes, in vLLM's shapes:
- ``GET <health path>``: 200 once serving. ``GET /metrics``: vLLM's in-flight gauges.
- ``GET /v1/models``: lists NAME.
- ``POST /v1/chat/completions``: what "the model" writes (below), with ``prompt_token_ids`` and
  ``choices[0].token_ids`` when ``return_token_ids`` is set and ``logprobs.content`` (with
  ``top_logprobs``) when ``logprobs`` is set. When the request offers ``tools``, the engine's
  tool parser (hermes by default) reads calls out of that text into ``tool_calls``, as vLLM's
  does. A ``structured_outputs.choice`` pins the text to its first choice.
- ``POST /tokenize`` (``{"prompt": ...}`` or ``{"messages": ...}``) and ``POST /detokenize``.

What the model writes: an echo of the last message (``Echo: ...``); when a call is forced
(``tool_choice`` ``"required"`` or a named function), a hermes-style call whose arguments fill
the function's JSON schema. ``Faults.writes`` replaces it with a fixed text or a function of
the request. Tokens are UTF-8 bytes (token id = byte value) and prompts are rendered as
ChatML with hermes-style calls, so token IDs agree between ``/tokenize`` and chat completions.

A replica spanning nodes (``--nnodes`` > 1), as vLLM's multi-node engines behave: the head
(``--node-rank 0``) listens on ``--head-addr:--dist-port`` and binds its HTTP port only once every
worker joined it there (it exits 1 if they have not within ``--join-timeout-s``). A worker
(rank > 0) serves nothing: it connects to the head from ``--own-addr``, retrying until the same
bound (then exits 1 naming the address), holds the connection, and exits 1 when the head goes. If
a worker's connection drops, the head keeps answering its health route with 200 but holds every
chat completion unanswered, as vLLM's head does when a pipeline stage is gone: only the workers
can tell.

``Faults`` holds the switches for what a misbehaving or misconfigured engine does; its
defaults answer as a healthy vLLM. When an API key is set (``$OPENAI_API_KEY`` for the
process), every route but the health route needs ``Authorization: Bearer <key>`` (401 otherwise,
before the body is read), as the project's engines check it (server/auth.py). SIGTERM or SIGINT stop the process cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from server.auth import HEALTH_METHODS, UNAUTHORIZED_BODY, carries_key

MAX_MODEL_LEN = 32768  # reported only: byte tokens make long prompts, and nothing here runs out of memory
CHOSEN_LOGPROB = -0.25  # the written token is always the most likely one
CHAT = "/v1/chat/completions"
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_NO_PARSER = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclass
class Faults:
    """What the stand-in does unlike a healthy, well-configured vLLM: one switch a fault, all off
    by default. Read at each request, so a test may flip them while the server runs."""

    # Chat completions that get no completion.
    status: int = 200  # any other: every chat completion is answered with this HTTP status
    fail_on: dict[str, int] = field(default_factory=dict)  # last user message contains KEY: HTTP status VALUE
    answers_left: int | None = None  # after this many chat answers, 503 to each: an engine shutting down
    drop_connection: bool = False  # half of each chat answer, then the connection closes: an engine dying mid-answer
    seconds_per_token: float = 0.0  # simulated decode time: slow answers, in flight meanwhile
    # What comes back.
    writes: str | Callable[[dict], str] | None = None  # what the model writes; a function gets the request body
    tool_parser: str | None = "hermes"  # the call format the parser reads (TOOL_PARSERS); None: no parser, 400
    takes_parser_branch: bool = False  # pinned to a choice, with tools: the model writes its own call instead
    token_ids: bool = True  # False: no prompt_token_ids / token_ids, even when return_token_ids asks
    token_id_tokens: bool = True  # False: return_tokens_as_token_ids is ignored
    template_drops_calls: bool = False  # the chat template renders assistant turns without their tool calls
    detokenize: bool = True  # False: no /detokenize route (OpenAI-compatible servers other than vLLM)
    tokenize_drops_tools: bool = False  # /tokenize renders messages without the tools (a proxy passing only messages)


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}.get(self.status, "Error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


@dataclass
class Exchange:
    """A POST the stand-in received and what it answered (``status`` None: no answer yet, or dropped)."""

    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON, or None
    status: int | None = None
    answer: dict | None = None


def encode(text: str) -> list[int]:
    return list(text.encode())


def token_text(token_id: int) -> str:
    # Alone, a byte of a multi-byte character is no text: shown as U+FFFD, as byte-level tokenizers do.
    return bytes([token_id]).decode(errors="replace")


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only the text ones mean anything here
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def hermes_call(name: str, arguments: dict) -> str:
    """A tool call as hermes-style models write it (and this stand-in's chat template renders it)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def _read_hermes(text: str) -> list[dict]:
    calls = []
    for found in re.findall(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S):
        try:
            call = json.loads(found)
        except ValueError:
            continue  # not a call it can read: left in the text
        if isinstance(call, dict) and "name" in call:
            calls.append({"name": call["name"], "arguments": call.get("arguments", {})})
    return calls


def _read_qwen3_xml(text: str) -> list[dict]:
    pattern = r"<function=(\w+)>\s*<parameter=(\w+)>\s*(.*?)\s*</parameter>\s*</function>"
    return [{"name": name, "arguments": {key: value}} for name, key, value in re.findall(pattern, text, re.S)]


# vLLM tool parser name -> the calls it reads out of generated text.
TOOL_PARSERS: dict[str, Callable[[str], list[dict]]] = {"hermes": _read_hermes, "qwen3_xml": _read_qwen3_xml}


def render_prompt(
    messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True, faults: Faults | None = None,
) -> str:
    """ChatML, with the tools as a system turn and assistant calls hermes-style: what a chat
    template would feed the model."""
    drop_calls = faults is not None and faults.template_drops_calls
    turns = []
    if tools:
        turns.append(f"{_IM_START}system\n# Tools\n{json.dumps(tools, sort_keys=True)}{_IM_END}\n")
    for message in messages:
        text = message_text(message)
        for call in [] if drop_calls else message.get("tool_calls") or []:
            function = call.get("function", call)
            arguments = function.get("arguments")
            if isinstance(arguments, str):  # OpenAI clients send a JSON string, vLLM hands templates a dict
                arguments = json.loads(arguments)
            text += hermes_call(function["name"], arguments)
        turns.append(f"{_IM_START}{message.get('role', 'user')}\n{text}{_IM_END}\n")
    if add_generation_prompt:
        turns.append(f"{_IM_START}assistant\n")
    return "".join(turns)


def example_value(schema: dict) -> Any:
    """A value that fits a JSON schema, the same every time."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: example_value(prop) for name, prop in (schema.get("properties") or {}).items()}
    return {"integer": 1, "number": 1.0, "boolean": True, "array": [], "null": None}.get(kind, "stand-in")


def forced_tool(tools: list[dict] | None, tool_choice: Any) -> dict | None:
    """The function a ``required`` or named ``tool_choice`` makes the answer call, if any."""
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        return None
    functions = [t.get("function", t) for t in tools or []]
    if not functions:
        raise ApiError(400, "tool_choice requires a tool call but no tools were given", "tool_choice")
    if tool_choice == "required":
        return functions[0]
    name = (tool_choice.get("function") or {}).get("name")
    for function in functions:
        if function.get("name") == name:
            return function
    raise ApiError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")


def written_text(body: dict, faults: Faults) -> str:
    """What the model writes for this request, before max_tokens cuts it."""
    tools = body.get("tools")
    function = forced_tool(tools, body.get("tool_choice"))
    pinned = (body.get("structured_outputs") or {}).get("choice")
    if pinned:
        if not (tools and faults.takes_parser_branch):
            return pinned[0]
        # vLLM's grammar offers the parser's call format next to the choice: the model takes that branch.
        function = function or tools[0].get("function", tools[0])
    if callable(faults.writes):
        return faults.writes(body)
    if faults.writes is not None:
        return faults.writes
    if function is not None:
        return hermes_call(function["name"], example_value(function.get("parameters") or {"type": "object"}))
    return f"Echo: {message_text(body['messages'][-1])}"


def chat_completion(body: dict, model: str, faults: Faults | None = None) -> dict:
    faults = faults or Faults()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if body.get("stream"):
        raise ApiError(400, "the stand-in does not stream; send stream=false", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, "the stand-in answers n=1 only", "n")
    tools = body.get("tools")
    # As vLLM: tools without a tool_choice mean "auto"; with "none" the prompt shows them, nothing is parsed.
    parse_calls = bool(tools) and body.get("tool_choice", "auto") != "none"
    if parse_calls and faults.tool_parser is None:
        raise ApiError(400, _NO_PARSER, "tool_choice")
    prompt_ids = encode(render_prompt(messages, tools, faults=faults))
    ids = encode(written_text(body, faults))
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    truncated = limit is not None and len(ids) > limit
    if truncated:
        ids = ids[:limit]
    text = bytes(ids).decode(errors="replace")
    calls = TOOL_PARSERS[faults.tool_parser](text) if parse_calls else []
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish_reason = "length" if truncated else "stop"
    if calls:
        message["content"] = None
        message["tool_calls"] = [{
            "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        } for call in calls]
        finish_reason = "tool_calls"
    with_ids = bool(body.get("return_token_ids")) and faults.token_ids
    top = body.get("top_logprobs") or 0
    as_ids = bool(body.get("return_tokens_as_token_ids")) and faults.token_id_tokens
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": logprobs(ids, top, as_ids)} if body.get("logprobs") else None,
        "finish_reason": finish_reason,
        "stop_reason": None,
        "token_ids": ids if with_ids else None,
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids),
                  "total_tokens": len(prompt_ids) + len(ids), "prompt_tokens_details": None},
        "prompt_token_ids": prompt_ids if with_ids else None,
    }


def logprobs(ids: list[int], top: int, as_ids: bool = False) -> list[dict]:
    """vLLM's ``logprobs.content``: the chosen token first among its ``top`` alternatives;
    ``as_ids`` names tokens "token_id:N" as vLLM's ``return_tokens_as_token_ids`` does."""
    name = (lambda t: f"token_id:{t}") if as_ids else token_text
    content = []
    for token_id in ids:
        ranked = [(token_id, CHOSEN_LOGPROB)] + [((token_id + k) % 256, -1.0 - k) for k in range(1, top)]
        content.append({
            "token": name(token_id),
            "logprob": CHOSEN_LOGPROB,
            "bytes": [token_id],
            "top_logprobs": [{"token": name(t), "logprob": lp, "bytes": [t]} for t, lp in ranked[:top]],
        })
    return content


def tokenize(body: dict, faults: Faults | None = None) -> dict:
    if "messages" in body:
        tools = None if faults and faults.tokenize_drops_tools else body.get("tools")
        text = render_prompt(body["messages"], tools, body.get("add_generation_prompt", True), faults)
    elif "prompt" in body:
        text = body["prompt"]
    else:
        raise ApiError(400, "send either prompt or messages", "prompt")
    ids = encode(text)
    strs = [token_text(t) for t in ids] if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": strs}


def detokenize(body: dict) -> dict:
    return {"prompt": bytes(body["tokens"]).decode(errors="replace")}


class StandIn(ThreadingHTTPServer):
    """The stand-in server. ``port=0`` binds a free port; ``start()`` serves on a daemon thread
    (or use it as a context manager), ``stop()`` ends it. With ``record``, every POST is kept in
    ``requests`` (an ``Exchange`` each, in arrival order). Closing ``gate`` holds chat
    completions in flight (counted by /metrics) until it is set again."""

    daemon_threads = True  # an idle keep-alive connection must not hold up the shutdown
    request_queue_size = 128  # the default backlog (5) resets connections when many clients connect at once

    def __init__(
        self, model: str = "stand-in-model", host: str = "127.0.0.1", port: int = 0, health_path: str = "/health",
        api_key: str | None = None, faults: Faults | None = None, record: bool = True, log_requests: bool = False,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.model, self.health_path, self.api_key = model, health_path, api_key
        self.faults = faults or Faults()
        self.requests: list[Exchange] | None = [] if record else None
        self.log_requests = log_requests
        self.gate = threading.Event()
        self.gate.set()
        self.running = 0
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def root_url(self) -> str:
        return f"http://{self.server_address[0]}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def start(self) -> StandIn:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()  # held requests get their answers
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, path: str, headers: dict[str, str], raw: bytes) -> Exchange | None:
        if self.requests is None:
            return None
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        exchange = Exchange(path, headers, body)
        with self.lock:
            self.requests.append(exchange)
        return exchange

    def completion(self, body: dict) -> dict:
        faults = self.faults
        with self.lock:
            self.running += 1
        try:
            self.gate.wait()
            self._refuse(body, faults)
            answer = chat_completion(body, self.model, faults)
            time.sleep(faults.seconds_per_token * answer["usage"]["completion_tokens"])
            return answer
        finally:
            with self.lock:
                self.running -= 1

    def _refuse(self, body: dict, faults: Faults) -> None:
        """Raises the error a fault answers this chat completion with, if any."""
        if faults.status != 200:
            raise ApiError(faults.status, f"stand-in told to answer {faults.status}")
        with self.lock:
            if faults.answers_left is not None:
                if faults.answers_left <= 0:
                    raise ApiError(503, "stand-in shutting down")
                faults.answers_left -= 1
        users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        prompt = message_text(users[-1]) if users else ""
        for key, status in faults.fail_on.items():
            if key in prompt:
                raise ApiError(status, f"stand-in told to answer {status} to {key!r}")

    def metrics(self) -> str:
        """vLLM's in-flight gauges, in Prometheus text format."""
        label = f'{{model_name="{self.model}"}}'
        return f"vllm:num_requests_running{label} {self.running}.0\nvllm:num_requests_waiting{label} 0.0\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' connection pools expect
    # Headers and body go out in two sends: with Nagle's algorithm each answer would wait
    # for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    server: StandIn

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/metrics":
            self._send_bytes(200, self.server.metrics().encode(), "text/plain; version=0.0.4")
            return
        self._answer({
            self.server.health_path: lambda body: {},
            "/v1/models": lambda body: self._models(),
        })

    def do_POST(self) -> None:
        if not self._authorized():
            return
        faults = self.server.faults
        routes = {CHAT: self.server.completion, "/tokenize": lambda body: tokenize(body, faults)}
        if faults.detokenize:
            routes["/detokenize"] = detokenize
        self._answer(routes)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    def _answer(self, routes: dict[str, Callable[[dict], dict]]) -> None:
        path = self.path.split("?", 1)[0]
        # Read the body before any early answer: left unread, it would corrupt the next request.
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        exchange = self.server.record(path, dict(self.headers), raw) if self.command == "POST" else None
        try:
            if path not in routes:
                raise ApiError(404, f"no route {self.command} {path}")
            status, body = 200, routes[path](self._json(raw) if self.command == "POST" else {})
        except ApiError as e:
            status, body = e.status, e.body()
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field of the wrong shape
            status, body = 400, ApiError(400, f"malformed request: {type(e).__name__}: {e}").body()
        data = json.dumps(body).encode()
        if path == CHAT and status == 200 and self.server.faults.drop_connection:
            self._send_bytes(status, data[: len(data) // 2], "application/json", length=len(data))
            self.close_connection = True  # the promised rest never comes
            return
        if exchange is not None:
            exchange.status, exchange.answer = status, body
        self._send_bytes(status, data, "application/json")

    def _authorized(self) -> bool:
        """With a key set, every route but the health route needs it, checked before the body is
        read (server/auth.py, as the engines' middleware checks it). A refused request's body is
        never read, so its connection cannot carry another request: it closes after the 401."""
        key = self.server.api_key
        if not key or (self.command in HEALTH_METHODS and self.path.split("?", 1)[0] == self.server.health_path):
            return True
        given = self.headers.get("Authorization")
        if carries_key(given.encode() if given is not None else None, key.encode()):
            return True
        self.close_connection = True
        self._send_bytes(401, UNAUTHORIZED_BODY, "application/json", close=True)
        return False

    def _json(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.server.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "model")
        return body

    def _models(self) -> dict:
        card = {"id": self.server.model, "object": "model", "created": int(time.time()),
                "owned_by": "gymlaunch-standin", "root": self.server.model, "max_model_len": MAX_MODEL_LEN}
        return {"object": "list", "data": [card]}

    def _send_bytes(
        self, status: int, data: bytes, content_type: str, length: int | None = None, close: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def start_process(
    model: str, *args: str, host: str = "127.0.0.1", timeout_s: float = 30.0,
) -> tuple[subprocess.Popen, int]:
    """``python -m server.standin`` on a free port, in a process of its own (one a test can
    SIGKILL, or one that does not share the caller's GIL); returns it and its port once it
    listens. ``args``: more command-line flags."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.standin", "--host", host, "--port", "0", "--model", model, *args],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    timer = threading.Timer(timeout_s, proc.kill)  # a stand-in that never prints must not hang the caller
    timer.start()
    try:
        line = proc.stdout.readline()
    finally:
        timer.cancel()
    found = re.search(r" at http://[^:]+:(\d+)$", line.strip())
    if found is None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the stand-in did not start (exit code {proc.poll()}): {line!r}")
    proc.stdout.close()  # nothing else comes: its request log goes to stderr
    return proc, int(found.group(1))


# ---------------------------------------------------------------- a replica spanning nodes

_JOINED = "joined"


def _say(text: str) -> None:
    """A line for the node's log (stderr: stdout's first line is the serving address)."""
    print(f"stand-in: {text}", file=sys.stderr, flush=True)


def _read_line(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def await_workers(
    head_addr: str, dist_port: int, nnodes: int, timeout_s: float, stopping: threading.Event,
) -> dict[int, socket.socket] | None:
    """The head's side: every worker's connection by rank, once all ``nnodes - 1`` joined; None if
    told to stop first. Exits 1 when they have not joined within ``timeout_s``."""
    listener = socket.create_server((head_addr, dist_port))
    listener.settimeout(0.2)
    _say(f"head waiting for {nnodes - 1} worker(s) at {head_addr}:{dist_port}")
    joined: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    with listener:
        while len(joined) < nnodes - 1:
            if stopping.is_set():
                return None
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, nnodes)) - set(joined))
                _say(f"head: worker rank(s) {missing} did not join at {head_addr}:{dist_port} within {timeout_s:g} s")
                sys.exit(1)
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)
            try:
                words = _read_line(conn).split()
                rank, their_nnodes = int(words[1]), int(words[2])
            except (OSError, ValueError, IndexError):
                conn.close()
                continue
            problem = (f"nnodes {their_nnodes} is not the head's {nnodes}" if their_nnodes != nnodes else
                       f"rank {rank} is not one of 1..{nnodes - 1}" if not 0 < rank < nnodes else
                       f"rank {rank} joined already" if rank in joined else None)
            if problem:
                conn.sendall(f"refused: {problem}\n".encode())
                conn.close()
                continue
            conn.sendall(f"{_JOINED}\n".encode())
            conn.settimeout(None)
            joined[rank] = conn
            _say(f"head: worker rank {rank} joined from {peer[0]}")
    return joined


def watch_worker(conn: socket.socket, rank: int, server: StandIn) -> None:
    """Until the worker's connection drops; then chat completions hang and health stays 200."""
    try:
        while conn.recv(1024):
            pass
    except OSError:
        pass
    server.gate.clear()
    _say(f"head: lost worker rank {rank}; chat completions now hang (health still answers 200)")


def run_worker(
    head_addr: str, dist_port: int, rank: int, nnodes: int, own_addr: str | None, timeout_s: float,
    stopping: threading.Event,
) -> int:
    """A worker node: join the head, hold the connection until it drops (exit code 1) or a signal (0)."""
    where = f"{head_addr}:{dist_port}"
    _say(f"worker rank {rank} of {nnodes} joining the head at {where}")
    deadline = time.monotonic() + timeout_s
    while True:
        if stopping.is_set():
            return 0
        try:
            wait_s = max(0.1, min(5.0, deadline - time.monotonic()))
            conn = socket.create_connection((head_addr, dist_port), timeout=wait_s,
                                            source_address=(own_addr, 0) if own_addr else None)
            break
        except OSError as e:
            if own_addr and e.errno == 99:  # EADDRNOTAVAIL: not an address of this node
                _say(f"worker rank {rank}: cannot send from {own_addr} (--own-addr): no interface of this node has it")
                return 1
            if time.monotonic() > deadline:
                _say(f"worker rank {rank}: cannot reach the head at {where} within {timeout_s:g} s: {e}")
                return 1
            stopping.wait(0.2)
    with conn:
        conn.sendall(f"join {rank} {nnodes}\n".encode())
        try:
            reply = _read_line(conn)
        except OSError as e:
            reply = str(e)
        if reply != _JOINED:
            _say(f"worker rank {rank}: the head at {where} did not take it: {reply or 'connection closed'}")
            return 1
        _say(f"worker rank {rank} of {nnodes} joined the head at {where}")
        conn.settimeout(0.2)
        while not stopping.is_set():
            try:
                if not conn.recv(1024):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            return 0
    _say(f"worker rank {rank}: lost the head at {where}; exiting")
    return 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: a free one (printed)")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--health-path", default="/health")
    parser.add_argument("--seconds-per-token", type=float, default=0.0, help="simulated decode time")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the replica")
    parser.add_argument("--node-rank", type=int, default=0, help="0: the head, which serves; above: a worker")
    parser.add_argument("--head-addr", help="the head's address (with --nnodes > 1)")
    parser.add_argument("--dist-port", type=int, help="the head's port for its workers (with --nnodes > 1)")
    parser.add_argument("--own-addr", help="a worker's own address, which its connection leaves from")
    parser.add_argument("--join-timeout-s", type=float, default=60.0,
                        help="head: for every worker to join; worker: to reach the head")
    args = parser.parse_args(argv)
    if not 0 <= args.node_rank < args.nnodes:
        parser.error(f"--node-rank {args.node_rank} is not in 0..{args.nnodes - 1}")
    if args.nnodes > 1 and (not args.head_addr or not args.dist_port):
        parser.error("--nnodes > 1 needs --head-addr and --dist-port")

    stopping = threading.Event()
    serving: list[StandIn] = []

    def stop(signum: int, frame: object) -> None:
        stopping.set()
        if serving:
            # shutdown() waits for serve_forever(), which runs in this very thread: ask from another.
            threading.Thread(target=serving[0].shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.node_rank > 0:
        sys.exit(run_worker(args.head_addr, args.dist_port, args.node_rank, args.nnodes, args.own_addr,
                            args.join_timeout_s, stopping))
    workers = {}
    if args.nnodes > 1:
        workers = await_workers(args.head_addr, args.dist_port, args.nnodes, args.join_timeout_s, stopping)
        if workers is None:
            return
    server = StandIn(
        args.model, args.host, args.port, args.health_path, os.environ.get("OPENAI_API_KEY"),
        Faults(seconds_per_token=args.seconds_per_token), record=False, log_requests=True,
    )
    serving.append(server)
    for rank, conn in workers.items():
        threading.Thread(target=watch_worker, args=(conn, rank, server), daemon=True).start()
    print(f"stand-in (no model) serving {args.model!r} at http://{args.host}:{server.port}", flush=True)
    if not stopping.is_set():  # a signal between the rendezvous and `serving` found nothing to shut down
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
