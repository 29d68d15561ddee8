"""A stand-in for an inference engine: a real OpenAI-compatible HTTP server with no model behind it.

It is NOT an engine. It exists so that tests and demos can drive the whole server-job
lifecycle (start, health, registry, API key, shutdown) and a Gym client's requests on a
machine without a GPU or vLLM, as ``server=openai_command``:

    python -m server.standin --host 127.0.0.1 --port 8000 --model NAME [--health-path /healthz]

Routes, in vLLM's shapes:
- ``GET <health path>``: 200 once serving.
- ``GET /v1/models``: lists NAME.
- ``POST /v1/chat/completions``: a deterministic echo of the last message, with
  ``prompt_token_ids`` and ``choices[0].token_ids`` when ``return_token_ids`` is set and
  ``logprobs.content`` (with ``top_logprobs``) when ``logprobs`` is set. With ``tools`` and
  ``tool_choice`` ``"required"`` or a named function it answers one parsed ``tool_calls`` entry
  whose arguments fill the function's JSON schema; under ``"auto"`` it never calls a tool, so
  a tool-using conversation ends after the forced turn.
- ``POST /tokenize``: ``{"prompt": ...}`` or ``{"messages": ...}``.

Tokens are UTF-8 bytes (token id = byte value) and prompts are rendered as ChatML, so token
IDs are consistent between ``/tokenize`` and chat completions. When ``$OPENAI_API_KEY`` is
set, ``/v1/*`` needs ``Authorization: Bearer <key>`` (401 otherwise), as vLLM's ``--api-key``
guards ``/v1`` only. SIGTERM or SIGINT stop it cleanly with exit code 0.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

MAX_MODEL_LEN = 32768  # reported only: byte tokens make long prompts, and nothing here runs out of memory
_CHOSEN_LOGPROB = -0.25  # the echoed token is always the most likely one
_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(self.status, "Error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


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


def render_prompt(messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True) -> str:
    """ChatML, with the tools as a system turn: what a chat template would feed the model."""
    turns = []
    if tools:
        turns.append(f"{_IM_START}system\n# Tools\n{json.dumps(tools, sort_keys=True)}{_IM_END}\n")
    for message in messages:
        text = message_text(message)
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"], sort_keys=True)
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


def chat_completion(body: dict, model: str) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if body.get("stream"):
        raise ApiError(400, "the stand-in does not stream; send stream=false", "stream")
    if body.get("n", 1) != 1:
        raise ApiError(400, "the stand-in answers n=1 only", "n")
    tools = body.get("tools")
    prompt_ids = encode(render_prompt(messages, tools))
    function = forced_tool(tools, body.get("tool_choice"))
    if function is not None:
        call = {"name": function["name"], "arguments": example_value(function.get("parameters") or {"type": "object"})}
        text = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"  # what a hermes-style model writes
    else:
        text = f"Echo: {message_text(messages[-1])}"
    ids = encode(text)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    truncated = limit is not None and len(ids) > limit
    if truncated:
        ids = ids[:limit]
    message: dict[str, Any] = {"role": "assistant", "content": bytes(ids).decode(errors="replace")}
    finish_reason = "length" if truncated else "stop"
    if function is not None and not truncated:
        message["content"] = None
        message["tool_calls"] = [{
            "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }]
        finish_reason = "tool_calls"
    with_ids = bool(body.get("return_token_ids"))
    top, as_ids = body.get("top_logprobs") or 0, bool(body.get("return_tokens_as_token_ids"))
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
        ranked = [(token_id, _CHOSEN_LOGPROB)] + [((token_id + k) % 256, -1.0 - k) for k in range(1, top)]
        content.append({
            "token": name(token_id),
            "logprob": _CHOSEN_LOGPROB,
            "bytes": [token_id],
            "top_logprobs": [{"token": name(t), "logprob": lp, "bytes": [t]} for t, lp in ranked[:top]],
        })
    return content


def tokenize(body: dict) -> dict:
    if "messages" in body:
        text = render_prompt(body["messages"], body.get("tools"), body.get("add_generation_prompt", True))
    elif "prompt" in body:
        text = body["prompt"]
    else:
        raise ApiError(400, "send either prompt or messages", "prompt")
    ids = encode(text)
    strs = [token_text(t) for t in ids] if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": strs}


class StandinServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not hold up the shutdown
    request_queue_size = 128  # the default backlog (5) resets connections when many clients connect at once

    def __init__(
        self, address: tuple[str, int], model: str, health_path: str, api_key: str | None,
        seconds_per_token: float = 0.0,
    ) -> None:
        super().__init__(address, _Handler)
        self.model, self.health_path, self.api_key = model, health_path, api_key
        self.seconds_per_token = seconds_per_token  # simulated decode time, so requests can be in flight
        self.running = 0
        self.lock = threading.Lock()

    def completion(self, body: dict) -> dict:
        with self.lock:
            self.running += 1
        try:
            answer = chat_completion(body, self.model)
            time.sleep(self.seconds_per_token * answer["usage"]["completion_tokens"])
            return answer
        finally:
            with self.lock:
                self.running -= 1

    def metrics(self) -> str:
        """vLLM's in-flight gauges, in Prometheus text format."""
        label = f'{{model_name="{self.model}"}}'
        return f"vllm:num_requests_running{label} {self.running}.0\nvllm:num_requests_waiting{label} 0.0\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' connection pools expect
    # Headers and body go out in two sends: with Nagle's algorithm each answer would wait
    # for the client's delayed ACK (~40 ms on Linux).
    disable_nagle_algorithm = True
    server: StandinServer

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._send_bytes(200, self.server.metrics().encode(), "text/plain; version=0.0.4")
            return
        self._answer({
            self.server.health_path: lambda raw: {},
            "/v1/models": lambda raw: self._models(),
        })

    def do_POST(self) -> None:
        self._answer({
            "/v1/chat/completions": lambda raw: self.server.completion(self._json(raw)),
            "/tokenize": lambda raw: tokenize(self._json(raw)),
        })

    def _answer(self, routes: dict[str, Callable[[bytes], dict]]) -> None:
        path = self.path.split("?", 1)[0]
        try:
            # Read the body before any early answer: left unread, it would corrupt the next request.
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path not in routes:
                raise ApiError(404, f"no route {self.command} {path}")
            if path.startswith("/v1/"):
                self._authorize()
            self._send(200, routes[path](raw))
        except ApiError as e:
            self._send(e.status, e.body())
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field of the wrong shape
            self._send(400, ApiError(400, f"malformed request: {type(e).__name__}: {e}").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

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

    def _send(self, status: int, body: dict) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--health-path", default="/health")
    parser.add_argument("--seconds-per-token", type=float, default=0.0, help="simulated decode time")
    args = parser.parse_args(argv)
    server = StandinServer(
        (args.host, args.port), args.model, args.health_path, os.environ.get("OPENAI_API_KEY"),
        args.seconds_per_token,
    )

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever(), which runs in this very thread: ask from another.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"stand-in (no model) serving {args.model!r} at http://{args.host}:{args.port}", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
