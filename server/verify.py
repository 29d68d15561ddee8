"""Checks an OpenAI-compatible endpoint must pass before Gym traffic is sent to it.

Each check is one real request; a failure says what is wrong and what to do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx


@dataclass
class CheckResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


def check_models(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """``GET /v1/models`` lists the served model name."""
    t0 = time.perf_counter()
    try:
        resp = client.get(f"{base_url}/models")
        resp.raise_for_status()
        ids = [m.get("id") for m in resp.json().get("data", [])]
    except (httpx.HTTPError, ValueError) as e:
        return CheckResult("models", False, time.perf_counter() - t0, f"GET /v1/models failed: {e}")
    ok = model in ids
    detail = f"lists {ids}" + ("" if ok else f", not {model!r}: does model.served_name match the engine?")
    return CheckResult("models", ok, time.perf_counter() - t0, detail)


def check_chat(client: httpx.Client, base_url: str, model: str) -> CheckResult:
    """A 1-token chat completion returns ``choices[0].message``."""
    t0 = time.perf_counter()
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        resp = client.post(f"{base_url}/chat/completions", json=body)
        resp.raise_for_status()
        message = resp.json()["choices"][0]["message"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        return CheckResult("chat", False, time.perf_counter() - t0, f"1-token chat completion failed: {_why(e)}")
    return CheckResult("chat", True, time.perf_counter() - t0, f"answered {message.get('content')!r}")


def readiness_checks(base_url: str, model: str, timeout_s: float = 30.0) -> list[CheckResult]:
    """The gate a run passes before its jobs start; stops at the first failure."""
    results = []
    with httpx.Client(timeout=timeout_s) as client:
        for check in (check_models, check_chat):
            results.append(check(client, base_url, model))
            if not results[-1].ok:
                break
    return results


def _why(e: Exception) -> str:
    if isinstance(e, httpx.HTTPStatusError):
        return f"HTTP {e.response.status_code}: {e.response.text[:300]}"
    return f"{type(e).__name__}: {e}"
