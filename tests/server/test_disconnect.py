"""A client that hangs up cancels its generation: the batch drops the row within one decode step.

The assertion is on the engine's own `RowLeft` event (the step it was cancelled at and the step it
left at), not on time. A listener slows every token down a little so that the generation is
certainly still running when the hang-up reaches the server.
"""

from __future__ import annotations

import json
import socket
import time

import httpx

from hyprstream_tui.engine.batching import RowLeft
from hyprstream_tui.engine.events import TokenDelta
from tests.server.live import LONG_PROMPT, live_server, make_app, wait_for

MAX_TOKENS = 400


def _slow(event) -> None:
    if isinstance(event, TokenDelta):
        time.sleep(0.005)  # runs in the scheduler thread: each step takes >= 5 ms


def _left(live, request_id: str) -> RowLeft:
    wait_for(lambda: any(isinstance(e, RowLeft) and e.request_id == request_id for e in live.events),
             what="the row to leave the batch")
    return next(e for e in live.events if isinstance(e, RowLeft) and e.request_id == request_id)


def _request_ids(live) -> list[str]:
    return [e.request_id for e in live.events if isinstance(e, TokenDelta)]


def test_streaming_client_hang_up_stops_generation_within_one_step(engine):
    with live_server(make_app(engine, max_batch=4)) as live:
        live.batcher.add_listener(_slow)
        body = {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                "seed": 1, "stream": True}
        with httpx.Client(base_url=live.v1, timeout=60) as client:
            with client.stream("POST", "/completions", json=body) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                chunks = []
                for line in lines:
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                    if len(chunks) == 5:
                        break
            # leaving the block closes the connection mid-stream
        request_id = chunks[0]["id"].removeprefix("cmpl-")
        left = _left(live, request_id)
        assert left.reason == "cancelled"
        assert left.cancel_step is not None
        assert left.step - left.cancel_step <= 1, left  # stopped within one decode step
        assert left.tokens < MAX_TOKENS
        wait_for(lambda: live.batcher.in_flight == 0, what="the slot to be released")


def test_non_streaming_client_hang_up_cancels_too(engine):
    with live_server(make_app(engine, max_batch=4)) as live:
        live.batcher.add_listener(_slow)
        body = json.dumps({"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": MAX_TOKENS,
                           "temperature": 1.0, "seed": 1}).encode()
        port = int(live.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: len(_request_ids(live)) >= 5, what="some tokens")
        request_id = _request_ids(live)[0]
        left = _left(live, request_id)
        assert left.reason == "cancelled"
        assert left.step - left.cancel_step <= 1
        assert left.tokens < MAX_TOKENS


def test_other_rows_carry_on_when_one_client_leaves(engine):
    import openai

    with live_server(make_app(engine, max_batch=4)) as live:
        with openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0) as client:
            leaving = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=MAX_TOKENS,
                                                temperature=1.0, seed=1, stream=True)
            next(iter(leaving))
            staying = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=60,
                                                temperature=1.0, seed=2)
            leaving.close()
            alone = client.completions.create(model="tiny", prompt=LONG_PROMPT, max_tokens=60,
                                              temperature=1.0, seed=2)
        assert staying.choices[0].text == alone.choices[0].text
        assert staying.usage.completion_tokens == 60
