"""Bad input is an InvalidInput with one line that says what to do; specs parse one way."""

from __future__ import annotations

import pytest

from hyprstream_tui.engine.params import SamplingParams, check_budget, check_prompt
from hyprstream_tui.engine.sources import ModelSpec, parse_spec
from hyprstream_tui.errors import InvalidInput


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": 1.0}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": "abc"}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("ok\ud800",)}, "surrogate"),
    ],
)
def test_bad_params_are_one_line_invalid_input(kwargs, words):
    with pytest.raises(InvalidInput) as info:
        SamplingParams(**kwargs)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_good_params_are_frozen_and_keyword_only():
    p = SamplingParams(temperature=0, top_k=5, top_p=0.5, stop=["</s>"], seed=7)
    assert p.greedy and p.stop == ("</s>",)
    assert p.as_dict()["stop"] == ["</s>"]
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # type: ignore[misc]


@pytest.mark.parametrize("prompt", ["", "   \n", "bad \ud83d surrogate", None, b"bytes"])
def test_bad_prompts(prompt):
    with pytest.raises(InvalidInput) as info:
        check_prompt(prompt)
    assert "\n" not in str(info.value)


def test_budget_against_window():
    check_budget(prompt_tokens=10, max_tokens=100, window=512)
    with pytest.raises(InvalidInput, match="context window"):
        check_budget(prompt_tokens=10, max_tokens=512, window=512)
    with pytest.raises(InvalidInput, match="prompt"):
        check_budget(prompt_tokens=500, max_tokens=100, window=512)


@pytest.mark.parametrize(
    "text, spec",
    [
        ("qwen", ModelSpec(model="qwen")),
        ("qwen:poet", ModelSpec(model="qwen", adapter="poet")),
        ("qwen:poet@v1", ModelSpec(model="qwen", adapter="poet", rev="v1")),
        ("qwen:poet@abc1234", ModelSpec(model="qwen", adapter="poet", rev="abc1234")),
        ("qwen:poet/v1", ModelSpec(model="qwen", adapter="poet/v1")),
        ("/tmp/m", ModelSpec(model="/tmp/m")),
        ("/tmp/m:/tmp/a@b", ModelSpec(model="/tmp/m", adapter="/tmp/a@b")),
    ],
)
def test_parse_spec(text, spec):
    assert parse_spec(text) == spec
    if not text.startswith("/"):
        assert str(parse_spec(text)) == text


@pytest.mark.parametrize("text", ["", " ", "qwen:", "qwen:poet@", ":poet"])
def test_parse_spec_rejects(text):
    with pytest.raises(InvalidInput):
        parse_spec(text)
