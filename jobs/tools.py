"""Local Python tools that a model may call during a rollout, registered by name.

A tool returns a string: that is what the model reads back. Mistakes the model
can make (a bad expression, an unknown city, a tool that does not exist) come
back as an ``error: ...`` string so the conversation goes on and the reward can
judge it; only a bug in a tool raises.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the keyword arguments of ``fn``
    fn: Callable[..., str]


TOOLS: dict[str, Tool] = {}


def register(tool: Tool) -> Tool:
    TOOLS[tool.name] = tool
    return tool


def openai_tool_schema(name: str) -> dict:
    """The chat-completions ``tools`` item for a registered tool."""
    tool = _get(name)
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


def call_tool(name: str, arguments: str | dict) -> str:
    """Run a tool as the model asked for it (``arguments`` as the JSON string the model wrote)."""
    tool = TOOLS.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; available tools: {', '.join(sorted(TOOLS))}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return f"error: arguments are not valid JSON ({e})"
    if not isinstance(arguments, dict):
        return f"error: arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        return tool.fn(**arguments)
    except TypeError as e:  # missing or unexpected argument names
        return f"error: bad arguments for {name}: {e}"
    except (ValueError, ArithmeticError) as e:
        return f"error: {e}"


def _get(name: str) -> Tool:
    try:
        return TOOLS[name]
    except KeyError:
        raise KeyError(f"unknown tool {name!r}; registered tools: {sorted(TOOLS)}") from None


# ---------------------------------------------------------------- calculator

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_RESULT_BITS = 4096  # 9**9**9 would keep a worker busy for minutes


def calculator(expression: str) -> str:
    """Evaluate ``+ - * / **``, parentheses and numbers; anything else is a ``ValueError``."""
    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}: use numbers, + - * / ** and parentheses") from None
    return _format(_evaluate(tree.body, expression))


def _evaluate(node: ast.AST, expression: str) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is an int subclass
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, expression))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, expression), _evaluate(node.right, expression)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and math.log2(abs(left)) * abs(right) > _MAX_RESULT_BITS:
            raise ValueError(f"{ast.unparse(node)!r} is too large to compute")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(
        f"{ast.unparse(node)!r} is not allowed in {expression!r}: only numbers, + - * / ** and parentheses"
    )


def _format(value: int | float | complex) -> str:
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.10g}"


register(
    Tool(
        name="calculator",
        description="Evaluate an arithmetic expression with + - * / ** and parentheses.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example (3 + 4) * 2"}},
            "required": ["expression"],
        },
        fn=calculator,
    )
)


# ---------------------------------------------------------------- weather

# Made up and fixed, so that rewards for weather tasks are reproducible.
FORECASTS: dict[str, tuple[str, int]] = {
    "paris": ("sunny", 22),
    "london": ("rainy", 14),
    "tokyo": ("cloudy", 18),
    "new york": ("snowy", -3),
    "sydney": ("windy", 25),
    "berlin": ("foggy", 9),
    "cairo": ("sunny", 35),
    "moscow": ("snowy", -12),
}


def get_weather(city: str) -> str:
    forecast = FORECASTS.get(str(city).strip().lower())
    if forecast is None:
        known = ", ".join(c.title() for c in FORECASTS)
        return f"error: no forecast for {city!r}; known cities: {known}"
    sky, celsius = forecast
    return f"{str(city).strip().title()}: {sky}, {celsius} degrees Celsius"


register(
    Tool(
        name="get_weather",
        description="Get today's weather forecast for a city.",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string", "description": "city name, for example Paris"}},
            "required": ["city"],
        },
        fn=get_weather,
    )
)
