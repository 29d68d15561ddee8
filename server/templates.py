"""Command templates: a command line with ``{placeholders}``, filled word by word.

The line is split as a shell would first, then each word is filled, so a value
with spaces (a path) stays one argument; ``{{`` and ``}}`` are literal braces.
Shared by ``server=openai_command`` and ``job=command``.
"""

from __future__ import annotations

import shlex
import string


def fill_command(command: str, values: dict[str, str], key: str, hints: dict[str, str] | None = None) -> list[str]:
    """``command`` as argv with ``values`` filled in; errors name the config ``key``.

    ``hints`` adds a sentence to the error for a placeholder that is missing on purpose.
    """
    return [_fill(word, values, key, hints or {}) for word in _split(command, key)]


def placeholders(command: str, key: str) -> set[str]:
    """The placeholder names ``command`` uses; errors name the config ``key``."""
    return {name for word in _split(command, key) for name in _names(word, key)}


def _split(command: str, key: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError as e:  # an unclosed quote
        raise ValueError(f"{key}: {command!r} does not split into words: {e}") from None


def _names(word: str, key: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(word) if name is not None]
    except ValueError as e:  # a lone brace
        raise ValueError(f"{key}: {word!r}: {e}; write a literal brace as {{{{ or }}}}") from None


def _fill(word: str, values: dict[str, str], key: str, hints: dict[str, str]) -> str:
    for name in _names(word, key):
        if name not in values:
            hint = f" ({hints[name]})" if name in hints else ""
            raise ValueError(
                f"{key}: unknown placeholder {{{name}}} in {word!r}{hint}; "
                f"the placeholders are {', '.join('{' + known + '}' for known in values)}"
            )
    return word.format_map(values)
