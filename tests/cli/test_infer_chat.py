"""`hyprstream infer` and `hyprstream chat` as plain functions, and their argparse wiring (cli/generate.py)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from hyprstream_tui.cli.generate import add_infer_commands, run_chat, run_infer
from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.loader import LoadOptions
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.errors import InvalidInput, NotFound

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(options=LoadOptions(dtype="float32"))
    yield engine
    engine.close()


def test_infer_streams_the_reply(engine, tiny_model_src):
    out = io.StringIO()
    done = run_infer(engine, str(tiny_model_src), "Hello", GREEDY, system="Be brief.", write=out.write)
    assert out.getvalue() == done.text + "\n"
    assert done.prompt_tokens > 5  # the chat template wrapped the prompt


def test_infer_json_from_stdin_reports_speeds(engine, tiny_model_src):
    out = io.StringIO()
    run_infer(engine, str(tiny_model_src), "-", GREEDY, raw=True, as_json=True, write=out.write,
              read_stdin=lambda: "Once upon a time")
    data = json.loads(out.getvalue())
    assert data["usage"]["prompt_tokens"] > 0
    assert data["timings"]["prefill_tok_s"] > 0 and data["timings"]["decode_tok_s"] >= 0
    assert data["provenance"]["params"]["max_tokens"] == 12 and "seed" in data["provenance"]


def test_infer_errors_are_hypr_errors(engine, tiny_model_src):
    with pytest.raises(InvalidInput):
        run_infer(engine, str(tiny_model_src), "", GREEDY, write=io.StringIO().write)
    with pytest.raises(NotFound):
        run_infer(engine, str(tiny_model_src) + "-nope", "hi", GREEDY, write=io.StringIO().write)


def test_chat_loop(engine, tiny_model_src):
    lines = iter(["Hello", "", "/reset", "Again", "word " * 600, "/exit"])
    out = io.StringIO()
    conversation = run_chat(engine, str(tiny_model_src), GREEDY, read_line=lambda _: next(lines),
                            write=out.write)
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    assert conversation[0]["content"] == "Again"
    text = out.getvalue()
    assert text.count("assistant> ") <= 2 and "(conversation forgotten)" in text
    assert "error: The last message needs" in text


def test_argparse_wiring(tiny_model_src, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=str(tmp_path))
    add_infer_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["infer", str(tiny_model_src), "--prompt", "Hi", "--temperature", "0",
                              "--max-tokens", "5", "--dtype", "float32", "--json", "--stop", "x"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["provenance"]["params"]["stop"] == ["x"] and data["usage"]["completion_tokens"] <= 5
    args = parser.parse_args(["infer", str(tiny_model_src), "--prompt", "Hi", "--top-p", "2"])
    with pytest.raises(InvalidInput, match="top_p"):
        args.func(args)
