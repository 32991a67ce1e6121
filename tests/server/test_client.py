"""`hyprstream_tui.client.Client` against the real server, and `hyprstream serve` itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hyprstream_tui.client import Client, ServerBusy, ServerUnavailable
from hyprstream_tui.errors import InvalidInput, NotFound
from tests.server.live import LONG_PROMPT, REPO_ROOT, free_port, live_server, make_app, wait_for

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(live):
    with Client(live.url) as c:
        yield c


def test_models_generate_chat_and_stream(client, engine):
    from hyprstream_tui.engine.params import SamplingParams

    assert client.models() == ["tiny", "tiny:qa"]
    done = client.generate(model="tiny", prompt=LONG_PROMPT, temperature=0, max_tokens=12)
    alone = engine.generate("tiny", LONG_PROMPT, SamplingParams(temperature=0, max_tokens=12)).result()
    assert done.text == alone.text and str(done) == alone.text
    assert done.finish_reason == "length" and done.completion_tokens == 12
    assert "".join(client.stream(model="tiny", prompt=LONG_PROMPT, temperature=0, max_tokens=12)) == done.text
    chat = client.chat(model="tiny:qa", messages=CHAT, temperature=0, max_tokens=10)
    assert "".join(client.stream(model="tiny:qa", messages=CHAT, temperature=0, max_tokens=10)) == chat.text
    seeded = [client.generate(model="tiny", prompt="Hi", temperature=1, seed=5, top_p=0.9, max_tokens=20).text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    stopped = client.generate(model="tiny", prompt=LONG_PROMPT, temperature=0, max_tokens=12,
                              stop=[done.text[4:6]])
    assert stopped.finish_reason == "stop" and stopped.text == done.text[: done.text.index(done.text[4:6])]


def test_base_url_may_end_in_v1(live):
    with Client(live.v1 + "/") as c:
        assert c.models()[0] == "tiny"
        assert c.health()["status"] == "ok"


def test_errors_are_hypr_errors_with_the_server_message(client):
    with pytest.raises(NotFound, match="nope"):
        client.generate(model="nope", prompt="hi")
    with pytest.raises(InvalidInput, match="maximum context length"):
        client.chat(model="tiny", messages=CHAT, max_tokens=10_000)
    with pytest.raises(InvalidInput, match="temperature"):
        list(client.stream(model="tiny", prompt="hi", temperature=-1))
    with pytest.raises(InvalidInput, match="empty"):
        client.chat(model="tiny", messages=[])
    with pytest.raises(InvalidInput):
        client.stream(model="tiny").__next__()


def test_unreachable_server_and_bad_key(engine):
    with Client(f"http://127.0.0.1:{free_port()}") as c:
        with pytest.raises(ServerUnavailable, match="Cannot reach"):
            c.models()
        with pytest.raises(ServerUnavailable):
            list(c.stream(model="tiny", prompt="hi"))
    with live_server(make_app(engine, api_key="k3y")) as live:
        with pytest.raises(InvalidInput, match="API key"):
            Client(live.url).models()
        assert Client(live.url, api_key="k3y").models()[0] == "tiny"


def test_busy_server_and_closing_a_stream_cancels(engine):
    with live_server(make_app(engine, max_batch=1, max_queue=0)) as live, Client(live.url) as c:
        stream = c.stream(model="tiny", prompt=LONG_PROMPT, temperature=1.0, seed=1, max_tokens=400)
        next(stream)
        with pytest.raises(ServerBusy) as info:
            c.generate(model="tiny", prompt="hi", max_tokens=2)
        assert info.value.retry_after == 1
        stream.close()  # hangs up: the server cancels the generation
        wait_for(lambda: live.batcher.in_flight == 0, what="the cancelled row to leave")
        assert c.generate(model="tiny", prompt="hi", max_tokens=2, temperature=0).completion_tokens >= 0


def _serve(home, *args, env=None):
    full_env = {**os.environ, "HYPRSTREAM_HOME": str(home), **(env or {})}
    full_env.pop("HYPRSTREAM_API_KEY", None) if env is None else None
    return subprocess.Popen([sys.executable, "-m", "hyprstream_tui", "serve", *args], cwd=REPO_ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_serve_end_to_end(served_store):
    port = free_port()
    proc = _serve(served_store.paths.home, "--port", str(port), "--max-batch", "2", "--threads", "1",
                  "--dtype", "float32", env={"HYPRSTREAM_API_KEY": "envkey"})
    try:
        with Client(f"http://127.0.0.1:{port}", api_key="envkey", timeout=180) as c:
            deadline = time.monotonic() + 180
            while True:
                try:
                    c.health()
                    break
                except ServerUnavailable:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                    time.sleep(0.2)
            assert c.models() == ["tiny", "tiny:qa"]
            assert c.chat(model="tiny:qa", messages=CHAT, max_tokens=5, temperature=0).completion_tokens <= 5
            with pytest.raises(InvalidInput, match="API key"):
                Client(f"http://127.0.0.1:{port}").models()
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_serve_refuses_a_public_address_without_a_key(served_store):
    proc = _serve(served_store.paths.home, "--host", "0.0.0.0", "--port", str(free_port()))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.startswith("error: Refusing to listen on 0.0.0.0 without an API key")
    assert "Traceback" not in err


def test_int8_server_batches_and_refuses_adapters(served_store):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions

    engine = Engine(store=served_store, options=LoadOptions(quantize="int8"), threads=1)
    with live_server(make_app(engine, max_batch=4)) as live, Client(live.url) as c:
        texts = [c.generate(model="tiny", prompt=LONG_PROMPT, temperature=0, max_tokens=8).text
                 for _ in range(2)]
        assert texts[0] == texts[1]
        with pytest.raises(InvalidInput, match="quantize"):
            c.chat(model="tiny:qa", messages=CHAT, max_tokens=4)
