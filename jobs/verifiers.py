"""Reward functions, chosen per task by ``task["verifier"]["name"]``.

Each takes ``(task, final_text, tool_calls_made)`` and returns a ``Verdict``: the reward in [0, 1]
and what it compared, its settings as it read them from ``task["verifier"]`` (``expected``, ...)
and, for ``number``, the answer it took from the text. The collector writes the latter into the
rollout's row, so that a reward can be explained from its row alone.
``tool_calls_made`` holds ``{"name", "arguments", "result"}`` dicts, arguments parsed from JSON
when the model wrote valid JSON.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verdict:
    reward: float
    read: dict  # the settings as the verifier read them, and what it took from the answer


Verifier = Callable[[dict, str, list[dict]], Verdict]

# Thousands separators are allowed ("1,200"); a period ending a sentence is not a decimal point.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# Not inside a word or after a decimal point ("x2", "v1.2"); the minus sign may be U+2212.
_NUMBER = re.compile(rf"(?<![\w.])(?P<sign>[-+\u2212]?)(?P<digits>{_DIGITS})")
_OPERATOR = r"(?:\*\*|[-+*/^x\u00d7\u00f7\u2212]|\b(?:plus|minus|times|(?:divided|multiplied)\s+by)\b)"
# A number with an operator between it and another number is an operand, not a result.
_OPERATOR_BEFORE = re.compile(rf"[\d)]\s*\)*\s*{_OPERATOR}\s*\(*\s*$", re.IGNORECASE)
_OPERATOR_AFTER = re.compile(rf"\s*\)*\s*{_OPERATOR}\s*\(*\s*[-+\u2212]?\s*\.?\d", re.IGNORECASE)
_SIGN_AS_OPERATOR = re.compile(r"[\d)]\s*$")  # "10 -15": the sign follows an operand
_LOOKBEHIND = 40  # characters: enough for "12 multiplied by ("
_FRAC = re.compile(rf"\\[dt]?frac\{{\s*(?P<num>{_DIGITS})\s*\}}\{{\s*(?P<den>{_DIGITS})\s*\}}")
# What a mark's value may start after: spaces, colons, markdown emphasis, TeX math and dollar signs.
_VALUE = re.compile(
    rf"(?:[\s*_:$]|\\\$|\\\()*(?P<sign>[-+\u2212]?)\s*(?:\\\$|\$)?"
    rf"(?:{_FRAC.pattern}|(?P<digits>{_DIGITS})(?:\s*/\s*(?P<denominator>{_DIGITS}))?)"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_MARK = re.compile(r"####|\banswer\s*(?:is\b|:|=)", re.IGNORECASE)


def number(task: dict, final_text: str, tool_calls_made: list[dict]) -> Verdict:
    """1 when the final answer equals ``expected`` (within ``tolerance``, default 1e-6).

    The final answer, never "any number in the text": a mark where common math graders look for one
    (GSM8K's ``#### 72``, MATH's and NeMo-Skills' last ``\\boxed{}``, lm-eval's "The answer is"),
    else the last result. (NeMo Gym's math_with_judge takes a last ``\\boxed{}`` only, then grades
    with Hugging Face's math-verify; tasks here ask for "just the number", so no mark is required,
    and math-verify on free text evaluates an echoed "144 / 12" to 12 and rewards it. Like Gym's
    ``extracted_answer``, the answer taken is returned in ``Verdict.read``.)

    1. A mark: the last ``\\boxed{...}`` or ``\\fbox{...}`` (its content), ``#### ...`` or "answer
       is / answer: / answer =" (the rest of its line) that holds a value. Its value is the one it
       starts with: a number or a fraction (``3/4``, ``\\frac{3}{4}``), units and punctuation after
       it ignored; when that opens an expression ("the answer is 7 + 5 = 12"), the expression's
       result by rule 2 within the mark. A mark holding no value ("the answer is below") is prose.
    2. Without a mark, the last number that is a result, not an operand: a number joined to
       another by an arithmetic operator (``+ - * / ^ ** x × ÷``, "plus", "minus", "times",
       "divided by", "multiplied by") or inside ``\\frac{}{}`` is part of an expression, as in a
       question echoed ("144 / 12 is a fraction ..."), and never the answer; "= 12", "is 12" and a
       bare "12" are results. So a bare ``a/b`` in prose is an expression: a fractional answer is
       given marked, or as a decimal.

    Numbers: an optional sign (``-``, ``+``, ``−``), thousands separators ("1,000"), decimals
    ("12.0", ".5"). No final answer: 0.
    """
    spec = task["verifier"]
    expected, tolerance = float(spec["expected"]), float(spec.get("tolerance", 1e-6))
    answer = final_answer(final_text or "")
    right = answer is not None and math.isclose(answer, expected, rel_tol=tolerance, abs_tol=tolerance)
    return Verdict(float(right), {"expected": expected, "tolerance": tolerance, "answer": answer})


def final_answer(text: str) -> float | None:
    """The final answer of ``text`` by ``number``'s rule; None when it states none."""
    for span in reversed(_marked_spans(text)):
        value = _marked_value(span)
        if value is not None:
            return value
    return _last_result(text)


def _marked_spans(text: str) -> list[str]:
    """The content of each mark, in the order the marks start."""
    spans = [(m.start(), text[m.end():].partition("\n")[0]) for m in _ANSWER_MARK.finditer(text)]
    for m in _BOXED.finditer(text):
        depth, end = 1, m.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        spans.append((m.start(), text[m.end():end - 1 if depth == 0 else end]))
    return [span for _, span in sorted(spans, key=lambda s: s[0])]


def _marked_value(span: str) -> float | None:
    m = _VALUE.match(span)
    if m is None or _OPERATOR_AFTER.match(span, m.end()):
        return _last_result(span)
    if m["num"] is not None:
        numerator, denominator = _float(m["num"]), _float(m["den"])
    else:
        numerator, denominator = _float(m["digits"]), _float(m["denominator"] or "1")
    if denominator == 0:
        return None
    return _signed(m["sign"], numerator / denominator)


def _last_result(text: str) -> float | None:
    text = _FRAC.sub(lambda m: " " * len(m[0]), text)  # in prose, an expression like a/b
    result = None
    for m in _NUMBER.finditer(text):
        before = text[max(0, m.start() - _LOOKBEHIND):m.start()]
        sign_is_an_operator = m["sign"] and _SIGN_AS_OPERATOR.search(before)
        if sign_is_an_operator or _OPERATOR_BEFORE.search(before) or _OPERATOR_AFTER.match(text, m.end()):
            continue
        result = _signed(m["sign"], _float(m["digits"]))
    return result


def _float(digits: str) -> float:
    return float(digits.replace(",", ""))


def _signed(sign: str, value: float) -> float:
    return -value if sign in ("-", "\u2212") else value


def contains(task: dict, final_text: str, tool_calls_made: list[dict]) -> Verdict:
    """1 when ``expected`` appears in the answer, ignoring case."""
    expected = str(task["verifier"]["expected"])
    return Verdict(float(expected.lower() in (final_text or "").lower()), {"expected": expected})


def tool_call(task: dict, final_text: str, tool_calls_made: list[dict]) -> Verdict:
    """1 when tool ``tool`` was called, with ``arguments`` (if given) a subset of what the model passed."""
    spec = task["verifier"]
    wanted = spec.get("arguments", {})
    read = {"tool": spec["tool"], "arguments": wanted}
    for call in tool_calls_made:
        if call["name"] != spec["tool"]:
            continue
        given = call["arguments"] if isinstance(call["arguments"], dict) else {}
        if all(k in given and _same(given[k], v) for k, v in wanted.items()):
            return Verdict(1.0, read)
    return Verdict(0.0, read)


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


def judge(task: dict, final_text: str, tool_calls_made: list[dict]) -> Verdict:
    """The task's verifier's verdict on the answer."""
    return get(task)(task, final_text, tool_calls_made)
