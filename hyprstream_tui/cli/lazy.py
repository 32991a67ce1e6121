"""The top-level verbs, each verb's parser filled in only when the command line uses that verb.

`hyprstream --help` lists the verbs but needs none of their ~40 parsers, and `hyprstream model list`
needs only `model`'s; argparse spends gettext look-ups (a few file-system probes each) and a
terminal-size query on every parser and argument it builds, which took as long as importing the
whole CLI. `build_parser(verb)` still registers every verb, so the verb list, each verb's help and
the "invalid choice" error are unchanged, but any other verb's parser is a `Sink`, which its
`add_*_commands` function fills in vain. Should argparse reach a verb that was left a `Sink` (a
command line that `verb_of` read otherwise), `NotBuilt` tells `main` to build them all and parse
again.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence


class NotBuilt(Exception):
    """argparse chose a verb whose parser was left empty: build them all and parse again."""


class Sink:
    """Stands in for a verb's parser that is not built: takes any call, keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return self.ignore

    def ignore(self, *args: Any, **kwargs: Any) -> Sink:
        return self


class Verbs(argparse._SubParsersAction):
    """`add_subparsers(action=Verbs)`; `only` is the one verb whose parser is built (None: all)."""

    only: str | None = None

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if self.only in (None, name):
            return super().add_parser(name, **kwargs)
        built, self._parser_class = self._parser_class, Sink  # registered all the same: --help lists it
        try:
            return super().add_parser(name, **kwargs)
        finally:
            self._parser_class = built

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if self.only not in (None, values[0]):
            raise NotBuilt(values[0])
        super().__call__(parser, namespace, values, option_string)


def verb_of(argv: Sequence[str]) -> str:
    """The verb of a command line: its first word that is neither an option nor --home's value
    ("" when there is none: `hyprstream --help`, or the TUI)."""
    words = iter(argv)
    for word in words:
        if not word.startswith("-"):
            return word
        if len(word) > 3 and "--home".startswith(word):  # --home DIR, or argparse's abbreviation of it
            next(words, None)
    return ""
