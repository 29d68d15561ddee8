"""``python -m server.verify`` against real vLLM (CPU build) serving the embedded SmolLM2: the
shared replica passes every check; a second vLLM started with a tool parser that does not fit
SmolLM2's hermes-style chat template fails with the diagnosis that names the one that does."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from server.engines import build_launch
from server.job import free_port
from server.process import log_tail, stop
from server.models import prepare
from tests.support import ROOT, cpu_engine

# A parser vLLM 0.32 accepts for SmolLM2's tokenizer (llama3_json and mistral refuse to start:
# their special tokens are missing) and that brings its own grammar (Qwen3-Coder's XML calls),
# so forced calls still come back parsed: only the tool_parser check can tell.
WRONG_PARSER = "qwen3_xml"


def verify_cli(base_url: str, model: str, *flags: str, api_key: str | None = None) -> subprocess.CompletedProcess:
    # The key travels in the environment, never on the command line.
    env = {**os.environ, "COLUMNS": "400"}  # one table row per line
    if api_key:
        env["GYMLAUNCH_API_KEY"] = api_key
    return subprocess.run(
        # A generous --timeout: on 2 busy cores a first grammar-constrained call can take long.
        [sys.executable, "-m", "server.verify", "--base-url", base_url, "--model", model, "--timeout", "120", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def row(output: str, check: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {check} "))


@pytest.fixture(scope="module")
def wrong_parser_server(tmp_path_factory):
    """A plain vLLM child (no registry: only its URL matters), always stopped at the end."""
    port = free_port("127.0.0.1")
    launch = build_launch(cpu_engine(tool_call_parser=WRONG_PARSER), str(prepare("smollm2_135m")), "127.0.0.1", port)
    log = tmp_path_factory.mktemp("wrong-parser") / "engine.log"
    with open(log, "wb") as out:
        # Own session, so stop reaches vLLM's workers through the process group.
        proc = subprocess.Popen(launch.argv, env={**os.environ, **launch.env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"vLLM with --tool-call-parser {WRONG_PARSER} died:\n{log_tail(log)}"
            assert time.monotonic() < deadline, f"vLLM not healthy in 600 s:\n{log_tail(log)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc, grace_s=15)


def test_cli_passes_every_check_on_the_policy_server(policy_server):
    read_key = getattr(policy_server, "read_api_key", None)
    done = verify_cli(policy_server.base_url, policy_server.model, "--tools", "--logprobs",
                      api_key=read_key() if read_key else None)
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("models", "chat", "logprobs", "tokenize", "tool_required", "tool_named", "tool_parser"):
        assert "│ pass " in row(done.stdout, check), done.stdout
    assert "reads the template's call '<tool_call>" in row(done.stdout, "tool_parser")
    # /tokenize asked as NeMo Gym asks it (messages and tools), compared with what chat generated from.
    assert "the ids chat completions generate from" in row(done.stdout, "tokenize"), done.stdout


def test_cli_fails_on_a_tool_parser_that_does_not_fit_the_model(wrong_parser_server):
    done = verify_cli(wrong_parser_server, cpu_engine().served_name, "--tools")
    assert done.returncode == 1, done.stdout + done.stderr
    # The finding this check exists for: forced calls pass under the wrong parser.
    assert "│ pass " in row(done.stdout, "tool_required") and "│ pass " in row(done.stdout, "tool_named")
    failed = row(done.stdout, "tool_parser")
    assert "│ FAIL " in failed, done.stdout
    assert ("the tool_call_parser does not fit this model family's output: calls written as <tool_call> "
            "are read by tool_call_parser hermes") in failed
    assert "not ready: tool_parser failed" in done.stdout
