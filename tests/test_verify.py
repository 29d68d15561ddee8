"""server.verify against a stand-in engine: a real HTTP server on 127.0.0.1 that answers in
vLLM 0.32's shapes and can be told to answer wrongly, one fault at a time. No model runs:
its "tokenizer" maps each character to its code point, its "chat template" is ChatML with
hermes-style tool calls, and what its "model" writes is fixed by the fault settings."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server import verify
from server.verify import check_chat, readiness_checks

ROOT = Path(__file__).resolve().parents[1]
MODEL = "standin"
ALL_CHECKS = ["models", "chat", "logprobs", "tokenize", "tool_required", "tool_named", "tool_parser"]

# What the stand-in's model writes when a call is forced: get_weather(city=Paris) the way each
# model family writes it, or no call at all.
WRITTEN = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "qwen3_xml": (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    ),
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "bare_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "plain_text": "I think it is sunny in Paris.",
}
# How each tool parser reads calls back out of what the model wrote.
PARSERS = {
    "hermes": lambda text: [json.loads(m) for m in re.findall(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S)],
    "qwen3_xml": lambda text: [
        {"name": name, "arguments": {key: value}}
        for name, key, value in re.findall(r"<function=(\w+)>\s*<parameter=(\w+)>\s*(.*?)\s*</parameter>", text, re.S)
    ],
}


@dataclass
class Faults:
    """What the stand-in engine gets wrong; the defaults answer like a well-configured vLLM."""

    models: list[str] = field(default_factory=lambda: [MODEL])
    api_key: str | None = None
    token_ids: bool = True  # prompt_token_ids / choices[].token_ids when return_token_ids is asked
    token_id_tokens: bool = True  # logprob tokens "token_id:N" when return_tokens_as_token_ids is asked
    writes: str = "hermes"  # a WRITTEN key: what its model writes under forced calls
    reads: str | None = "hermes"  # the format its tool parser reads; None: reads nothing
    # Under a pinned `auto` answer, vLLM offers the parser's format next to the pinned text.
    takes_parser_branch: bool = False
    no_tool_parser: bool = False  # started without --enable-auto-tool-choice/--tool-call-parser
    detokenize: bool = True
    template_drops_calls: bool = False


class StandInEngine(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults = Faults()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _NoRoute(Exception):
    """Answered as FastAPI answers an unknown path."""


class _Handler(BaseHTTPRequestHandler):
    server: StandInEngine

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer({"/v1/models": self._models}, None)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer({"/v1/chat/completions": self._chat, "/tokenize": self._tokenize,
                      "/detokenize": self._detokenize}, body)

    def _answer(self, routes: dict, body: dict | None) -> None:
        try:
            if self.path not in routes:
                raise _NoRoute
            status, data = 200, routes[self.path](body)
        except _ApiError as e:
            status, data = e.status, {"error": {"message": str(e), "type": "Error", "param": None, "code": e.status}}
        except _NoRoute:
            status, data = 404, {"detail": "Not Found"}
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _models(self, _body: None) -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in self._faults(v1=True).models]}

    def _faults(self, v1: bool = False) -> Faults:
        faults = self.server.faults
        # vLLM's --api-key guards /v1 only.
        if v1 and faults.api_key and self.headers.get("Authorization") != f"Bearer {faults.api_key}":
            raise _ApiError(401, "Unauthorized")
        return faults

    def _model(self, faults: Faults, body: dict) -> None:
        if body.get("model") not in faults.models:
            raise _ApiError(404, f"The model `{body.get('model')}` does not exist.")

    def _chat(self, body: dict) -> dict:
        faults = self._faults(v1=True)
        self._model(faults, body)
        tool_choice, pinned = body.get("tool_choice"), (body.get("structured_outputs") or {}).get("choice")
        if body.get("tools") and faults.no_tool_parser:
            raise _ApiError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        if pinned and not faults.takes_parser_branch:
            text = pinned[0]
        elif tool_choice == "required" or isinstance(tool_choice, dict) or pinned:
            text = WRITTEN[faults.writes]
        else:
            text = "Hello there, it is sunny in Paris."[: body.get("max_tokens") or None]
        calls = PARSERS[faults.reads](text) if body.get("tools") and faults.reads else []
        message = {"role": "assistant", "content": None if calls else text, "tool_calls": [
            {"id": f"call-{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for i, c in enumerate(calls)
        ]}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop", "logprobs": None}
        data = {"id": "chatcmpl-standin", "object": "chat.completion", "model": body["model"], "choices": [choice]}
        if body.get("logprobs"):
            as_ids = body.get("return_tokens_as_token_ids") and faults.token_id_tokens
            name = (lambda ch: f"token_id:{ord(ch)}") if as_ids else (lambda ch: ch)
            choice["logprobs"] = {"content": [
                {"token": name(ch), "logprob": -0.5, "top_logprobs": [{"token": name(ch), "logprob": -0.5}]}
                for ch in text
            ]}
        if body.get("return_token_ids") and faults.token_ids:
            data["prompt_token_ids"] = _encode(_render(body["messages"], True, faults))
            choice["token_ids"] = _encode(text)
        return data

    def _tokenize(self, body: dict) -> dict:
        faults = self._faults()
        self._model(faults, body)
        tokens = _encode(_render(body["messages"], body.get("add_generation_prompt", True), faults))
        return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens, "token_strs": None}

    def _detokenize(self, body: dict) -> dict:
        if not self._faults().detokenize:
            raise _NoRoute
        return {"prompt": "".join(map(chr, body["tokens"]))}


def _encode(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def _render(messages: list[dict], add_generation_prompt: bool, faults: Faults) -> str:
    """ChatML; assistant tool calls hermes-style, unless the fault drops them."""
    text = "<|im_start|>system\nYou are a stand-in.<|im_end|>\n"
    for m in messages:
        content = m.get("content") or ""
        if not faults.template_drops_calls:
            for call in m.get("tool_calls") or []:
                fn = call["function"]
                content += f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {fn["arguments"]}}}\n</tool_call>'
        text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def engine_server():
    server = StandInEngine()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def engine(engine_server) -> StandInEngine:
    engine_server.faults = Faults()
    return engine_server


def by_name(results) -> dict:
    return {r.name: r for r in results}


def test_all_checks_pass_on_good_shapes(engine):
    results = readiness_checks(engine.base_url, MODEL, tools=True, logprobs=True)
    assert [r.name for r in results] == ALL_CHECKS
    assert all(r.ok for r in results), results
    assert by_name(results)["tool_parser"].detail.startswith("reads the template's call '<tool_call>")


def test_default_gate_is_models_then_chat(engine):
    assert [r.name for r in readiness_checks(engine.base_url, MODEL)] == ["models", "chat"]


def test_model_not_listed_stops_the_gate(engine):
    results = readiness_checks(engine.base_url, "smollm2", tools=True, logprobs=True)
    assert [(r.name, r.ok) for r in results] == [("models", False)]
    assert "the served name differs: /v1/models lists ['standin']" in results[0].hint


def test_chat_with_an_unknown_model_names_the_served_ones(engine):
    with verify.make_client() as client:
        result = check_chat(client, engine.base_url, "smollm2")
    assert not result.ok
    assert "HTTP 404" in result.detail and "the served name differs: /v1/models lists ['standin']" in result.hint


def test_connection_refused_says_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    results = readiness_checks(f"http://127.0.0.1:{port}/v1", MODEL, timeout_s=5)
    assert [(r.name, r.ok) for r in results] == [("models", False)]
    assert results[0].hint.startswith(f"nothing listens at 127.0.0.1:{port}: the engine is still starting, died")


def test_api_key(engine):
    engine.faults.api_key = "s3cret"
    missing = readiness_checks(engine.base_url, MODEL)[0]
    assert not missing.ok and "HTTP 401" in missing.detail
    assert missing.hint.startswith("the endpoint wants an API key: pass --api-key/--api-key-file")
    wrong = readiness_checks(engine.base_url, MODEL, api_key="guess")[0]
    assert wrong.hint.startswith("the endpoint refused the API key")
    assert all(r.ok for r in readiness_checks(engine.base_url, MODEL, api_key="s3cret", tools=True, logprobs=True))


def test_missing_token_ids(engine):
    engine.faults.token_ids = False
    results = by_name(readiness_checks(engine.base_url, MODEL, logprobs=True))
    assert not results["logprobs"].ok and results["tokenize"].ok
    assert results["logprobs"].detail == "the answer lacks prompt_token_ids, choices[0].token_ids"
    assert results["logprobs"].hint.startswith(
        "the engine does not return token ids/logprobs: vLLM needs return_token_ids (>=0.10.2)")


def test_token_id_tokens_are_required_for_gym_training(engine):
    engine.faults.token_id_tokens = False
    result = by_name(readiness_checks(engine.base_url, MODEL, logprobs=True))["logprobs"]
    assert not result.ok and "return_tokens_as_token_ids" in result.hint


@pytest.mark.parametrize("family, parser", [
    ("hermes", "hermes"), ("qwen3_xml", "qwen3_xml"), ("mistral", "mistral"),
    ("llama3_json", "llama3_json"), ("bare_json", "llama3_json"),
])
def test_call_text_in_content_names_the_parser_that_fits(engine, family, parser):
    """A parser without a grammar of its own lets the model write its native format, then finds nothing."""
    engine.faults.writes, engine.faults.reads = family, None
    results = by_name(readiness_checks(engine.base_url, MODEL, tools=True))
    for name in ("tool_required", "tool_named"):
        assert not results[name].ok
        assert results[name].detail.startswith("no tool_calls; the model wrote ")
        assert results[name].hint.startswith("the tool_call_parser does not fit this model family's output: ")
        assert results[name].hint.endswith(f"read by tool_call_parser {parser} (vLLM: --tool-call-parser {parser})")


def test_plain_text_answer_to_a_forced_call(engine):
    engine.faults.writes, engine.faults.reads = "plain_text", None
    result = by_name(readiness_checks(engine.base_url, MODEL, tools=True))["tool_required"]
    assert not result.ok
    assert result.hint.startswith("the engine answered a forced call with plain text")


@pytest.mark.parametrize("takes_parser_branch", [False, True])
def test_wrong_parser_with_its_own_grammar(engine, takes_parser_branch):
    """vLLM 0.32 constrains forced calls to the parser's format: they pass under a parser that
    does not fit the model; only the template round trip shows it."""
    engine.faults.writes = engine.faults.reads = "qwen3_xml"
    engine.faults.takes_parser_branch = takes_parser_branch
    results = by_name(readiness_checks(engine.base_url, MODEL, tools=True))
    assert results["tool_required"].ok and results["tool_named"].ok
    failed = results["tool_parser"]
    assert not failed.ok
    assert failed.hint == ("the tool_call_parser does not fit this model family's output: calls written as "
                           "<tool_call> are read by tool_call_parser hermes (vLLM: --tool-call-parser hermes)")
    if takes_parser_branch:
        assert failed.detail.startswith(
            "the engine's parser makes the model write calls as '<tool_call>\\n<function=get_weather>")
    else:
        assert failed.detail.endswith("the engine's parser found no call in that text")


def test_engine_without_tool_parser(engine):
    engine.faults.no_tool_parser = True
    results = by_name(readiness_checks(engine.base_url, MODEL, tools=True))
    for name in ("tool_required", "tool_named", "tool_parser"):
        assert not results[name].ok and "HTTP 400" in results[name].detail
        assert results[name].hint == "start the engine with enable_auto_tool_choice and a tool_call_parser"


def test_template_that_drops_tool_calls(engine):
    engine.faults.template_drops_calls = True
    result = by_name(readiness_checks(engine.base_url, MODEL, tools=True))["tool_parser"]
    assert not result.ok and result.detail.startswith("the chat template drops the tool call")
    assert "chatml_hermes_tools.jinja" in result.hint


def test_tool_parser_is_not_checked_where_templates_cannot_be_rendered(engine):
    engine.faults.detokenize = False
    result = by_name(readiness_checks(engine.base_url, MODEL, tools=True))["tool_parser"]
    assert result.ok and result.detail.startswith("not checked: /detokenize is missing here")


def test_tokenize_missing(engine):
    url = engine.base_url.removesuffix("/v1") + "/nothing/v1"  # a proxy serving /v1 only
    with verify.make_client() as client:
        result = verify.check_tokenize(client, url, MODEL)
    assert not result.ok and "HTTP 404" in result.detail
    assert result.hint.startswith("the engine has no /tokenize at")


def test_cli_passes_with_a_table(engine, capsys):
    assert verify.main(["--base-url", engine.base_url, "--tools", "--logprobs"]) == 0
    out = capsys.readouterr().out
    for name in ALL_CHECKS:
        assert re.search(rf"│ {name} +│ pass ", out), name
    assert f"model {MODEL}" in out  # the default: the first listed model
    assert "ready: all 7 checks passed" in out


def test_cli_fails_with_the_hint(engine, capsys):
    assert verify.main(["--base-url", engine.base_url, "--model", "smollm2"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "the served name differs" in out
    assert "not ready: models failed" in out


def test_cli_reads_the_api_key_from_the_environment_or_a_file(engine, capsys, monkeypatch, tmp_path):
    engine.faults.api_key = "s3cret"
    assert verify.main(["--base-url", engine.base_url]) == 1
    monkeypatch.setenv(verify.API_KEY_ENV, "s3cret")
    assert verify.main(["--base-url", engine.base_url]) == 0
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    monkeypatch.setenv(verify.API_KEY_ENV, "stale")
    assert verify.main(["--base-url", engine.base_url, "--api-key-file", str(key_file)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        verify.main(["--base-url", engine.base_url, "--api-key-file", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "cannot read --api-key-file" in capsys.readouterr().err


def test_python_dash_m_entry_point(engine):
    ok = subprocess.run([sys.executable, "-m", "server.verify", "--base-url", engine.base_url],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failing = subprocess.run([sys.executable, "-m", "server.verify", "--base-url", engine.base_url, "--model", "x"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert failing.returncode == 1 and "the served name differs" in failing.stdout
