"""Streaming text: never half a character, never any part of a stop string."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream_tui.engine.detok import IncrementalDetokenizer
from hyprstream_tui.engine.stops import StopMatcher

TEXT = "Hi 😀 there: 日本語のテキスト, 👨‍👩‍👧 family, Ångström é 🎉🎉 done."


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2)


def test_detokenizer_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    # The tiny vocabulary splits each emoji and CJK character into several byte tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(lambda x: tokenizer.decode(x, skip_special_tokens=True))
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == TEXT
    for delta in deltas:
        delta.encode("utf-8")  # whole characters: no lone surrogates either


def test_detokenizer_with_prompt_context_and_special_tokens(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode("ça va 👍") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    detok = IncrementalDetokenizer(
        lambda x: tokenizer.decode(x, skip_special_tokens=True), context=prompt
    )
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "ça va 👍"


def test_flush_emits_an_unfinished_character_as_replacement(tokenizer):
    ids = tokenizer.encode("😀")
    detok = IncrementalDetokenizer(lambda x: tokenizer.decode(x))
    assert "".join(detok.push(i) for i in ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


def _run(stops, pieces):
    m = StopMatcher(stops)
    out = [m.push(p) for p in pieces]
    out.append(m.flush())
    return out, m.matched


def test_stop_string_split_across_pieces_is_never_emitted():
    out, matched = _run(["</end>"], ["Hello <", "/e", "nd", "> more"])
    assert "".join(out) == "Hello "
    assert matched == "</end>"
    assert all("<" not in piece for piece in out)


def test_partial_stop_is_released_when_it_turns_out_not_to_be_one():
    out, matched = _run(["STOP"], ["a S", "T", "x b"])
    assert out == ["a ", "", "STx b", ""]
    assert matched is None


def test_the_stop_that_completes_first_wins():
    out, matched = _run(["bb", "a b"], ["xx a bb"])
    assert "".join(out) == "xx " and matched == "a b"
    out, matched = _run(["/", "</<"], ["</<"])
    assert "".join(out) == "<" and matched == "/"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/ 😀", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>/😀", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_stop_matching_is_independent_of_how_text_is_split(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    out, matched = _run(stops, pieces)
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(hits)[1]] if hits else text
    assert "".join(out) == expected
    assert (matched is not None) == bool(hits)
    emitted = ""
    for piece in out:  # at no point does the emitted text contain a stop string
        emitted += piece
        assert not any(s in emitted for s in stops)
