"""Reward functions, chosen per task by ``task["verifier"]["name"]``.

Each takes ``(task, final_text, tool_calls_made)`` and returns a reward in
[0, 1]; its settings (``expected``, ...) come from ``task["verifier"]``.
``tool_calls_made`` holds ``{"name", "arguments", "result"}`` dicts, arguments
parsed from JSON when the model wrote valid JSON.
"""

from __future__ import annotations

import math
import re
from typing import Callable

Verifier = Callable[[dict, str, list[dict]], float]

# Thousands separators are allowed ("1,200"); a trailing period is not part of the number.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def number(task: dict, final_text: str, tool_calls_made: list[dict]) -> float:
    """1 when the last number in the answer equals ``expected`` (within ``tolerance``, default 1e-6)."""
    spec = task["verifier"]
    found = _NUMBER.findall(final_text or "")
    if not found:
        return 0.0
    value = float(found[-1].replace(",", ""))
    tolerance = float(spec.get("tolerance", 1e-6))
    return float(math.isclose(value, float(spec["expected"]), rel_tol=tolerance, abs_tol=tolerance))


def contains(task: dict, final_text: str, tool_calls_made: list[dict]) -> float:
    """1 when ``expected`` appears in the answer, ignoring case."""
    return float(str(task["verifier"]["expected"]).lower() in (final_text or "").lower())


def tool_call(task: dict, final_text: str, tool_calls_made: list[dict]) -> float:
    """1 when tool ``tool`` was called, with ``arguments`` (if given) a subset of what the model passed."""
    spec = task["verifier"]
    wanted = spec.get("arguments", {})
    for call in tool_calls_made:
        if call["name"] != spec["tool"]:
            continue
        given = call["arguments"] if isinstance(call["arguments"], dict) else {}
        if all(k in given and _same(given[k], v) for k, v in wanted.items()):
            return 1.0
    return 0.0


def _same(given: object, expected: object) -> bool:
    # The model's capitalisation of "paris" is not what the task is about.
    if isinstance(given, str) and isinstance(expected, str):
        return given.strip().lower() == expected.strip().lower()
    return given == expected


VERIFIERS: dict[str, Verifier] = {"number": number, "contains": contains, "tool_call": tool_call}


def get(task: dict) -> Verifier:
    """The task's verifier; raises with the task id and the known names when there is none."""
    spec = task.get("verifier")
    name = spec.get("name") if isinstance(spec, dict) else None
    if name not in VERIFIERS:
        raise ValueError(
            f"task {task.get('id')!r}: unknown verifier {name!r}; set verifier.name to one of {sorted(VERIFIERS)}"
        )
    return VERIFIERS[name]


def score(task: dict, final_text: str, tool_calls_made: list[dict]) -> float:
    return get(task)(task, final_text, tool_calls_made)
