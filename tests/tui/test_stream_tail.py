"""The growing end of a streaming reply (StreamTail): wrapped incrementally with the same lines as
a wrap from scratch, repainted without laying out the screen until it needs more lines, and
handed to Markdown block by block (never inside a code fence), all of it by the reply's end."""

from __future__ import annotations

import random

import pytest
from rich.cells import cell_len

from hyprstream_tui.tui.widgets.chat_log import ChatLog
from hyprstream_tui.tui.widgets.chat_message import block_end
from hyprstream_tui.tui.widgets.stream_tail import STEP, StreamTail, wrap
from tests.tui.helpers import count_layouts
from tests.tui.test_chat_log import LogApp, stream

PIECES = ["a", "bb", "ccc ", "  ", "\n", "d" * 22, "世界", "é ", " ", "x\n\n", "longwordlongwordlongword "]


def test_wrapping_as_text_comes_gives_the_lines_of_a_wrap_from_scratch():
    rng = random.Random(1)
    for _ in range(2000):
        width = rng.randint(1, 30)
        text, lines = "", []
        for piece in (rng.choice(PIECES) for _ in range(rng.randint(1, 30))):
            text += piece
            start = lines.pop()[0] if lines else 0  # what StreamTail does: the last line again
            lines.extend(wrap(text, start, width))
        assert lines == wrap(text, 0, width), (text, width)
        for start, end in lines:  # every line fits (a character wider than the line sits alone)
            shown = text[start:end].rstrip()
            assert cell_len(shown) <= width or len(shown) == 1
        assert "".join(text[start:end] for start, end in lines) == text.replace("\n", "")


def test_blocks_end_at_a_blank_line_outside_code_fences():
    assert block_end("one\n\ntwo", False) == (5, False)
    assert block_end("one\n\ntwo\n\nthr", False) == (10, False)
    assert block_end("one\ntwo", False) == (0, False)  # no blank line yet
    assert block_end("```py\nx = 1\n\ny = 2\n", False) == (0, False)  # no cut inside the open fence
    assert block_end("```py\nx = 1\n\n```\n\nafter", False) == (18, False)  # after the fence closes
    assert block_end("x = 1\n\n```\n\nmore", True) == (12, False)  # a fence open before this text
    assert block_end("one\n\n", False) == (5, False)


@pytest.mark.asyncio
async def test_a_streaming_reply_grows_in_its_tail_and_reaches_markdown_block_by_block():
    app = LogApp()
    async with app.run_test(size=(60, 30)) as pilot:
        log = app.query_one(ChatLog)
        reply = log.add_replies(["model"], ["r"])[0]
        await pilot.pause()
        tail = reply.query_one(StreamTail)
        body = reply.query_one(".message-body")
        width = tail.size.width

        await stream(pilot, log, ["word "])  # the first text: the tail takes its first lines
        layouts = count_layouts(app.screen)
        words = 0
        while tail.line_count < 3 * STEP:
            await stream(pilot, log, [f"w{words * 7} "])  # words of 2 to 4 letters
            words += 1
        # repaints in place; a layout only each time it needs STEP more lines
        # it grew from STEP lines to 3 * STEP: two layouts of the screen each time (Textual lays out
        # again once sizes settle), and none for the other hundred-odd updates, which repainted
        assert tail.layouts == 2 and layouts[0] <= 4 and words > 100
        # every word is on screen whole: the lines fit the width inside the padding
        lines = [tail.render_line(y).text.rstrip() for y in range(tail.line_count)]
        assert " ".join(lines).split() == tail.text.split()
        assert max(cell_len(line) for line in lines) > width - 6 and width == reply.size.width - 2
        assert body.source == ""  # a paragraph still being written stays in the tail

        first = tail.text
        await stream(pilot, log, ["end.\n\n```python\nx = 1\n\n"])
        await pilot.pause()
        assert body.source == first + "end.\n\n"  # the complete paragraph went to Markdown
        assert tail.text == "```python\nx = 1\n\n"  # a blank line inside a code fence does not cut
        await stream(pilot, log, ["y = 2\n```\n\nlast\x1b[2J words\r"])
        await pilot.pause()
        assert tail.text == "last[2J words"  # control characters never reach the terminal

        await log.finish("r", text=None, meta={"model": "m"})
        await pilot.pause()
        whole = first + "end.\n\n```python\nx = 1\n\ny = 2\n```\n\nlast\x1b[2J words\r"
        assert reply.text == whole  # kept as written (saved, exported)
        assert body.source == whole.replace("\x1b", "").replace("\r", "")  # drawn without controls
        assert not any("\x1b" in strip.text for strip in app.screen._compositor.render_strips())
        assert not reply.query(StreamTail)  # the finished reply is Markdown only
        assert reply.meta == {"model": "m"}
