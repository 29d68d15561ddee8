"""One way to say what is wrong with a config: every message starts with the full key it is about.

Each config dataclass checks its own fields in a ``validate(self, checks)`` method, beside its
definition, naming them relative to itself (``"top_p"``); whoever embeds it says where it sits
(``checks.at("job.sampling")``), so the same method serves ``job.sampling.top_p`` in the launcher
and ``top_p`` where the dataclass is used on its own. Validation only reads: it never changes the
config it checks.

    checks = Checks()
    cfg.validate(checks.at("job"))
    checks.raise_if_any()   # ConfigError("invalid config:\\n  job.sampling.top_p: must be in (0, 1], got 2.0")
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class Checks:
    """Collects every error of a config, so that all of them are reported at once."""

    def __init__(self, prefix: str = "", errors: list[str] | None = None) -> None:
        self.prefix = prefix
        self.errors: list[str] = [] if errors is None else errors

    def key(self, name: str = "") -> str:
        """The full key of ``name`` (a field of what is being checked, or a dotted path below it)."""
        return ".".join(part for part in (self.prefix, name) if part)

    def at(self, name: str) -> Checks:
        """The checks of a nested section: the same errors, keys below ``name``."""
        return Checks(self.key(name), self.errors)

    def require(self, ok: bool, name: str, message: str) -> bool:
        """Record ``<key>: <message>`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.errors.append(f"{self.key(name)}: {message}")
        return ok

    def fail(self, name: str, message: str) -> None:
        self.require(False, name, message)

    def must(self, obj: object, name: str, rule: str, ok: Callable[[Any], bool]) -> bool:
        """``obj.<name>`` passes ``ok``; else ``<key>: must be <rule>, got <value>``."""
        value = getattr(obj, name)
        return self.require(ok(value), name, f"must be {rule}, got {value}")

    def at_least(self, obj: object, name: str, low: float, *, or_null: bool = False) -> bool:
        return self.must(obj, name, f">= {low}" + _OR_NULL[or_null], lambda v: _null_ok(v, or_null) or v >= low)

    def above(self, obj: object, name: str, low: float, *, or_null: bool = False) -> bool:
        return self.must(obj, name, f"> {low}" + _OR_NULL[or_null], lambda v: _null_ok(v, or_null) or v > low)

    @contextmanager
    def reporting(self, *errors: type[Exception]) -> Iterator[None]:
        """Record an error raised inside (its message names its key) instead of letting it through:
        a dry run of code that refuses by raising, or a normalising step."""
        try:
            yield
        except errors as e:
            self.errors.append(str(e))

    def raise_if_any(self, error: type[ConfigError] = ConfigError) -> None:
        if self.errors:
            raise error("invalid config:\n  " + "\n  ".join(self.errors))


_OR_NULL = {False: "", True: " or null"}


def _null_ok(value: Any, or_null: bool) -> bool:
    return or_null and value is None


def check(cfg: Any, prefix: str = "") -> None:
    """Run ``cfg.validate`` on its own; raise ``ConfigError`` listing everything wrong."""
    checks = Checks(prefix)
    cfg.validate(checks)
    checks.raise_if_any()
