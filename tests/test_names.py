"""The one place names are validated: a hostile corpus is refused, and (Hypothesis) anything
accepted stays inside its root."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyprstream_tui import names
from hyprstream_tui.errors import InvalidInput

HOSTILE = [
    "", ".", "..", "../x", "x/..", "/etc/passwd", "~", "~root", "a\x00b", "a\nb", "a\rb", "a\tb", "a..b", "a.lock",
    "@{u}", "a@{1}", "HEAD^", "a~1", "a:b", "a?b", "a*b", "a[b", "a\\b", "C:\\x", "C:x", "\\\\server\\share",
    "//server/share", ".hidden", "-flag", "a" * 300, "ｍodel", "mоdel", "model\u200b", "naïve", " a", "a ", "a/b",
    "x.", "con/../..", "working", "WORKING",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_model_names_are_refused(bad):
    with pytest.raises(InvalidInput) as info:
        names.model_name(bad)
    assert "\n" not in info.value.message


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a\\b", ".git/config", "x/.git/HEAD", "a//b", "", "a\x00",
                                 "C:\\win", "a/./b", "a\nb"])
def test_hostile_file_names_are_refused(bad):
    with pytest.raises(InvalidInput):
        names.repo_relpath(bad)


def test_ordinary_names_pass():
    assert names.model_name("Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert names.repo_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen", "Qwen2.5-0.5B-Instruct")
    assert str(names.repo_relpath("onnx/model.onnx")) == "onnx/model.onnx"
    assert str(names.repo_relpath(".gitattributes")) == ".gitattributes"
    assert names.revision("refs/pr/1") == "refs/pr/1"


@settings(max_examples=400, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_any_accepted_name_resolves_inside_its_root(tmp_path_factory, text):
    root = Path("/srv/hyprstream-root")
    for check in (names.model_name, names.adapter_name, names.tag_label):
        try:
            ok = check(text)
        except InvalidInput:
            continue
        assert (root / ok).resolve().parent == root.resolve()
    try:
        rel = names.repo_relpath(text)
    except InvalidInput:
        return
    target = (root / rel).resolve()
    assert root.resolve() in target.parents
