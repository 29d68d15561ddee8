"""The rollout collector, its tools, verifiers and endpoint pool, without vLLM.

The HTTP tests run the collector against the stand-in server (server/standin.py, no model) on
127.0.0.1, which answers ``/v1/chat/completions`` in vLLM 0.32's shapes (top-level
``prompt_token_ids``, ``choices[0].token_ids``, ``choices[0].logprobs.content``, ``tool_calls``
read by a hermes parser); ``calculator_model`` says what its model writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from jobs import rollouts, tools, verifiers
from jobs.pool import EndpointPool, NoEndpointError
from jobs.rollouts import CollectorConfig, SamplingParams, TaskFileError, collect, load_tasks, parse_task
from server.registry import API_KEY_ENV, Registry
from server.standin import StandIn, hermes_call
from tests.support import MODEL, entry, publish

# ---------------------------------------------------------------- tools


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("1 + 2 * 3", "7"),
        ("(3 + 4) * 2", "14"),
        ("2 ** 10", "1024"),
        ("7 / 2", "3.5"),
        ("12 / 4", "3"),
        ("-3 - -2", "-1"),
        ("10 / 3", "3.333333333"),
        (" 17*23 ", "391"),
    ],
)
def test_calculator_results(expression, expected):
    assert tools.calculator(expression) == expected


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "x + 1", "abs(-1)", "(1).real", "[1, 2]", "True + 1", "'a' * 3", "1 if 1 else 2", "1 +"],
)
def test_calculator_rejects_anything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        tools.calculator(expression)


def test_calculator_refuses_huge_powers():
    with pytest.raises(ValueError, match="too large"):
        tools.calculator("9 ** 9 ** 9")


def test_call_tool_turns_model_mistakes_into_error_strings():
    assert tools.call_tool("calculator", '{"expression": "6 * 7"}') == "42"
    assert tools.call_tool("calculator", {"expression": "6 * 7"}) == "42"
    for result in (
        tools.call_tool("calculator", json.dumps({"expression": "__import__('os').system('true')"})),
        tools.call_tool("calculator", '{"expression": "1 / 0"}'),
        tools.call_tool("calculator", '{"expr": "1"}'),
        tools.call_tool("calculator", "not json"),
        tools.call_tool("calculator", "[1]"),
    ):
        assert result.startswith("error: ")
    unknown = tools.call_tool("launch_rockets", "{}")
    assert "unknown tool 'launch_rockets'" in unknown and "calculator" in unknown


def test_get_weather_is_deterministic_and_unknown_city_is_an_error_string():
    assert tools.get_weather("Paris") == tools.get_weather(" paris ") == "Paris: sunny, 22 degrees Celsius"
    missing = tools.get_weather("Atlantis")
    assert missing.startswith("error: ") and "Atlantis" in missing and "Paris" in missing


def test_openai_tool_schema():
    schema = tools.openai_tool_schema("calculator")
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    with pytest.raises(KeyError, match="get_weather"):
        tools.openai_tool_schema("nope")


# ---------------------------------------------------------------- verifiers


def _task(**verifier) -> dict:
    return {"id": "t1", "verifier": verifier}


def _reward(task: dict, text: str, calls: list[dict] | None = None) -> float:
    return verifiers.judge(task, text, calls or []).reward


@pytest.mark.parametrize(
    "text, expected, reward",
    [
        # Seen with SmolLM2 on the demo's "What is 144 / 12?": the question echoed, no answer given.
        ("144 / 12 is a fraction that doesn't have a decimal representation.", 12, 0.0),
        ("Echo: What is 144 / 12? Reply with just the number.", 12, 0.0),  # the stand-in engine's answer
        ("729 / 27", 27, 0.0),  # SmolLM2 on "Use the calculator to compute 729 / 27."
        ("The answer is 54, which represents the multiplication of 6 by 9.", 54, 1.0),  # SmolLM2 too
        (r"\frac{144}{12} is a fraction", 12, 0.0),
        ("What is 7 + 5? Let me think.", 5, 0.0),
        # The answer stated, last or not.
        ("12", 12, 1.0),
        ("144 / 12 = 12", 12, 1.0),
        ("144 divided by 12 is 12.", 12, 1.0),
        ("12 = 7 + 5", 12, 1.0),
        ("7 + 5 = 12.", 12, 1.0),
        ("(6 + 4) * 3 = 30", 30, 1.0),
        ("2 ** 5 = 32", 32, 1.0),
        ("The answer is 12. To check: 12 + 3 = 15, minus 3.", 12, 1.0),
        ("I think 12. Not sure the answer is right.", 12, 1.0),  # a mark without a value is prose
        # A wrong final answer after a right intermediate number.
        ("7 + 5 = 12, and then 12 + 3 = 15", 12, 0.0),
        ("12 or maybe 13", 12, 0.0),
        ("The answer is not 12, it is 13", 12, 0.0),
        # Marks: the last one wins.
        (r"So 7 + 5 = 13. \boxed{12}", 12, 1.0),
        (r"\boxed{12} ... no: \boxed{13}", 12, 0.0),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72, 1.0),
        ("**Answer:** 12 apples.", 12, 1.0),
        ("The answer is: 7 + 5 = 12.", 12, 1.0),
        (r"The final answer is $\boxed{-5}$.", -5, 1.0),
        # Numbers: signs, separators, decimals, fractions, units, punctuation.
        ("x = -3", -3, 1.0),
        ("10 - 15 = -5", -5, 1.0),
        ("10 - 15 = \u22125", -5, 1.0),
        ("10 - 15", -5, 0.0),
        ("It is 1,000 dollars.", 1000, 1.0),
        ("It costs $1,000.", 1000, 1.0),
        ("12.0", 12, 1.0),
        ("12.", 12, 1.0),
        ("Answer: .5", 0.5, 1.0),
        ("The answer is 3/4.", 0.75, 1.0),
        (r"\boxed{\frac{3}{4}}", 0.75, 1.0),
        ("3/4", 0.75, 0.0),  # in prose a/b is an expression: mark a fractional answer
        ("12 apples, that's it!", 12, 1.0),
        ("It is 12%.", 12, 1.0),
        ("twelve", 12, 0.0),
        ("", 12, 0.0),
    ],
)
def test_number_verifier_judges_the_final_answer(text, expected, reward):
    assert _reward(_task(name="number", expected=expected), text) == reward


def test_number_verifier_says_what_it_read():
    verdict = verifiers.judge(_task(name="number", expected="12"), "144 / 12 is a fraction", [])
    assert verdict == verifiers.Verdict(0.0, {"expected": 12.0, "tolerance": 1e-6, "answer": None})
    verdict = verifiers.judge(_task(name="number", expected=3.333, tolerance=0.01), "3.3333", [])
    assert verdict == verifiers.Verdict(1.0, {"expected": 3.333, "tolerance": 0.01, "answer": 3.3333})
    assert _reward(_task(name="number", expected=3.333), "3.3333") == 0.0


def test_contains_verifier_ignores_case():
    task = _task(name="contains", expected="Sunny")
    assert verifiers.judge(task, "It will be SUNNY today", []) == verifiers.Verdict(1.0, {"expected": "Sunny"})
    assert _reward(task, "rain") == 0.0


def test_tool_call_verifier_checks_name_and_argument_subset():
    calls = [{"name": "get_weather", "arguments": {"city": "paris", "unit": "C"}, "result": "..."}]
    assert _reward(_task(name="tool_call", tool="get_weather"), "", calls) == 1.0
    paris = _task(name="tool_call", tool="get_weather", arguments={"city": "Paris"})
    assert verifiers.judge(paris, "", calls) == verifiers.Verdict(
        1.0, {"tool": "get_weather", "arguments": {"city": "Paris"}})
    assert _reward(_task(name="tool_call", tool="get_weather", arguments={"city": "Rome"}), "", calls) == 0.0
    assert _reward(_task(name="tool_call", tool="calculator"), "", calls) == 0.0
    unparsable = [{"name": "get_weather", "arguments": "{city: Paris", "result": "error"}]
    assert _reward(paris, "", unparsable) == 0.0


def test_unknown_verifier_names_task_and_known_names():
    with pytest.raises(ValueError) as info:
        verifiers.judge({"id": "task-7", "verifier": {"name": "vibes"}}, "", [])
    message = str(info.value)
    assert "task-7" in message and "vibes" in message
    assert all(name in message for name in ("number", "contains", "tool_call"))


# ---------------------------------------------------------------- tasks


FLAT_CALCULATOR = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
}


def test_responses_input_becomes_chat_messages():
    task = parse_task(
        {
            "id": "a",
            "responses_create_params": {
                "instructions": "Be brief.",
                "input": [
                    {"role": "developer", "content": "Use tools."},
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Hi "}, {"type": "input_text", "text": "there"}],
                    },
                    {"type": "function_call", "call_id": "c1", "name": "calculator", "arguments": "{}"},
                    {"type": "function_call", "call_id": "c2", "name": "calculator", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "2"},
                ],
                "tools": [FLAT_CALCULATOR],
                "tool_choice": {"type": "function", "name": "calculator"},
            },
            "verifier": {"name": "number", "expected": 2},
        }
    )
    assert [m["role"] for m in task.messages] == ["system", "system", "user", "assistant", "tool"]
    assert task.messages[0]["content"] == "Be brief."
    assert task.messages[2]["content"] == "Hi there"
    assert [c["id"] for c in task.messages[3]["tool_calls"]] == ["c1", "c2"]
    assert task.messages[4] == {"role": "tool", "tool_call_id": "c1", "content": "2"}
    assert task.tool_choice == {"type": "function", "function": {"name": "calculator"}}


def test_flat_and_nested_tools_convert_to_the_same_chat_tool():
    nested = {"type": "function", "function": {k: v for k, v in FLAT_CALCULATOR.items() if k != "type"}}
    assert rollouts.chat_tool(FLAT_CALCULATOR) == rollouts.chat_tool(nested) == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate arithmetic.",
            "parameters": FLAT_CALCULATOR["parameters"],
        },
    }


def test_string_input_is_one_user_message():
    task = parse_task(_gym_task(1, "Hello", {"name": "contains", "expected": "x"}))
    assert task.id == "1"
    assert task.messages == [{"role": "user", "content": "Hello"}]
    assert task.tools == [] and task.tool_choice is None


def _gym_task(task_id: object, prompt: str | list, verifier: dict, **params) -> dict:
    return {"id": task_id, "responses_create_params": {"input": prompt, **params}, "verifier": verifier}


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"id": "ok", "responses_create_params": {"input": "1+1?"}, "verifier": {"name": "number", "expected": 2}}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"id": "x", "responses_create_params": ', "Expecting"),
        ({"id": "x", "verifier": {"name": "number"}}, "responses_create_params.input"),
        ({"responses_create_params": {"input": "hi"}, "verifier": {"name": "number"}}, "'id'"),
        ({"id": "x", "responses_create_params": {"input": "hi"}, "verifier": {"name": "vibes"}}, "unknown verifier"),
        (_gym_task("x", "hi", {"name": "number"}, tools=[{**FLAT_CALCULATOR, "name": "rm_rf"}]), "rm_rf"),
        ({**GOOD}, "duplicate task id 'ok'"),
    ],
)
def test_bad_task_line_names_file_and_line(tmp_path, bad, fragment):
    path = _write_lines(tmp_path / "tasks.jsonl", [GOOD, "", bad])
    with pytest.raises(TaskFileError) as info:
        load_tasks(path)
    assert f"{path}:3:" in str(info.value)
    assert fragment in str(info.value)


def test_demo_tasks_load():
    tasks = load_tasks(rollouts.DEMO_TASKS)
    assert len(tasks) == 24
    with_tools = [t for t in tasks if t.tools]
    assert 10 <= len(with_tools) <= 14
    # The tiny demo model calls a tool only when forced.
    assert all(t.tool_choice == "required" for t in with_tools)
    names = {c["function"]["name"] for t in with_tools for c in t.tools}
    assert names == {"calculator", "get_weather"}


# ---------------------------------------------------------------- pool


def test_pool_pick_is_stable_and_spreads(tmp_path):
    registry = Registry(tmp_path)
    for replica in range(3):
        registry.publish(entry(replica))
    registry.publish(entry(3, state="starting"))
    registry.publish(entry(4, heartbeat_at=time.time() - 3600))
    pool = EndpointPool("policy", "run1", Registry(tmp_path))
    assert [e.replica for e in pool.endpoints()] == [0, 1, 2]
    picks = {key: pool.pick(key).replica for key in (f"task-{i}/0" for i in range(60))}
    assert picks == {key: EndpointPool("policy", "run1", Registry(tmp_path)).pick(key).replica for key in picks}
    assert set(picks.values()) == {0, 1, 2}


def test_pool_rereads_registry_only_after_refresh_interval(tmp_path):
    registry = Registry(tmp_path)
    registry.publish(entry(0))
    cached = EndpointPool("policy", "run1", Registry(tmp_path), refresh_s=3600)
    fresh = EndpointPool("policy", "run1", Registry(tmp_path), refresh_s=0)
    assert len(cached.endpoints()) == len(fresh.endpoints()) == 1
    registry.publish(entry(1))
    assert len(cached.endpoints()) == 1
    assert len(fresh.endpoints()) == 2


def test_pool_without_ready_replica_says_where_it_looked(tmp_path):
    with pytest.raises(NoEndpointError) as info:
        EndpointPool("policy", "run1", Registry(tmp_path)).pick("t/0")
    assert "'policy'" in str(info.value) and str(tmp_path) in str(info.value)


def test_pool_refuses_a_service_in_several_namespaces(tmp_path):
    registry = Registry(tmp_path)
    registry.publish(entry(0, namespace="run1"))
    registry.publish(entry(0, namespace="run2"))
    with pytest.raises(NoEndpointError, match="several namespaces"):
        EndpointPool("policy", None, Registry(tmp_path)).pick("t/0")
    assert EndpointPool("policy", "run2", Registry(tmp_path)).pick("t/0").namespace == "run2"


# ---------------------------------------------------------------- the conversation loop


def calculator_model(body: dict) -> str:
    """What the stand-in's model writes, from the last user message: "LOOP": a calculator call
    on every turn; "GHOST": a call to a tool that does not exist; tools offered and no tool
    result yet: a calculator call with the expression after "compute"; otherwise a text
    quoting the last tool result, or "The answer is 12."."""
    messages = body["messages"]
    prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    tool_done = messages[-1]["role"] == "tool"
    if "LOOP" in prompt:
        return hermes_call("calculator", {"expression": "1 + 1"})
    if "GHOST" in prompt and not tool_done:
        return hermes_call("ghost_tool", {})
    if body.get("tools") and not tool_done:
        return hermes_call("calculator", {"expression": prompt.split("compute", 1)[1].strip(" .")})
    return f"The result is {messages[-1]['content']}." if tool_done else "The answer is 12."


@pytest.fixture
def serve(tmp_path, standins):
    """``start(count)``: stand-in servers writing ``calculator_model`` (and answering HTTP 500 to
    a "FAIL" prompt), published as replicas 0, 1, ... of service "policy" in namespace run1."""
    root = tmp_path / "registry"

    def start(count: int) -> list[StandIn]:
        servers = standins(count, writes=calculator_model, fail_on={"FAIL": 500})
        publish(root, servers)
        return servers

    return start, root


@pytest.fixture
def stand_in(serve):
    start, root = serve
    return start(1)[0], root


def tool_call_ids(server: StandIn) -> set[str]:
    """The ids of the tool calls ``server`` answered."""
    return {
        call["id"] for r in server.requests if r.status == 200
        for call in r.answer["choices"][0]["message"].get("tool_calls", [])
    }


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _number(expected: float) -> dict:
    return {"name": "number", "expected": expected}


FORCED_CALCULATOR = {"tools": [FLAT_CALCULATOR], "tool_choice": "required"}


def _three_tasks() -> list[dict]:
    """A forced calculator call (right), a text answer (right) and a text answer (wrong)."""
    return [
        _gym_task("calc", [_user("Use the calculator to compute 17 * 23.")], _number(391), **FORCED_CALCULATOR),
        _gym_task("text", [_user("What is 7 + 5?")], _number(12)),
        _gym_task("wrong", "What is 2 + 2?", _number(4)),
    ]


def _collect_tasks(tmp_path: Path) -> Path:
    return _write_lines(
        tmp_path / "tasks.jsonl",
        [
            *_three_tasks(),
            _gym_task("ghost", "GHOST", {"name": "tool_call", "tool": "calculator"}, **FORCED_CALCULATOR),
            _gym_task("fail", "FAIL please", _number(1)),
            _gym_task("loop", "LOOP", _number(2), **FORCED_CALCULATOR),
        ],
    )


def test_collect_against_stand_in_server(tmp_path, stand_in, monkeypatch):
    server, root = stand_in
    monkeypatch.setenv(API_KEY_ENV, "sekrit")
    cfg = CollectorConfig(
        tasks=str(_collect_tasks(tmp_path)),
        output_dir=str(tmp_path / "out"),
        namespace="run1",
        registry=Registry(root),
        num_repeats=2,
        max_concurrency=3,
        max_turns=3,
        top_logprobs=2,
        sampling=SamplingParams(temperature=0.5, max_tokens=128),
    )
    summary = collect(cfg)

    rows = _read_jsonl(summary.rollouts_path)
    failures = _read_jsonl(summary.failures_path)
    assert sorted((r["task_id"], r["repeat"]) for r in rows) == sorted(
        (t, r) for t in ("calc", "text", "wrong", "ghost") for r in (0, 1)
    )
    by_id = {r["task_id"]: r for r in rows if r["repeat"] == 0}

    calc = by_id["calc"]
    assert calc["tool_calls"] == [{"name": "calculator", "arguments": {"expression": "17 * 23"}, "result": "391"}]
    assert calc["output"] == "The result is 391."
    assert calc["reward"] == 1.0
    assert calc["finish_reason"] == "stop"
    assert calc["replica"] == 0
    assert [m["role"] for m in calc["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert calc["messages"][2]["content"] == "391"
    assert calc["messages"][2]["tool_call_id"] == calc["messages"][1]["tool_calls"][0]["id"]
    assert len(calc["turns"]) == 2
    first, second = calc["turns"]
    assert first["finish_reason"] == "tool_calls" and second["finish_reason"] == "stop"
    first_turn = next(r for r in server.requests if r.body["messages"] == calc["messages"][:1])
    assert first_turn.answer["prompt_token_ids"]  # the engine's, copied into the turn
    assert first["prompt_token_ids"] == first_turn.answer["prompt_token_ids"]
    assert second["generation_token_ids"] == [ord(c) for c in "The result is 391."]
    assert second["generation_logprobs"] == [-0.25] * len("The result is 391.")
    assert len(second["generation_top_logprobs"][0]) == 2
    assert calc["usage"] == {
        "prompt_tokens": first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"],
        "completion_tokens": first["usage"]["completion_tokens"] + second["usage"]["completion_tokens"],
    }

    assert by_id["text"]["reward"] == 1.0 and by_id["text"]["turns"][0]["generation_token_ids"]
    assert by_id["wrong"]["reward"] == 0.0
    ghost = by_id["ghost"]
    assert ghost["tool_calls"][0]["name"] == "ghost_tool"
    assert ghost["tool_calls"][0]["result"].startswith("error: unknown tool 'ghost_tool'")
    assert ghost["reward"] == 0.0

    assert sorted((f["task_id"], f["repeat"], f["reason"]) for f in failures) == [
        ("fail", 0, "http_error"),
        ("fail", 1, "http_error"),
        ("loop", 0, "turn_limit"),
        ("loop", 1, "turn_limit"),
    ]
    assert all("stand-in told to answer 500" in f["error"] for f in failures if f["reason"] == "http_error")

    # What the collector sent.
    calc_requests = [r.body for r in server.requests if "17 * 23" in r.body["messages"][0]["content"]]
    assert len(calc_requests) == 4  # 2 repeats x 2 turns
    first_turns = [b for b in calc_requests if len(b["messages"]) == 1]
    later_turns = [b for b in calc_requests if len(b["messages"]) > 1]
    assert [b["tool_choice"] for b in first_turns] == ["required", "required"]
    assert [b["tool_choice"] for b in later_turns] == ["auto", "auto"]
    for request in server.requests:
        body = request.body
        assert request.path == "/v1/chat/completions"
        assert request.headers["Authorization"] == "Bearer sekrit"
        assert body["model"] == MODEL
        assert body["logprobs"] is True and body["return_token_ids"] is True and body["top_logprobs"] == 2
        assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.5, 1.0, 128)
    text_request = next(r.body for r in server.requests if r.body["messages"][0]["content"] == "What is 7 + 5?")
    assert "tools" not in text_request and "tool_choice" not in text_request
    loop_requests = [r for r in server.requests if r.body["messages"][0]["content"] == "LOOP"]
    assert len(loop_requests) == 2 * cfg.max_turns

    assert summary.tasks == 6
    assert summary.rollouts_written == 8 and summary.failures == 4
    assert summary.mean_reward == pytest.approx(sum(r["reward"] for r in rows) / 8)
    answered = sum(len(r["turns"]) for r in rows)
    assert answered + 2 * cfg.max_turns == len(server.requests) - 2  # minus the two HTTP 500s
    # Failed rollouts that got answers (turn limit) count too.
    assert summary.generated_tokens > sum(r["usage"]["completion_tokens"] for r in rows)
    assert json.loads(json.dumps(summary.to_json())) == summary.to_json()


def test_collect_without_replica_fails_before_writing(tmp_path):
    cfg = CollectorConfig(output_dir=str(tmp_path / "out"), registry=Registry(tmp_path / "empty"))
    with pytest.raises(NoEndpointError, match="no usable replica of service 'policy'"):
        collect(cfg)
    assert not (tmp_path / "out").exists()


def test_cli_prints_summary(tmp_path, stand_in, capsys, monkeypatch):
    _, root = stand_in
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    tasks = _write_lines(tmp_path / "t.jsonl", [GOOD])
    code = rollouts.main(
        ["--tasks", str(tasks), "--output-dir", str(tmp_path / "o"), "--root", str(root), "--namespace", "run1"]
        + ["--num-repeats", "3"]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["rollouts_written"] == 3 and summary["failures"] == 0
    assert len(_read_jsonl(summary["rollouts_path"])) == 3


# ---------------------------------------------------------------- failover and resuming


def test_a_conversation_moves_off_a_replica_that_stops_answering(tmp_path, serve):
    start, root = serve
    dying, healthy = start(2)
    dying.faults.answers_left = 1  # one first turn (a tool call), then 503 to everything
    tasks = _write_lines(
        tmp_path / "t.jsonl",
        [_gym_task("calc", [_user("Use the calculator to compute 17 * 23.")], _number(391), tools=[FLAT_CALCULATOR])],
    )
    cfg = CollectorConfig(
        tasks=str(tasks), output_dir=str(tmp_path / "out"), namespace="run1", registry=Registry(root),
        num_repeats=8, max_concurrency=1,
    )
    summary = collect(cfg)

    rows = _read_jsonl(summary.rollouts_path)
    assert (summary.rollouts_written, summary.failures) == (8, 0)
    assert {r["replica"] for r in rows} == {1}  # the replica that finished it
    begun_on_0 = tool_call_ids(dying)
    moved = [r for r in rows if r["messages"][1]["tool_calls"][0]["id"] in begun_on_0]
    assert len(moved) == 1  # begun on replica 0, finished on replica 1
    assert moved[0]["reward"] == 1.0 and len(moved[0]["turns"]) == 2
    assert any(call_id in json.dumps(r.body["messages"]) for r in healthy.requests for call_id in begun_on_0)
    assert summary.replicas["0"]["failures"] >= 1 and summary.replicas["1"]["retries"] >= 1


def _resumable(tmp_path: Path, root: Path, *extra: dict) -> CollectorConfig:
    tasks = _write_lines(tmp_path / "tasks.jsonl", [*_three_tasks(), *extra])
    return CollectorConfig(
        tasks=str(tasks), output_dir=str(tmp_path / "out"), namespace="run1", registry=Registry(root),
        num_repeats=2, max_concurrency=3,
    )


def _keys(path: str | Path) -> list[tuple[str, int]]:
    return [(r["task_id"], r["repeat"]) for r in _read_jsonl(str(path))]


ALL_SIX = sorted((t, r) for t in ("calc", "text", "wrong") for r in (0, 1))


def test_a_rerun_skips_the_rows_already_written(tmp_path, stand_in):
    server, root = stand_in
    cfg = _resumable(tmp_path, root)
    first = collect(cfg)
    written = Path(first.rollouts_path).read_bytes()
    asked = len(server.requests)

    again = collect(cfg)
    assert len(server.requests) == asked  # nothing sent
    assert Path(again.rollouts_path).read_bytes() == written
    assert (again.rollouts_written, again.rollouts_written_this_run, again.failures) == (6, 0, 0)
    assert again.mean_reward == first.mean_reward  # over the rows of both runs


@pytest.mark.parametrize(
    "tear",
    [
        pytest.param(lambda line: line[: len(line) // 2], id="cut-mid-line"),
        pytest.param(lambda line: line[:-1], id="whole-json-but-no-newline"),
        pytest.param(lambda line: line[: len(line) // 2] + b"\n", id="newline-but-not-json"),
    ],
)
def test_a_torn_last_line_is_truncated_and_its_rollout_redone(tmp_path, stand_in, tear, caplog):
    _, root = stand_in
    cfg = _resumable(tmp_path, root)
    path = Path(collect(cfg).rollouts_path)
    *whole, last = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(whole) + tear(last))

    again = collect(cfg)
    assert "torn last line" in caplog.text
    assert path.read_bytes().startswith(b"".join(whole))
    keys = _keys(path)
    assert sorted(keys) == ALL_SIX  # each once
    assert keys[-1] == (json.loads(last)["task_id"], json.loads(last)["repeat"])
    assert (again.rollouts_written, again.rollouts_written_this_run) == (6, 1)


class _Crash(BaseException):
    """Stands for SIGKILL: no ``except Exception`` in the collector catches it."""


@pytest.mark.parametrize("point", ["before-write", "mid-write", "after-write"])
def test_after_a_crash_at_any_point_a_rerun_writes_each_row_once(tmp_path, stand_in, monkeypatch, point):
    _, root = stand_in
    cfg = _resumable(tmp_path, root)
    write = rollouts._JsonlAppender.write
    rows_seen = []

    def crashing_on_the_third_row(self, row: dict) -> None:
        rows_seen.append(row)
        if len(rows_seen) < 3:
            return write(self, row)
        if len(rows_seen) == 3:  # the crash; conversations that asyncio winds down after it write nothing
            if point == "mid-write":
                data = (json.dumps(row) + "\n").encode()
                os.write(self.fd, data[: len(data) // 2])
            elif point == "after-write":
                write(self, row)
        raise _Crash

    monkeypatch.setattr(rollouts._JsonlAppender, "write", crashing_on_the_third_row)
    with pytest.raises(_Crash):
        collect(cfg)
    monkeypatch.setattr(rollouts._JsonlAppender, "write", write)

    again = collect(cfg)
    assert sorted(_keys(again.rollouts_path)) == ALL_SIX
    assert again.rollouts_written_this_run == (3 if point == "after-write" else 4)


def test_failures_are_retried_by_the_next_run_and_listed_by_the_last(tmp_path, stand_in):
    server, root = stand_in
    cfg = _resumable(tmp_path, root, _gym_task("flaky", "FLAKY 1 + 1", _number(2)))
    server.faults.fail_on["FLAKY"] = 500
    first = collect(cfg)
    assert (first.rollouts_written, first.failures) == (6, 2)
    assert sorted(_keys(first.failures_path)) == [("flaky", 0), ("flaky", 1)]

    del server.faults.fail_on["FLAKY"]
    again = collect(cfg)
    assert (again.rollouts_written, again.rollouts_written_this_run, again.failures) == (8, 2, 0)
    assert sorted(_keys(again.rollouts_path)) == sorted([*ALL_SIX, ("flaky", 0), ("flaky", 1)])
    assert Path(again.failures_path).read_text() == ""  # this run's failures: none


def test_a_row_explains_its_reward_and_times_its_turns(tmp_path, stand_in):
    """Each row names the model served, the sampling params sent and what the verifier read; each
    turn says when its answer came and how long its request took, the row when it ended and how long
    the whole rollout took. The stand-in takes 2 ms a token, so latencies have a floor to meet."""
    server, root = stand_in
    server.faults.seconds_per_token = 0.002
    cfg = _resumable(tmp_path, root, _gym_task("fail", "FAIL please", _number(1)))
    cfg.sampling = SamplingParams(temperature=0.3, top_p=0.9, max_tokens=100)
    began = time.time()
    summary = collect(cfg)
    ended = time.time()

    rows = {(r["task_id"], r["repeat"]): r for r in _read_jsonl(summary.rollouts_path)}
    assert sorted(rows) == ALL_SIX
    sent = {(r.body["temperature"], r.body["top_p"], r.body["max_tokens"]) for r in server.requests}
    assert sent == {(0.3, 0.9, 100)}
    for row in rows.values():
        assert row["model"] == MODEL
        assert row["sampling"] == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 100}
        turn_ats = [t["at"] for t in row["turns"]]
        assert began < turn_ats[0] and turn_ats == sorted(turn_ats) and turn_ats[-1] <= row["finished_at"] < ended
        for turn in row["turns"]:
            assert turn["latency_s"] >= 0.002 * turn["usage"]["completion_tokens"]
            assert turn["at"] - turn["latency_s"] >= began
        assert row["latency_s"] >= sum(t["latency_s"] for t in row["turns"])
        assert row["finished_at"] - row["latency_s"] >= began
    assert rows[("calc", 0)]["verifier"] == {
        "name": "number", "expected": 391.0, "tolerance": 1e-6, "answer": 391.0}  # "The result is 391."
    assert rows[("wrong", 1)]["verifier"] == {
        "name": "number", "expected": 4.0, "tolerance": 1e-6, "answer": 12.0}  # "The answer is 12."
    assert rows[("wrong", 1)]["reward"] == 0.0
    failures = _read_jsonl(summary.failures_path)
    assert len(failures) == 2 and all(began < f["at"] < ended for f in failures)


def test_a_resumed_run_reads_rows_without_the_settings_and_writes_its_own(tmp_path, stand_in):
    """Rows written before rows carried their settings (today's files) are read on resume; the
    rows a resumed run appends carry its own settings, which may differ from the earlier run's."""
    _, root = stand_in
    cfg = _resumable(tmp_path, root)
    cfg.num_repeats = 1
    first = collect(cfg)
    new_keys = {"model", "sampling", "verifier", "finished_at", "latency_s"}
    old_rows = []
    for row in _read_jsonl(first.rollouts_path):
        row = {k: v for k, v in row.items() if k not in new_keys}
        row["turns"] = [{k: v for k, v in t.items() if k not in ("at", "latency_s")} for t in row["turns"]]
        old_rows.append(row)
    _write_lines(Path(first.rollouts_path), old_rows)

    cfg.num_repeats, cfg.sampling = 2, SamplingParams(temperature=0.9, max_tokens=32)
    again = collect(cfg)
    assert (again.rollouts_written, again.rollouts_written_this_run) == (6, 3)
    rows = _read_jsonl(again.rollouts_path)
    assert rows[:3] == old_rows
    assert [(r["repeat"], r["sampling"]) for r in rows[3:]] == [
        (1, {"temperature": 0.9, "top_p": 1.0, "max_tokens": 32})] * 3


def _retagged(line: bytes, **changes) -> bytes:
    return (json.dumps({**json.loads(line), **changes}) + "\n").encode()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda lines: [lines[0], b"not json\n", *lines[2:]], r"rollouts.jsonl:2 is not a rollout row"),
        (lambda lines: [*lines, _retagged(lines[0], task_id="other")], r"task 'other', which the task file lacks"),
    ],
    ids=["damaged-line-before-the-last", "another-task-set"],
)
def test_an_output_that_a_crash_cannot_explain_is_refused_untouched(tmp_path, stand_in, damage, fragment):
    _, root = stand_in
    cfg = _resumable(tmp_path, root)
    path = Path(collect(cfg).rollouts_path)
    path.write_bytes(b"".join(damage(path.read_bytes().splitlines(keepends=True))))
    damaged = path.read_bytes()
    with pytest.raises(rollouts.OutputError, match=fragment):
        collect(cfg)
    assert path.read_bytes() == damaged
