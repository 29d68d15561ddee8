"""What the project's command lines share: options accepted before or after a subcommand."""

from __future__ import annotations

import argparse
import copy


def options_anywhere(parser: argparse.ArgumentParser, subparsers: argparse._SubParsersAction) -> None:
    """Let every option of ``parser`` also follow its subcommand.

    People write ``python -m server.registry urls policy --root DIR`` as often as
    ``--root DIR urls policy``. Each subcommand gets a copy of the option whose default is
    "not given", so a value given before the subcommand is not overwritten by the default.
    """
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    for sub in subparsers.choices.values():
        for action in options:
            twin = copy.copy(action)
            twin.default = argparse.SUPPRESS
            sub._add_action(twin)
