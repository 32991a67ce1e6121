"""Continuous batching on the tiny models: a request's answer is the same batched or alone, rows
join and leave step by step, cancelled rows leave within one step, the queue is bounded."""

from __future__ import annotations

import threading

import pytest

from hyprstream_tui.engine.batching import Batcher, Overloaded, RowJoined, RowLeft
from hyprstream_tui.engine.events import GenerationDone, TokenDelta
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.tiny import ARCHS, build_tiny_model
from tests.server.live import LONG_PROMPT, wait_for

PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog while the cat sleeps",
    "Hi",
    "Tell me a long story about the sea and the ships",
    "ça va? 😀 日本語",
]
GREEDY = SamplingParams(temperature=0, max_tokens=48)


@pytest.fixture(scope="module")
def engine_f32():
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions

    return Engine(options=LoadOptions(dtype="float32"), threads=1, max_models=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-models")
    return {arch: str(build_tiny_model(root / arch, arch=arch, seed=3)) for arch in ARCHS}


def _staggered(batcher, model, requests, *, after_tokens=3):
    """Submit each request once the previous one has produced `after_tokens` tokens."""
    jobs, seen = [], {}
    for prompt, params in requests:
        progress = threading.Event()

        def watch(event, progress=progress):
            if isinstance(event, TokenDelta) and event.tokens >= after_tokens or isinstance(event, GenerationDone):
                progress.set()

        jobs.append(batcher.submit(model, prompt=prompt, params=params, on_event=watch))
        progress.wait(30)
    return [job.result(60) for job in jobs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batched_equals_alone_with_rows_joining_at_different_steps(engine_f32, models, arch):
    model = models[arch]
    alone = [engine_f32.generate(model, p, GREEDY).result().text for p in PROMPTS]
    events = []
    batcher = Batcher(engine_f32, max_batch=8, max_queue=8, allow_paths=True, on_event=events.append)
    try:
        batched = _staggered(batcher, model, [(p, GREEDY) for p in PROMPTS])
    finally:
        batcher.close()
    assert [d.text for d in batched] == alone
    joined = [e for e in events if isinstance(e, RowJoined)]
    assert len({e.step for e in joined}) > 1  # they joined at different decode steps...
    assert max(e.rows for e in joined) >= 3  # ...into a batch shared by several rows
    lengths = {e.prompt_tokens for e in joined}
    assert len(lengths) > 2  # of different lengths (left padding exercised)


def test_sampled_rows_keep_their_own_seeded_generator(engine_f32, models):
    model = models["qwen2"]
    requests = [(p, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=i, max_tokens=40,
                                   repetition_penalty=1.1))
                for i, p in enumerate(PROMPTS)]
    alone = [engine_f32.generate(model, p, params).result().text for p, params in requests]
    batcher = Batcher(engine_f32, max_batch=8, max_queue=8, allow_paths=True)
    try:
        batched = _staggered(batcher, model, requests, after_tokens=1)
    finally:
        batcher.close()
    assert [d.text for d in batched] == alone


def test_stop_strings_and_finish_reasons_match_alone(engine_f32, models):
    model = models["llama"]
    full = engine_f32.generate(model, PROMPTS[0], GREEDY).result().text
    stop = full[12:15]
    params = SamplingParams(temperature=0, max_tokens=48, stop=(stop,))
    alone = engine_f32.generate(model, PROMPTS[0], params).result()
    batcher = Batcher(engine_f32, max_batch=4, allow_paths=True)
    try:
        done = _staggered(batcher, model, [(PROMPTS[1], GREEDY), (PROMPTS[0], params)])
    finally:
        batcher.close()
    assert done[1].text == alone.text == full[: full.index(stop)]
    assert done[1].finish_reason == alone.finish_reason == "stop" and done[1].stop == stop


def test_base_and_adapter_rows_interleave_on_one_model(engine, served_store):
    """Two schedulers (base, adapter) share one loaded model, switching the adapter per step."""
    prompts = PROMPTS[:3]
    base_alone = [engine.generate("tiny", p, GREEDY).result().text for p in prompts]
    qa_alone = [engine.generate("tiny:qa", p, GREEDY).result().text for p in prompts]
    batcher = Batcher(engine, max_batch=4)
    try:
        jobs = [batcher.submit(spec, prompt=p, params=GREEDY)
                for p in prompts for spec in ("tiny", "tiny:qa")]
        texts = [job.result(60).text for job in jobs]
    finally:
        batcher.close()
    assert texts[0::2] == base_alone and texts[1::2] == qa_alone
    assert base_alone != qa_alone


def test_finished_rows_leave_without_waiting_for_the_slowest(engine_f32, models):
    model = models["qwen2"]
    events = []
    batcher = Batcher(engine_f32, max_batch=4, allow_paths=True, on_event=events.append)
    try:
        long = batcher.submit(model, prompt=LONG_PROMPT,
                              params=SamplingParams(temperature=1.0, seed=1, max_tokens=300))
        short = batcher.submit(model, prompt="Hello", params=SamplingParams(temperature=0, max_tokens=5))
        assert short.result(30).completion_tokens <= 5
        short_left = next(e for e in events if isinstance(e, RowLeft) and e.request_id == short.request_id)
        done_long = long.result(60)
    finally:
        batcher.close()
    long_left = next(e for e in events if isinstance(e, RowLeft) and e.request_id == long.request_id)
    assert done_long.completion_tokens > 100
    assert short_left.step < long_left.step - 50


def test_cancel_leaves_the_batch_within_one_step(engine_f32, models):
    model = models["qwen2"]
    events = []
    batcher = Batcher(engine_f32, max_batch=4, allow_paths=True, on_event=events.append)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=400)
    try:
        other = batcher.submit(model, prompt=LONG_PROMPT, params=params)
        asked: list[int] = []  # the token count at the cancel (a token with no text has no delta)
        job = batcher.submit(model, prompt=LONG_PROMPT, params=params,
                             on_event=lambda e: isinstance(e, TokenDelta) and e.tokens >= 20 and not asked
                             and (asked.append(e.tokens) or job.cancel()))
        done = job.result(30)
        other.cancel()
        other.result(30)
    finally:
        batcher.close()
    left = next(e for e in events if isinstance(e, RowLeft) and e.request_id == job.request_id)
    assert done.finish_reason == "cancelled" and left.reason == "cancelled"
    assert left.cancel_step is not None and left.step - left.cancel_step <= 1
    assert done.completion_tokens <= asked[0] + 1


def test_queue_is_bounded_and_waiting_requests_can_be_cancelled(engine_f32, models):
    model = models["qwen2"]
    batcher = Batcher(engine_f32, max_batch=1, max_queue=1, allow_paths=True)
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=400)
    try:
        running = batcher.submit(model, prompt=LONG_PROMPT, params=params)
        queued = batcher.submit(model, prompt=LONG_PROMPT, params=params)
        with pytest.raises(Overloaded):
            batcher.submit(model, prompt=LONG_PROMPT, params=params)
        queued.cancel()
        running.cancel()
        assert queued.result(30).finish_reason == "cancelled"
        assert queued.result().completion_tokens == 0
        assert running.result(30).finish_reason == "cancelled"
        wait_for(lambda: batcher.in_flight == 0, what="slots released")
        assert batcher.submit(model, prompt="Hi", params=GREEDY).result(30).text is not None
    finally:
        batcher.close()


def test_paths_are_refused_unless_allowed(engine_f32, models):
    from hyprstream_tui.errors import InvalidInput

    batcher = Batcher(engine_f32)
    with pytest.raises(InvalidInput, match="local store only"):
        batcher.submit(models["qwen2"], prompt="Hi", params=GREEDY)
    with pytest.raises(InvalidInput, match="local store only"):
        batcher.submit("tiny:./adapter", prompt="Hi", params=GREEDY)
    assert batcher.in_flight == 0


def test_batch_cache_pads_left_and_trims_when_the_longest_row_leaves():
    import torch
    from transformers import DynamicCache

    from hyprstream_tui.engine.tuned.batch_cache import BatchCache, batchable

    def one_row(length: int, value: float):
        cache = DynamicCache()
        for layer in range(2):
            kv = torch.full((1, 2, length, 4), value)
            cache.update(kv, kv.clone(), layer)
        return cache

    kv = BatchCache()
    kv.add(one_row(3, 1.0), 3)
    kv.add(one_row(7, 2.0), 7)
    kv.add(one_row(5, 3.0), 5)
    assert batchable(kv.cache) and kv.rows == 3 and kv.length == 7
    assert kv.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7, [0, 0, 1, 1, 1, 1, 1]]
    keys = kv.cache.layers[1].keys  # [3, 2, 7, 4]
    assert keys[0, :, :4].abs().sum() == 0 and (keys[0, :, 4:] == 1).all()
    assert (keys[2, :, 2:] == 3).all()
    assert kv.step_mask().shape == (3, 8)
    for layer in range(2):  # what the step's forward does: one new key/value per row
        new = torch.full((3, 2, 1, 4), 9.0)
        kv.cache.update(new, new.clone(), layer)
    kv.keep([0, 2])  # the 7-token row leaves: two columns were padding for both others
    assert kv.mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert kv.cache.layers[0].keys.shape == (2, 2, 6, 4)
    assert (kv.cache.layers[0].values[1, :, :5] == 3).all()
    assert (kv.cache.layers[0].values[:, :, 5] == 9).all()
    kv.keep([])
    assert kv.rows == 0 and kv.cache is None


def test_a_failing_step_fails_its_rows_and_the_batch_goes_on(engine_f32, models, monkeypatch):
    from hyprstream_tui.engine.tuned import batch_cache
    from hyprstream_tui.engine.events import GenerationError

    model = models["qwen2"]
    events = []
    batcher = Batcher(engine_f32, max_batch=4, allow_paths=True, on_event=events.append)
    original = batch_cache.BatchCache.step_mask

    def broken(self):
        raise RuntimeError("simulated kernel failure")

    try:
        monkeypatch.setattr(batch_cache.BatchCache, "step_mask", broken)
        job = batcher.submit(model, prompt=LONG_PROMPT, params=GREEDY)
        assert job.wait(30)
        with pytest.raises(RuntimeError, match="simulated"):
            job.result()
        error = next(e for e in events if isinstance(e, GenerationError))
        assert error.kind == "bug" and "simulated" in error.message
        monkeypatch.setattr(batch_cache.BatchCache, "step_mask", original)
        alone = engine_f32.generate(model, LONG_PROMPT, GREEDY).result().text
        assert batcher.submit(model, prompt=LONG_PROMPT, params=GREEDY).result(30).text == alone
        assert batcher.in_flight == 0
    finally:
        batcher.close()
