"""What `hyprstream --help` costs: the modules it imports, and the parsers it builds (cli/lazy.py).
A fence against regressions, not a timing: the times are benchmarks/coldstart.py's."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from hyprstream_tui.cli import build_parser, main
from hyprstream_tui.cli.lazy import NotBuilt, Sink, verb_of
from tests.helpers import REPO_ROOT

# Heavy libraries, the layers under the CLI, and the stdlib modules the CLI once imported at load
# (dataclasses, json and pathlib: now inside the handlers that use them).
NOT_FOR_HELP = ("rich", "pygit2", "textual", "torch", "transformers", "peft", "httpx", "uvicorn",
                "hyprstream_tui.store", "hyprstream_tui.engine", "hyprstream_tui.settings",
                "dataclasses", "json", "pathlib")


def test_help_imports_nothing_it_does_not_need():
    """In a bare interpreter (-S: no site, so no .pth file imports anything first)."""
    code = ("import sys, contextlib, io\n"
            f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "from hyprstream_tui.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "assert out.getvalue().startswith('usage: hyprstream'), out.getvalue()\n"
            f"print(sorted(m for m in {NOT_FOR_HELP!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def sub_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = parser._subparsers._group_actions[0] if parser._subparsers else None
    return dict(action.choices) if action else {}


def verb_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for name, sub in sub_parsers(parser).items():
        yield prefix + (name,), sub
        yield from verb_paths(sub, prefix + (name,))


def test_a_verb_builds_only_its_own_parser_and_its_help_is_the_same():
    full = build_parser()
    assert build_parser("").format_help() == full.format_help()
    for verb, sub in sub_parsers(full).items():
        lazy = build_parser(verb)
        assert list(sub_parsers(lazy)) == list(sub_parsers(full))  # every verb is listed
        assert [v for v, p in sub_parsers(lazy).items() if not isinstance(p, Sink)] == [verb]
    for path, sub in verb_paths(full):
        lazy = build_parser(path[0])
        for name in path:
            lazy = sub_parsers(lazy)[name]
        assert lazy.format_help() == sub.format_help(), path


@pytest.mark.parametrize("argv,verb", [
    ([], ""), (["--help"], ""), (["--debug"], ""), (["model", "list"], "model"),
    (["--home", "lora", "model", "list"], "model"), (["--home=x", "infer", "m"], "infer"),
    (["--ho", "x", "chat"], "chat"), (["--debug", "lora"], "lora"),
])
def test_verb_of_reads_a_command_line_as_argparse_does(argv, verb):
    assert verb_of(argv) == verb
    if verb:  # argparse dispatches to the same verb
        with pytest.raises(NotBuilt):
            build_parser("tui" if verb != "tui" else "model").parse_args(argv)


def test_a_command_line_read_otherwise_is_parsed_with_every_verb_built(home, capsys, monkeypatch):
    import hyprstream_tui.cli as cli

    monkeypatch.setattr(cli, "verb_of", lambda argv: "serve")  # a misreading: main builds them all
    assert main(["--home", str(home), "model", "list"]) == 0
    assert capsys.readouterr().out.startswith("No models yet")
