"""Promise 5 of the reliability suite: the server holds under load and abuse.

A real uvicorn server on 127.0.0.1 (in a thread of this process, so the test can hear the engine's
own batch events) serves the tiny model with a bounded queue (max_batch 8, max_queue 16). 32
concurrent clients (asyncio + httpx, real sockets) loop for HYPRSTREAM_LOAD_SECONDS (default 60;
300 with HYPRSTREAM_LONG_TESTS=1): streaming completions and chats, some hang up mid-stream, some
send garbage (broken JSON, wrong types, unknown fields and models, raw bytes that are not HTTP).

Asserted:
- no 5xx except 503, and every 503 carries Retry-After and says the batch and queue were full
  (the server's own count of requests in flight was at max_batch + max_queue);
- every request that was not refused is answered (a stream ends with [DONE]);
- every hang-up cancels its generation: the engine's `RowLeft` event for that request says
  `cancelled`, at most one decode step after the cancel;
- memory is flat after warm-up: RSS at the end is within RSS_SLACK_MB of RSS at 25% of the run;
- afterwards nothing is in flight, and /health and a normal request (the openai client) answer.

The figures (requests served, 503s, hang-ups, garbage, p50/p99 time to first token, RSS) are
printed; run with `-s` to see them. The long run: `HYPRSTREAM_LONG_TESTS=1 python -m pytest -q -s
tests/reliability/test_server_load.py` (or `python benchmarks/soak.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from tests.server.live import LONG_PROMPT, free_port

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
LOAD_SECONDS = float(os.environ.get("HYPRSTREAM_LOAD_SECONDS") or (300 if LONG else 60))
CLIENTS = 32
MAX_BATCH = 8
MAX_QUEUE = 16
RSS_SLACK_MB = 50.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


@dataclass
class Tally:
    kinds: Counter = field(default_factory=Counter)       # what the clients did
    statuses: Counter = field(default_factory=Counter)    # HTTP status of every request
    problems: list = field(default_factory=list)          # what must not happen
    hung_up: list = field(default_factory=list)           # request ids of streams left mid-way
    ttft: list = field(default_factory=list)              # seconds to the first text chunk
    served: int = 0                                       # generations answered to the end
    rss: list = field(default_factory=list)               # (seconds since start, MB)
    max_in_flight: int = 0
    last_503: dict = field(default_factory=dict)          # client index -> when it was refused

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """uvicorn in a thread on a free loopback port (no event recording: a load run would keep
    every token event in memory)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn-load", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _check_503(tally: Tally, response, body: bytes) -> None:
    if "retry-after" not in response.headers:
        tally.problem(f"503 without Retry-After: {body[:120]!r}")
    try:
        error = json.loads(body)["error"]
        match = re.search(r"\((\d+) requests running or queued\)", error["message"])
        if error.get("code") != "overloaded" or not match or int(match.group(1)) < MAX_BATCH + MAX_QUEUE:
            tally.problem(f"503 before the queue was full: {error}")
    except (ValueError, KeyError, TypeError):
        tally.problem(f"503 not in OpenAI's error shape: {body[:120]!r}")


def _request(rng: random.Random, chat: bool, *, max_tokens: int) -> tuple[str, dict]:
    common = {"model": "tiny", "max_tokens": max_tokens, "temperature": 1.0,
              "seed": rng.randrange(1 << 30), "stream": True}
    if chat:
        words = " ".join(rng.choice(["tell", "me", "a", "story", "about", "the", "sea"]) for _ in range(6))
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}]}
    return "/v1/completions", {**common, "prompt": LONG_PROMPT}


async def stream_one(client, tally: Tally, rng: random.Random, *, hang_up: bool, index: int = 0) -> None:
    """One streaming request; with `hang_up`, leave after a few chunks (closing the connection)."""
    chat = rng.random() < 0.5
    path, body = _request(rng, chat, max_tokens=400 if hang_up else rng.choice([8, 16, 32]))
    kind = f"{'chat' if chat else 'completion'}{' hang-up' if hang_up else ''}"
    started = time.perf_counter()
    async with client.stream("POST", path, json=body) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            data = await response.aread()
            if response.status_code == 503:
                _check_503(tally, response, data)
                tally.kinds["refused (503)"] += 1
                tally.last_503[index] = time.monotonic()
            else:
                tally.problem(f"{kind}: status {response.status_code}: {data[:160]!r}")
            return
        tally.kinds[kind] += 1
        chunks, first_text, done = 0, None, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                tally.problem(f"{kind}: error in the stream: {event['error']}")
                continue
            choice = event["choices"][0] if event.get("choices") else {}
            text = choice.get("text") if not chat else (choice.get("delta") or {}).get("content")
            if text and first_text is None:
                first_text = time.perf_counter() - started
                tally.ttft.append(first_text)
            chunks += 1
            if hang_up and chunks >= 4:
                tally.hung_up.append(event["id"].split("-", 1)[1])
                return  # leaving the block closes the half-read response: the connection goes
        if not done:
            tally.problem(f"{kind}: the stream ended without [DONE]")
        else:
            tally.served += 1


GARBAGE_BODIES = [
    b"{", b"", b"null", b"[]", b'{"model": "tiny"}', b'{"model": 7, "prompt": "x"}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', b'{"model": "tiny", "prompt": "x", "temperature": "hot"}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999}', b'{"model": "nope", "prompt": "x"}',
    b'{"model": "../../etc/passwd", "prompt": "x"}', b'{"model": "tiny", "prompt": "x", "bogus": 1}',
    b'{"model": "tiny", "messages": []}', b'{"model": "tiny", "messages": [{"role": "wizard", "content": 1}]}',
    b'{"model": "tiny", "prompt": "x", "top_k": false}', b'{"model": "tiny", "prompt": ["a", "b"]}',
    b"\xff\xfe\x00garbage", b'{"model": "tiny", "prompt": "' + b"x" * 5000 + b'"}',
]


async def garbage_one(client, base: str, tally: Tally, rng: random.Random) -> None:
    """A malformed request: refused with a 4xx in OpenAI's shape, never a 5xx."""
    if rng.random() < 0.15:  # not even HTTP
        host, port = base.removeprefix("http://").split(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(rng.choice([b"GARBAGE\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{",
                                     bytes(rng.randrange(256) for _ in range(64))]))
            await writer.drain()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        except OSError as exc:
            tally.problem(f"raw garbage: could not connect: {exc}")
        tally.kinds["garbage (raw bytes)"] += 1
        return
    path = rng.choice(["/v1/completions", "/v1/chat/completions"])
    body = rng.choice(GARBAGE_BODIES)
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    tally.statuses[response.status_code] += 1
    tally.kinds["garbage (bad request)"] += 1
    if response.status_code == 503:
        _check_503(tally, response, response.content)
    elif response.status_code == 200:
        tally.served += 1  # some are fine after all (a long prompt, say)
    elif not 400 <= response.status_code < 500:
        tally.problem(f"garbage {body[:60]!r}: status {response.status_code}: {response.text[:160]!r}")
    else:
        try:
            assert response.json()["error"]["message"]
        except Exception:
            tally.problem(f"garbage {body[:60]!r}: not OpenAI's error shape: {response.text[:160]!r}")


async def client_loop(base: str, tally: Tally, index: int, deadline: float) -> None:
    import httpx

    rng = random.Random(index)
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                if roll < 0.2:
                    await stream_one(client, tally, rng, hang_up=True, index=index)
                elif roll < 0.3:
                    await garbage_one(client, base, tally, rng)
                else:
                    await stream_one(client, tally, rng, hang_up=False, index=index)
            except (httpx.HTTPError, OSError) as exc:
                tally.problem(f"client {index}: {type(exc).__name__}: {exc}")
            if refused_at := tally.last_503.get(index):  # a polite client: Retry-After, with jitter
                tally.last_503.pop(index)
                await asyncio.sleep(max(0.0, refused_at + rng.uniform(0.5, 1.5) - time.monotonic()))


async def monitor(batcher, tally: Tally, started: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        tally.rss.append((time.monotonic() - started, rss_mb()))
        tally.max_in_flight = max(tally.max_in_flight, batcher.in_flight)
        await asyncio.sleep(0.25)


async def run_load(base: str, batcher, seconds: float) -> Tally:
    tally = Tally()
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(monitor(batcher, tally, started, deadline),
                         *(client_loop(base, tally, i, deadline) for i in range(CLIENTS)))
    tally.rss.append((time.monotonic() - started, rss_mb()))
    return tally


def rss_at(tally: Tally, fraction: float, seconds: float) -> float:
    return min(tally.rss, key=lambda s: abs(s[0] - fraction * seconds))[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@pytest.fixture(scope="module")
def load_engine(tmp_path_factory, tiny_model_src):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(tmp_path_factory.mktemp("load") / "home"))
    store.import_model(tiny_model_src, name="tiny")
    engine = Engine(store=store, options=LoadOptions(dtype="float32"), threads=1)
    yield engine
    engine.close()


@pytest.mark.slow
def test_the_server_holds_under_load_and_abuse(load_engine):
    import httpx
    import openai

    from hyprstream_tui.engine.batching import Batcher, RowLeft
    from hyprstream_tui.server.app import create_app

    left: dict[str, RowLeft] = {}

    def on_batch_event(event) -> None:  # the scheduler thread; keeps only how rows left
        if isinstance(event, RowLeft):
            left[event.request_id] = event

    batcher = Batcher(load_engine, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    batcher.add_listener(on_batch_event)
    app = create_app(batcher)
    with serve(app) as base:
        # warm up: the model loads, the first batches allocate their caches
        with httpx.Client(base_url=base, timeout=120) as client:
            for _ in range(3):
                r = client.post("/v1/completions", json={"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 32})
                assert r.status_code == 200, r.text
        wall = time.monotonic()
        tally = asyncio.run(run_load(base, batcher, LOAD_SECONDS))
        wall = time.monotonic() - wall

        deadline = time.monotonic() + 60
        while batcher.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        in_flight_after = batcher.in_flight
        # still answers: /health, and a normal request through the openai client
        with httpx.Client(base_url=base, timeout=60) as client:
            health = client.get("/health")
        with openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as oa:
            answer = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, seed=1)

    # every hang-up cancelled its generation within one decode step, unless the generation had
    # already ended on its own (an end-of-text token among its first chunks) before the hang-up
    # reached the batch: then there was nothing left to cancel
    not_cancelled, ended_anyway = [], 0
    for request_id in tally.hung_up:
        event = left.get(request_id)
        if event is None:
            not_cancelled.append((request_id, "never left the batch"))
        elif event.reason == "cancelled":
            if event.cancel_step is None or event.step - event.cancel_step > 1:
                not_cancelled.append((request_id, event))
        elif event.reason in ("eos", "stop") and (event.cancel_step is None or event.step - event.cancel_step <= 1):
            ended_anyway += 1
        else:
            not_cancelled.append((request_id, event))

    rss_25, rss_end = rss_at(tally, 0.25, wall), tally.rss[-1][1]
    requests = sum(tally.statuses.values())
    fives = {s: n for s, n in tally.statuses.items() if s >= 500 and s != 503}
    print(f"\nload: {wall:.0f} s, {CLIENTS} clients, max_batch {MAX_BATCH}, max_queue {MAX_QUEUE}: "
          f"{requests} HTTP requests, {tally.served} generations served to the end, "
          f"{tally.statuses.get(503, 0)} refused with 503, {len(tally.hung_up)} hang-ups "
          f"({len(tally.hung_up) - len(not_cancelled) - ended_anyway} cancelled within one step, "
          f"{ended_anyway} ended on their own in that step), "
          f"{tally.kinds['garbage (bad request)'] + tally.kinds['garbage (raw bytes)']} garbage, "
          f"other 5xx: {sum(fives.values())}; statuses {dict(sorted(tally.statuses.items()))}")
    print(f"load: TTFT p50 {percentile(tally.ttft, 0.5) * 1000:.0f} ms, p99 {percentile(tally.ttft, 0.99) * 1000:.0f} ms "
          f"over {len(tally.ttft)} streams; max in flight {tally.max_in_flight}; RSS start "
          f"{tally.rss[0][1]:.0f} MB, at 25% {rss_25:.0f} MB, end {rss_end:.0f} MB "
          f"(peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6:.0f} MB)")

    assert not tally.problems, f"{len(tally.problems)} problems:\n" + "\n".join(tally.problems[:30])
    assert not fives, fives
    assert tally.served > CLIENTS, "too few requests served for a load test"
    assert tally.hung_up, "no client hung up"
    assert not not_cancelled, f"{len(not_cancelled)} of {len(tally.hung_up)} hang-ups did not cancel: {not_cancelled[:5]}"
    assert tally.max_in_flight <= MAX_BATCH + MAX_QUEUE
    assert rss_end - rss_25 < RSS_SLACK_MB, f"RSS grew from {rss_25:.0f} MB to {rss_end:.0f} MB after warm-up"
    assert in_flight_after == 0, f"{in_flight_after} requests still in flight after the run"
    assert health.status_code == 200 and health.json()["in_flight"] == 0, health.text
    assert answer.choices[0].message.content is not None and answer.usage.completion_tokens > 0
