"""The TUI's `--remote URL` engine (`tui.engine_link.RemoteEngine`) against the real server: the
streamed answer is the server's, failures are one-line HyprErrors, and a cancelled job hangs up so
that the server drops the row within one decode step."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hyprstream_tui.engine.batching import RowLeft
from hyprstream_tui.engine.events import GenerationDone, TokenDelta
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.errors import HubError, HyprError, InvalidInput, NotFound
from hyprstream_tui.tui.engine_link import RemoteEngine
from tests.server.live import LONG_PROMPT, free_port, live_server, make_app, wait_for

CHAT = [{"role": "user", "content": "Say hello."}]


def _chat(remote: RemoteEngine, spec: str, params: SamplingParams, messages=CHAT):
    events: list = []
    job = remote.chat(spec, messages, params, on_event=events.append, request_id="r1")
    assert job.wait(120), "the remote job did not finish"
    return job, events


def test_remote_chat_streams_the_servers_answer(live, engine):
    remote = RemoteEngine(live.url)
    try:
        assert remote.model_ids() == ["tiny", "tiny:qa"]
        params = SamplingParams(temperature=0, max_tokens=10)
        job, events = _chat(remote, "tiny:qa", params)
        done = job.result()
        alone = engine.chat("tiny:qa", CHAT, params).result()
        deltas = [e for e in events if isinstance(e, TokenDelta)]
        assert done.text == alone.text == "".join(d.text for d in deltas) and deltas
        assert done.finish_reason == alone.finish_reason and done.provenance.adapter == "qa"
        assert done.provenance.device == live.url + "/" and events[-1] is done
        assert isinstance(done, GenerationDone)
    finally:
        remote.close()


def test_remote_errors_are_one_line_hypr_errors(live, engine):
    remote = RemoteEngine(live.url)
    try:
        with pytest.raises(NotFound, match="nope"):
            _chat(remote, "nope", SamplingParams(max_tokens=4))[0].result()
        with pytest.raises(InvalidInput, match="maximum context length"):
            _chat(remote, "tiny", SamplingParams(max_tokens=10_000))[0].result()
    finally:
        remote.close()
    gone = RemoteEngine(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HubError, match="Cannot reach") as info:
        gone.model_ids()
    assert "\n" not in info.value.message
    with pytest.raises(HubError, match="Cannot reach"):
        _chat(gone, "tiny", SamplingParams(max_tokens=4))[0].result()
    with live_server(make_app(engine, api_key="k3y")) as keyed:
        with pytest.raises(InvalidInput, match="API key"):
            RemoteEngine(keyed.url, api_key="wrong").model_ids()
        assert RemoteEngine(keyed.url, api_key="k3y").model_ids()[0] == "tiny"


def test_a_server_that_is_not_openai_is_a_one_line_error():
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b"<html>a web page, not an OpenAI API</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteEngine(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(HubError, match="Cannot list the models") as info:
            remote.model_ids()
        assert "\n" not in info.value.message
        remote.close()
    finally:
        server.shutdown()
        server.server_close()


def _slow(event) -> None:
    if isinstance(event, TokenDelta):
        time.sleep(0.005)  # runs in the scheduler thread: each step takes >= 5 ms


def test_cancelling_a_remote_job_hangs_up_and_the_server_stops_within_one_step(engine):
    max_tokens = 400
    with live_server(make_app(engine, max_batch=4)) as live:
        live.batcher.add_listener(_slow)
        remote = RemoteEngine(live.url)
        five = threading.Event()
        tokens: list[TokenDelta] = []

        def on_event(event) -> None:
            if isinstance(event, TokenDelta):
                tokens.append(event)
                if len(tokens) == 5:
                    five.set()

        params = SamplingParams(temperature=1.0, seed=1, max_tokens=max_tokens)
        job = remote.chat("tiny", [{"role": "user", "content": LONG_PROMPT}], params, on_event=on_event,
                          request_id="r1")
        assert five.wait(60), "no tokens came"
        job.cancel()
        assert job.wait(30) and job.result().finish_reason == "cancelled"
        wait_for(lambda: any(isinstance(e, RowLeft) for e in live.events), what="the row to leave the batch")
        left = next(e for e in live.events if isinstance(e, RowLeft))
        assert left.reason == "cancelled", left
        assert left.cancel_step is not None and left.step - left.cancel_step <= 1, left
        assert left.tokens < max_tokens
        wait_for(lambda: live.batcher.in_flight == 0, what="the slot to be released")
        remote.close()
