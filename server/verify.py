"""Checks an OpenAI-compatible endpoint must pass before NeMo Gym traffic is sent to it.

    python -m server.verify --base-url http://HOST:PORT/v1 [--model NAME] [--tools] [--logprobs]
                            [--api-key-file F | --api-key K] [--timeout S]

Each check sends real requests and yields a ``CheckResult``; a failure says what was seen
(``detail``) and what to do (``hint``). The exit code is 0 only if every check passes.

Checks: ``models`` (``GET /v1/models`` lists the model), ``chat`` (a 1-token chat
completion); with ``--logprobs``: ``logprobs`` (logprobs + prompt and generated token ids)
and ``tokenize`` (``POST <root>/tokenize``); with ``--tools``: ``tool_required`` and
``tool_named`` (forced calls come back as parsed ``tool_calls``) and ``tool_parser`` (the
engine's tool_call_parser reads the calls the model's chat template writes).

The API key comes from ``--api-key-file``, ``--api-key`` or ``$GYMLAUNCH_API_KEY``; prefer the
file or the variable, as command lines are visible to every user of the node.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from server.registry import API_KEY_ENV


_PROMPT = "What is the weather in Paris?"
_TOOL_NAME = "get_weather"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": _TOOL_NAME,
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# One call is about 30-40 tokens; the margin covers the whitespace a grammar lets a small model add.
_CALL_MAX_TOKENS = 96
# What a model family writes at the start of a tool call -> the vLLM tool_call_parser that reads
# it, compared with whitespace removed. First match wins: Qwen3-Coder's XML calls also sit in
# <tool_call>, and hermes calls contain {"name":.
_CALL_MARKERS = (
    ("<function=", "qwen3_xml"),
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ('{"name":', "llama3_json"),
)
_PARSER_MISSING = re.compile(r"tool.?call.?parser|auto.?tool.?choice|tool parser", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
# What an answer in the wrong shape raises while it is read (missing key, None, bad JSON).
_SHAPE_ERRORS = (ValueError, LookupError, TypeError)


@dataclass
class CheckResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ""  # what the endpoint answered
    hint: str = ""  # what to do about a failure


class CheckFailed(Exception):
    """The endpoint answered, but not what Gym needs."""

    def __init__(self, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.detail, self.hint = detail, hint


Check = Callable[[httpx.Client, str, str], CheckResult]


def make_client(api_key: str | None = None, timeout_s: float = 30.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(headers=headers, timeout=timeout_s)


def served_models(client: httpx.Client, base_url: str) -> list[str]:
    """The model ids ``GET /v1/models`` lists."""
    return [m["id"] for m in _json(client.get(f"{base_url.rstrip('/')}/models"))["data"]]


def check_models(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """``GET /v1/models`` lists the model."""

    def body() -> str:
        served = served_models(client, base_url)
        if not served:
            raise CheckFailed("/v1/models lists no model", "the engine serves nothing yet: see its log")
        if model not in served:
            raise CheckFailed(f"/v1/models lists {served}, not {model!r}", _served_name_hint(served))
        return f"lists {served}"

    return _run("models", body, client, base_url)


def check_chat(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """A 1-token chat completion returns ``choices[0].message.content`` as a string."""

    def body() -> str:
        content = _chat(client, base_url, model, max_tokens=1)["choices"][0]["message"].get("content")
        if not isinstance(content, str):
            raise CheckFailed(
                f"choices[0].message.content is {content!r}, not a string",
                "the endpoint's chat completions are not OpenAI-shaped: point --base-url at an "
                "OpenAI-compatible server",
            )
        return f"answered {content!r}"

    return _run("chat", body, client, base_url)


def check_logprobs(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """Logprobs and token ids come back, as training on rollouts needs them: ``prompt_token_ids``
    (top level, vLLM's shape) and ``choices[0].token_ids``, one logprob per generated token."""

    def body() -> str:
        data = _chat(
            client, base_url, model, max_tokens=4, logprobs=True, top_logprobs=1, return_token_ids=True,
            return_tokens_as_token_ids=True,
        )
        choice = data["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        logprobs = [t.get("logprob") for t in content]
        prompt_ids, token_ids = data.get("prompt_token_ids"), choice.get("token_ids")
        missing = [
            name for name, present in (
                ("choices[0].logprobs.content[*].logprob",
                 logprobs and all(isinstance(lp, (int, float)) for lp in logprobs)),
                ("prompt_token_ids", prompt_ids),
                ("choices[0].token_ids", token_ids),
            ) if not present
        ]
        if missing:
            raise CheckFailed(
                f"the answer lacks {', '.join(missing)}",
                "the engine does not return token ids/logprobs: vLLM needs return_token_ids (>=0.10.2); for "
                "other engines, serve with one that returns prompt and generated token ids with logprobs, or "
                "leave out --logprobs if nothing trains on these rollouts",
            )
        if len(token_ids) != len(logprobs):
            raise CheckFailed(
                f"{len(token_ids)} generated token ids but {len(logprobs)} logprobs",
                "the engine's token ids and logprobs disagree, so they cannot be paired for training: "
                "report it to the engine; do not train on this endpoint",
            )
        # NeMo Gym's training variant reads generated ids from "token_id:N" logprob tokens.
        if [t.get("token") for t in content] != [f"token_id:{i}" for i in token_ids]:
            raise CheckFailed(
                f"logprob tokens are {[t.get('token') for t in content][:4]}, not 'token_id:N' for the token ids",
                "NeMo Gym's training variant needs return_tokens_as_token_ids: vLLM supports it; other "
                "engines need an equivalent",
            )
        return f"{len(prompt_ids)} prompt ids, {len(token_ids)} generated ids with logprobs and token_id:N tokens"

    return _run("logprobs", body, client, base_url)


def check_tokenize(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """``POST <root>/tokenize`` turns chat messages into the prompt token ids a chat completion of
    the same messages generates from.

    NeMo Gym's training variant sends exactly ``{model, messages, tools}`` there (plus
    ``chat_template_kwargs`` when configured; no ``add_generation_prompt``, so the engine's default,
    with the generation prompt), and records the answer as the prompt ids of the generation
    (0.4 for every call; 0.7 when the chat answer carries no ``prompt_token_ids``:
    responses_api_models/vllm_model/app.py, ``_TOKENIZE_CHAT_FIELDS``). Ids that differ from the
    engine's own would be trained on as a prompt the model never saw."""

    def body() -> str:
        messages = [{"role": "user", "content": _PROMPT}]
        answer = _json(client.post(f"{_root(base_url)}/tokenize", json={
            "model": model, "messages": messages, "tools": [WEATHER_TOOL],
        }))
        tokens = answer.get("tokens")
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise CheckFailed(
                f"/tokenize answered tokens={tokens!r}",
                "NeMo Gym's training variant reads prompt token ids from /tokenize: serve with vLLM",
            )
        # "none": the prompt still shows the tools, and no tool parser is needed to answer.
        used = _chat(client, base_url, model, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=1,
                     return_token_ids=True).get("prompt_token_ids")
        if used is None:  # the logprobs check says the engine returns no token ids
            return f"{len(tokens)} prompt tokens (chat completions return no prompt ids to compare)"
        if used != tokens:
            at = next((i for i, (a, b) in enumerate(zip(tokens, used)) if a != b), min(len(tokens), len(used)))
            raise CheckFailed(
                f"/tokenize gives {len(tokens)} prompt ids, the chat completion of the same messages and tools "
                f"generated from {len(used)}; they differ from id {at} on",
                "/tokenize must render messages and tools with the chat template chat completions use "
                "(a proxy in front of the engine must pass tools through unchanged)",
            )
        return f"{len(tokens)} prompt tokens, the ids chat completions generate from"

    return _run("tokenize", body, client, base_url)


def check_tool_required(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """``tool_choice: "required"`` comes back as a parsed ``tool_calls`` array."""
    return _run("tool_required", lambda: _forced_call(client, base_url, model, "required"), client, base_url,
                TOOL_ATTEMPTS)


def check_tool_named(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """``tool_choice`` naming the function comes back as a parsed ``tool_calls`` array."""
    named = {"type": "function", "function": {"name": _TOOL_NAME}}
    return _run("tool_named", lambda: _forced_call(client, base_url, model, named), client, base_url, TOOL_ATTEMPTS)


def check_tool_parser(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """The engine's tool_call_parser reads back the call its own chat template writes.

    Forced calls cannot show this. vLLM 0.32 constrains them to the *parser's* format (its
    structural tag) or to a generic JSON schema, and reads that back, so they pass under a
    parser that does not fit the model, whose own calls (under ``tool_choice: "auto"``) are
    then never parsed. So: render a known call with the chat template (``/tokenize`` +
    ``/detokenize``), pin an ``auto`` answer to exactly that text (a structured-output
    choice), and look at what comes back. Where the engine's grammar offers its parser's
    format next to the pinned text, the model may take that branch instead: the raw output
    (from logprobs) then shows the parser writes calls unlike the template.
    """

    def body() -> str:
        try:
            written = _template_call(client, base_url, model)
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 404:
                raise
            # Other OpenAI-compatible servers need not render templates; the forced calls still ran.
            return (f"not checked: {e.request.url.path} is missing here, so the chat template's call "
                    "format cannot be rendered (vLLM serves /tokenize and /detokenize)")
        if _TOOL_NAME not in written:
            raise CheckFailed(
                f"the chat template drops the tool call of an assistant turn (rendered {written!r})",
                "serve a chat template that renders tool_calls, or multi-turn tool use cannot work "
                "(for ChatML models: server/chat_templates/chatml_hermes_tools.jinja)",
            )
        choice = _chat(
            client, base_url, model, tools=[WEATHER_TOOL], tool_choice="auto", parallel_tool_calls=False,
            structured_outputs={"choice": [written]}, max_tokens=_CALL_MAX_TOKENS, logprobs=True,
        )["choices"][0]
        raw = _raw_text(choice)
        if not _weather_calls(choice, raw):
            raise CheckFailed(
                f"the chat template writes calls as {written!r}; the engine's parser found no call in that text",
                _parser_hint(written),
            )
        if _opening(raw) != _opening(written):
            raise CheckFailed(
                f"the engine's parser makes the model write calls as {_clip(raw)}, but the chat template "
                f"writes {written!r}",
                _parser_hint(written),
            )
        return f"reads the template's call {written!r}"

    return _run("tool_parser", body, client, base_url, TOOL_ATTEMPTS)


def selected_checks(tools: bool = False, logprobs: bool = False) -> list[Check]:
    """The checks after ``models`` and ``chat`` that a run needing ``tools``/``logprobs`` adds."""
    checks: list[Check] = []
    if logprobs:
        # /tokenize only here: NeMo Gym calls it only in its training variant (for prompt token
        # ids), which is what needs logprobs; evaluation never does, and servers other than vLLM
        # Gym can evaluate against may not have it.
        checks += [check_logprobs, check_tokenize]
    if tools:
        checks += [check_tool_required, check_tool_named, check_tool_parser]
    return checks


def readiness_checks(
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    tools: bool = False,
    logprobs: bool = False,
    timeout_s: float = 30.0,
) -> list[CheckResult]:
    """The gate an endpoint passes before Gym traffic: ``models``, ``chat`` and every requested
    check. All at once (the engine batches them, so the set takes about as long as its slowest
    check); reported as if they ran in order up to a failure of ``models`` or ``chat``: nothing
    after can pass then, and its hint says what is wrong."""
    checks = [check_models, check_chat, *selected_checks(tools, logprobs)]
    with make_client(api_key, timeout_s) as client, ThreadPoolExecutor(max_workers=len(checks)) as pool:
        results = list(pool.map(lambda check: check(client, base_url, model), checks))
    basic_failure = next((i for i, r in enumerate(results[:2]) if not r.ok), None)
    return results if basic_failure is None else results[:basic_failure + 1]


def results_table(base_url: str, model: str, results: list[CheckResult]) -> Table:
    table = Table(title=f"{base_url}  model {model or '?'}", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("result", overflow="fold")
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("hint", overflow="fold")
    for r in results:
        verdict = Text("pass", style="green") if r.ok else Text("FAIL", style="bold red")
        table.add_row(r.name, Text.assemble(verdict, " ", r.detail), f"{r.seconds:.2f} s", r.hint)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.verify", description="Check that an OpenAI-compatible endpoint is ready for NeMo Gym.",
    )
    parser.add_argument("--base-url", required=True, help="the OpenAI root, e.g. http://host:8000/v1")
    parser.add_argument("--model", help="the served model name (default: the first one /v1/models lists)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key-file", type=Path, help=f"a file holding the API key (default: ${API_KEY_ENV})")
    keys.add_argument("--api-key", help="the API key itself; visible in `ps`, so prefer --api-key-file")
    parser.add_argument("--tools", action="store_true", help="check tool calling (forced calls, parser fit)")
    parser.add_argument("--logprobs", action="store_true", help="check logprobs, token ids and /tokenize")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    args = parser.parse_args(argv)

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.api_key_file is not None:
        try:
            api_key = args.api_key_file.read_text().strip()
        except OSError as e:
            parser.error(f"cannot read --api-key-file: {e}")
    base_url = args.base_url.rstrip("/")
    model = args.model or _first_model(base_url, api_key, args.timeout)
    t0 = time.perf_counter()
    results = readiness_checks(
        base_url, model, api_key=api_key, tools=args.tools, logprobs=args.logprobs, timeout_s=args.timeout,
    )
    elapsed = time.perf_counter() - t0
    console = Console()
    console.print(results_table(base_url, model, results))
    failed = [r.name for r in results if not r.ok]
    if failed:
        console.print(f"[bold red]not ready[/]: {', '.join(failed)} failed")
        return 1
    console.print(f"[green]ready[/]: all {len(results)} checks passed in {elapsed:.2f} s")
    return 0


# A tool check asks the model for one sample, and a sample can go wrong where the endpoint is right:
# vLLM 0.32's CPU build now and then decodes a grammar-constrained answer wrongly (a pinned call came
# back as another check's JSON, a forced call's argument ran off into junk until max_tokens): about
# one check set in 80 with the checks side by side, and still one in 30 one at a time on a loaded
# machine (greedy decoding there is not deterministic, and a 135M model has near-ties). A parser or
# template that does not fit fails every time, so a second sample tells the two apart. (Running the
# checks one at a time instead costs their sum, minutes on a slow engine, for no fewer failures.)
TOOL_ATTEMPTS = 2


def _run(name: str, body: Callable[[], str], client: httpx.Client, base_url: str, attempts: int = 1) -> CheckResult:
    """Time ``body`` and turn what it raises into a failed result with a hint; a ``CheckFailed``
    (the answer was wrong, not missing) is tried again up to ``attempts`` in all."""
    t0 = time.perf_counter()
    ok, hint = False, ""
    try:
        for attempt in range(1, attempts + 1):
            try:
                detail, ok = body(), True
                break
            except CheckFailed:
                if attempt == attempts:
                    raise
    except CheckFailed as e:
        detail, hint = e.detail + (f" ({attempts} of {attempts} attempts)" if attempts > 1 else ""), e.hint
    except httpx.HTTPError as e:
        detail, hint = _http_failure(e, client, base_url)
    except _SHAPE_ERRORS as e:
        detail = f"unexpected answer ({type(e).__name__}: {e})"
        hint = "the endpoint does not answer in the OpenAI shape: is --base-url the OpenAI root (ending in /v1)?"
    return CheckResult(name, ok, time.perf_counter() - t0, detail, hint)


def _http_failure(e: httpx.HTTPError, client: httpx.Client, base_url: str) -> tuple[str, str]:
    url = e.request.url
    where = f"{url.host}:{url.port}"
    if isinstance(e, httpx.ConnectError):
        return (f"cannot connect to {where}: {e}",
                f"nothing listens at {where}: the engine is still starting, died (see its log), "
                "or the port is wrong/taken")
    if isinstance(e, httpx.TimeoutException):
        return (f"{e.request.method} {url.path}: no answer within {client.timeout.read:g} s",
                "the engine is overloaded or stuck (see its log); raise --timeout if it is only slow")
    if not isinstance(e, httpx.HTTPStatusError):
        return f"{e.request.method} {url.path}: {type(e).__name__}: {e}", "the connection broke: see the engine's log"
    status, message = e.response.status_code, _error_message(e.response)
    detail = f"{e.request.method} {url.path}: HTTP {status}: {message}"
    if status == 401:
        if "authorization" in client.headers:
            return detail, f"the endpoint refused the API key: check --api-key-file or ${API_KEY_ENV}"
        return detail, f"the endpoint wants an API key: pass --api-key/--api-key-file (or set ${API_KEY_ENV})"
    if status == 404 and "model" in message.lower():
        try:
            served: list[str] | str = served_models(client, base_url)
        except (httpx.HTTPError, *_SHAPE_ERRORS):
            served = "?"
        return detail, _served_name_hint(served)
    if status == 404 and url.path.endswith("/tokenize"):
        return detail, (f"the engine has no /tokenize at {_root(base_url)}: NeMo Gym's training variant calls "
                        "it for prompt token ids (vLLM serves it at the server root, not under /v1)")
    if status == 404:
        return detail, f"{url.path} does not exist here: --base-url must be the OpenAI root (e.g. http://host:port/v1)"
    if status == 400 and _PARSER_MISSING.search(message):
        return detail, "start the engine with enable_auto_tool_choice and a tool_call_parser"
    return detail, "see the engine's log"


def _served_name_hint(served: list[str] | str) -> str:
    return f"the served name differs: /v1/models lists {served}: pass --model with one of them, or fix the served name"


def _error_message(resp: httpx.Response) -> str:
    """OpenAI's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``, or the start of the body."""
    try:
        data = resp.json()
        return str(data["error"]["message"] if "error" in data else data["detail"])
    except _SHAPE_ERRORS:
        return resp.text[:300]


def _json(resp: httpx.Response) -> dict:
    resp.raise_for_status()
    return resp.json()


def _root(base_url: str) -> str:
    """Where vLLM serves its non-OpenAI routes (``/tokenize``): the base URL without ``/v1``."""
    return base_url.rstrip("/").removesuffix("/v1")


def _chat(client: httpx.Client, base_url: str, model: str, **params) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": _PROMPT}], **params}
    return _json(client.post(f"{base_url.rstrip('/')}/chat/completions", json=body))


def _forced_call(client: httpx.Client, base_url: str, model: str, tool_choice: str | dict) -> str:
    # One call only: a small model may otherwise keep calling until max_tokens cuts a call in half.
    choice = _chat(
        client, base_url, model, tools=[WEATHER_TOOL], tool_choice=tool_choice, parallel_tool_calls=False,
        max_tokens=_CALL_MAX_TOKENS, logprobs=True,
    )["choices"][0]
    raw = _raw_text(choice)
    calls = _weather_calls(choice, raw)
    if not calls:
        if _fitting_parser(raw):
            hint = _parser_hint(raw)
        else:
            hint = ("the engine answered a forced call with plain text: it does not constrain forced calls, so "
                    "its tool_call_parser likely does not fit this model (the tool_parser check names one that does)")
        raise CheckFailed(f"no tool_calls; the model wrote {_clip(raw)}", hint)
    return f"{_TOOL_NAME}({json.dumps(calls[0])})"


def _weather_calls(choice: dict, raw: str) -> list[dict]:
    """The arguments of each parsed call; a call that is not get_weather with a JSON object fails."""
    calls = []
    for call in choice["message"].get("tool_calls") or []:
        function = call["function"]
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            arguments = None
        if function.get("name") != _TOOL_NAME or not isinstance(arguments, dict):
            raise CheckFailed(
                f"tool_calls holds {function!r}, not {_TOOL_NAME} with JSON object arguments "
                f"(the model wrote {_clip(raw)})",
                _parser_hint(raw),
            )
        calls.append(arguments)
    return calls


def _raw_text(choice: dict) -> str:
    """What the model generated, markup included: a parser may have dropped it from ``content``."""
    tokens = (choice.get("logprobs") or {}).get("content")
    if tokens:
        return "".join(t["token"] for t in tokens)
    return choice["message"].get("content") or ""


def _template_call(client: httpx.Client, base_url: str, model: str) -> str:
    """The text the chat template writes for an assistant turn calling get_weather(city=Paris):
    what follows the generation prompt, minus the end of turn a plain answer gets too."""
    user = {"role": "user", "content": _PROMPT}
    call = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call00000",  # Mistral templates want 9 alphanumeric characters
        "type": "function",
        "function": {"name": _TOOL_NAME, "arguments": json.dumps({"city": "Paris"})},
    }]}
    prompt = _render(client, base_url, model, [user], add_generation_prompt=True)
    with_call = _render(client, base_url, model, [user, call], add_generation_prompt=False)
    with_answer = _render(client, base_url, model, [user, {"role": "assistant", "content": "OK."}],
                          add_generation_prompt=False)
    start = len(os.path.commonprefix([prompt, with_call]))
    end_of_turn = len(os.path.commonprefix([with_call[::-1], with_answer[::-1]]))
    return with_call[start:max(start, len(with_call) - end_of_turn)]


def _render(client: httpx.Client, base_url: str, model: str, messages: list[dict], add_generation_prompt: bool) -> str:
    root = _root(base_url)
    tokens = _json(client.post(f"{root}/tokenize", json={
        "model": model, "messages": messages, "add_generation_prompt": add_generation_prompt,
    }))["tokens"]
    return _json(client.post(f"{root}/detokenize", json={"model": model, "tokens": tokens}))["prompt"]


def _opening(text: str) -> str:
    """How a call starts, up to the function name, whitespace aside. Reasoning blocks are the
    reasoning parser's business, and a template may write an empty one before a call."""
    return "".join(_THINK_BLOCK.sub("", text).partition(_TOOL_NAME)[0].split())


def _fitting_parser(text: str) -> tuple[str, str] | None:
    compact = "".join(text.split())
    return next(((marker, parser) for marker, parser in _CALL_MARKERS if marker in compact), None)


def _parser_hint(text: str) -> str:
    fitting = _fitting_parser(text)
    if fitting is None:
        return ("the tool_call_parser does not fit this model family's output: use the parser for the call "
                "format the model's chat template writes")
    marker, parser = fitting
    return (f"the tool_call_parser does not fit this model family's output: calls written as {marker} "
            f"are read by tool_call_parser {parser} (vLLM: --tool-call-parser {parser})")


def _clip(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _first_model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    """The first model /v1/models lists, or "" when it cannot tell: the models check then says why."""
    with make_client(api_key, timeout_s) as client:
        try:
            return served_models(client, base_url)[0]
        except (httpx.HTTPError, *_SHAPE_ERRORS):
            return ""


if __name__ == "__main__":
    sys.exit(main())
