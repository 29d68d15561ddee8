"""server.verify against the stand-in engine (server/standin.py, no model) on 127.0.0.1, told
to answer wrongly one fault at a time: its "tokenizer" maps each byte to a token, its "chat
template" is ChatML with hermes-style tool calls, and what its "model" writes under forced
calls is set by the test."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from server import verify
from server.registry import API_KEY_ENV
from server.gateway import Gateway, GatewaySettings, GatewayThread
from server.registry import Registry
from server.standin import StandIn
from server.verify import check_chat, readiness_checks
from tests.support import MODEL as SUPPORT_MODEL, NAMESPACE, ROOT, SERVICE, publish

MODEL = "standin"
ALL_CHECKS = ["models", "chat", "logprobs", "tokenize", "tool_required", "tool_named", "tool_parser"]

# What a model writes when a call is forced: get_weather(city=Paris) the way each model family
# writes it, or no call at all.
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


@pytest.fixture
def engine():
    """A stand-in without faults, as a well-configured vLLM answers."""
    with StandIn(model=MODEL) as server:
        yield server


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
    engine.api_key = "s3cret"
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


@pytest.mark.parametrize("family, engine_parser, parser", [
    ("hermes", "qwen3_xml", "hermes"), ("qwen3_xml", "hermes", "qwen3_xml"), ("mistral", "hermes", "mistral"),
    ("llama3_json", "hermes", "llama3_json"), ("bare_json", "hermes", "llama3_json"),
])
def test_call_text_in_content_names_the_parser_that_fits(engine, family, engine_parser, parser):
    """The engine's parser is another family's and constrains nothing (as a parser without a grammar
    of its own): the model writes its native format, and the parser finds no call in it."""
    engine.faults.writes, engine.faults.tool_parser = WRITTEN[family], engine_parser
    results = by_name(readiness_checks(engine.base_url, MODEL, tools=True))
    for name in ("tool_required", "tool_named"):
        assert not results[name].ok
        assert results[name].detail.startswith("no tool_calls; the model wrote ")
        assert results[name].hint.startswith("the tool_call_parser does not fit this model family's output: ")
        assert results[name].hint.endswith(f"read by tool_call_parser {parser} (vLLM: --tool-call-parser {parser})")


def test_plain_text_answer_to_a_forced_call(engine):
    engine.faults.writes = WRITTEN["plain_text"]
    result = by_name(readiness_checks(engine.base_url, MODEL, tools=True))["tool_required"]
    assert not result.ok
    assert result.hint.startswith("the engine answered a forced call with plain text")


@pytest.mark.parametrize("takes_parser_branch", [False, True])
def test_wrong_parser_with_its_own_grammar(engine, takes_parser_branch):
    """vLLM 0.32 constrains forced calls to the parser's format: they pass under a parser that
    does not fit the model; only the template round trip shows it."""
    engine.faults.writes, engine.faults.tool_parser = WRITTEN["qwen3_xml"], "qwen3_xml"
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
        assert failed.detail.endswith("the engine's parser found no call in that text (2 of 2 attempts)")


def test_engine_without_tool_parser(engine):
    engine.faults.tool_parser = None  # started without --enable-auto-tool-choice/--tool-call-parser
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


def test_tokenize_is_asked_as_nemo_gym_asks_and_agrees_with_chat(engine):
    with verify.make_client() as client:
        result = verify.check_tokenize(client, engine.base_url, MODEL)
    assert result.ok and result.detail.endswith("prompt tokens, the ids chat completions generate from"), result
    sent = next(e.body for e in engine.requests if e.path == "/tokenize")
    # NeMo Gym 0.7's body (responses_api_models/vllm_model/app.py, _TOKENIZE_CHAT_FIELDS): no add_generation_prompt.
    assert set(sent) == {"model", "messages", "tools"}


def test_tokenize_that_renders_without_the_tools_fails(engine):
    engine.faults.tokenize_drops_tools = True
    result = by_name(readiness_checks(engine.base_url, MODEL, logprobs=True))["tokenize"]
    assert not result.ok and "the chat completion of the same messages and tools generated from" in result.detail
    assert result.hint.startswith("/tokenize must render messages and tools with the chat template")


def test_the_token_checks_pass_through_the_gateway(tmp_path, standins):
    """NeMo Gym calls the gateway's root /tokenize (not /v1/tokenize); the gate checks it there too."""
    publish(tmp_path, standins(2))
    gateway = Gateway(SERVICE, NAMESPACE, Registry(tmp_path), GatewaySettings(refresh_s=0.05, wait_s=2.0))
    with GatewayThread(gateway) as gw:
        results = by_name(readiness_checks(gw.url + "/v1", SUPPORT_MODEL, logprobs=True))
    assert results["logprobs"].ok and results["tokenize"].ok, results
    assert results["tokenize"].detail.endswith("the ids chat completions generate from")


def test_tokenize_needs_no_tool_parser(engine):
    engine.faults.tool_parser = None  # a vLLM without --enable-auto-tool-choice: tool_choice "none" still answers
    assert by_name(readiness_checks(engine.base_url, MODEL, logprobs=True))["tokenize"].ok


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
    engine.api_key = "s3cret"
    assert verify.main(["--base-url", engine.base_url]) == 1
    monkeypatch.setenv(API_KEY_ENV, "s3cret")
    assert verify.main(["--base-url", engine.base_url]) == 0
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    monkeypatch.setenv(API_KEY_ENV, "stale")
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
