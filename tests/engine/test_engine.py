"""The Engine facade: events, cancel, context budget, errors, concurrency, store names."""

from __future__ import annotations

import threading

import pytest

from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.events import (
    ContextTrimmed,
    GenerationDone,
    GenerationError,
    ModelLoaded,
    TokenDelta,
)
from hyprstream_tui.engine.loader import LoadOptions
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.errors import InvalidInput, NotFound, UnsafeContent

GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def engine():
    engine = Engine(options=LoadOptions(dtype="float32"), max_models=2)
    yield engine
    engine.close()


def _collect(job_factory):
    events: list = []
    job = job_factory(events.append)
    job.wait(60)
    return job, events


def test_events_of_a_generation(engine, tiny_qwen2):
    engine.unload()
    job, events = _collect(lambda cb: engine.generate(str(tiny_qwen2), "Hello there", GREEDY, on_event=cb))
    done = job.result()
    assert isinstance(events[0], ModelLoaded) and isinstance(events[-1], GenerationDone)
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert "".join(d.text for d in deltas) == done.text
    assert {e.request_id for e in events} == {job.request_id}
    assert done.provenance.model == tiny_qwen2.name and done.provenance.adapter is None
    assert done.provenance.params["temperature"] == 0 and done.provenance.dtype == "float32"
    assert done.timings.prompt_tokens > 0 and 0 < done.timings.completion_tokens <= 16
    assert done.finish_reason in ("eos", "length")
    assert done.as_dict()["timings"]["decode_tok_s"] >= 0


def test_cancel_ends_within_one_step(engine, tiny_qwen2):
    seen: list = []
    holder: dict = {}

    def on_event(event):
        seen.append(event)
        if isinstance(event, TokenDelta) and event.tokens >= 3:
            holder["tokens_at_cancel"] = event.tokens
            holder["job"].cancel()

    ready = threading.Event()  # the callback waits until `holder` knows the job

    def gated(event):
        ready.wait()
        on_event(event)

    params = SamplingParams(temperature=1.0, seed=0, max_tokens=200)
    holder["job"] = engine.generate(str(tiny_qwen2), "Tell me a story", params, on_event=gated)
    ready.set()
    job = holder["job"]
    done = job.result(60)
    assert done.finish_reason == "cancelled"
    assert done.completion_tokens <= holder["tokens_at_cancel"] + 1


def test_same_seed_same_text_and_seed_reported(engine, tiny_qwen2):
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=20, seed=42)
    a = engine.generate(str(tiny_qwen2), "Once upon", params).result(60)
    b = engine.generate(str(tiny_qwen2), "Once upon", params).result(60)
    assert a.text == b.text and a.provenance.seed == 42
    c = engine.generate(str(tiny_qwen2), "Once upon", SamplingParams(max_tokens=5)).result(60)
    assert isinstance(c.provenance.seed, int)  # a random seed, reported so it can be replayed


def test_chat_budget_drops_oldest_turns_and_says_so(engine, tiny_qwen2):
    long = "The quick brown fox jumps over the lazy dog. " * 12  # ~120 tokens a message
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "And now?"})
    params = SamplingParams(temperature=0, max_tokens=100)
    job, events = _collect(lambda cb: engine.chat(str(tiny_qwen2), messages, params, on_event=cb))
    done = job.result()
    trimmed = [e for e in events if isinstance(e, ContextTrimmed)]
    assert len(trimmed) == 1 and trimmed[0].dropped_messages == done.dropped_messages > 0
    assert done.dropped_messages % 2 == 0  # whole user/assistant exchanges
    assert done.prompt_tokens + params.max_tokens <= 512 == trimmed[0].window
    assert trimmed[0].dropped_tokens > 0


def test_chat_last_message_too_long_is_invalid_input(engine, tiny_qwen2):
    messages = [{"role": "user", "content": "word " * 600}]
    job, events = _collect(lambda cb: engine.chat(str(tiny_qwen2), messages, GREEDY, on_event=cb))
    assert isinstance(events[-1], GenerationError) and events[-1].kind == "InvalidInput"
    assert "\n" not in events[-1].message
    with pytest.raises(InvalidInput, match="last message"):
        job.result()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda e, m: e.generate(str(m), "", GREEDY), InvalidInput),
        (lambda e, m: e.generate(str(m), "hi \udc00", GREEDY), InvalidInput),
        (lambda e, m: e.chat(str(m), [{"role": "assistant", "content": "x"}], GREEDY), InvalidInput),
        (lambda e, m: e.generate("", "hi", GREEDY), InvalidInput),
    ],
)
def test_bad_requests_raise_at_once(engine, tiny_qwen2, call, error):
    with pytest.raises(error) as info:
        call(engine, tiny_qwen2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, prompt, params, error",
    [
        ("{m}", "hi", SamplingParams(max_tokens=512), InvalidInput),
        ("{m}", "word " * 600, GREEDY, InvalidInput),
        ("{m}/missing", "hi", GREEDY, NotFound),
        ("{m}:/no/such/adapter", "hi", GREEDY, NotFound),
    ],
)
def test_bad_requests_report_an_error_event(engine, tiny_qwen2, spec, prompt, params, error):
    job, events = _collect(
        lambda cb: engine.generate(spec.format(m=tiny_qwen2), prompt, params, on_event=cb)
    )
    assert isinstance(events[-1], GenerationError) and events[-1].kind == error.__name__
    with pytest.raises(error):
        job.result()


def test_pickle_weights_are_refused(engine, tmp_path, tiny_qwen2):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_qwen2, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeContent, match="pickle"):
        engine.generate(str(folder), "hi", GREEDY).result(60)


def test_concurrent_generations_equal_sequential(engine, tiny_models):
    specs = [str(tiny_models["qwen2"]), str(tiny_models["llama"])]
    prompts = ["Hello there", "The weather today", "Once upon a time", "Git stores"]
    params = [SamplingParams(temperature=0.9, seed=s, max_tokens=24) for s in range(4)]
    cases = [(specs[i % 2], prompts[i], params[i]) for i in range(4)] * 2
    sequential = [engine.generate(*case).result(60).text for case in cases]
    jobs = [engine.generate(*case) for case in cases]
    assert [job.result(60).text for job in jobs] == sequential


def test_lru_keeps_at_most_max_models(tiny_models):
    engine = Engine(options=LoadOptions(dtype="float32"), max_models=2)
    for arch in ("qwen2", "llama", "gemma"):
        engine.generate(str(tiny_models[arch]), "hi", GREEDY).result(60)
    assert [m.source.name for m in engine.loaded()] == ["llama", "gemma"]
    engine.close()
    assert engine.loaded() == []


def test_stream_iterator(engine, tiny_qwen2):
    events = list(engine.stream(str(tiny_qwen2), prompt="Hello", params=GREEDY))
    assert isinstance(events[-1], GenerationDone)
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == events[-1].text


def test_store_names_adapters_and_revisions(tmp_path, tiny_qwen2, tiny_adapters):
    pytest.importorskip("pygit2")
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths(home=tmp_path / "home"))
    store.import_model(tiny_qwen2, name="tiny")
    store.create_adapter("tiny", "poet", rank=4, target_modules=["q_proj", "v_proj"])
    adapter_files = {
        f"adapter/{name}": (tiny_adapters["qwen2"] / name).read_bytes()
        for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    first = store.write_files("tiny", "poet", adapter_files, "Random LoRA weights")
    store.tag("tiny", "poet", "v1")
    engine = Engine(store=store, options=LoadOptions(dtype="float32"))
    try:
        base = engine.generate("tiny", "Hello there", GREEDY).result(60)
        tuned = engine.generate("tiny:poet", "Hello there", GREEDY).result(60)
        tagged = engine.generate("tiny:poet@v1", "Hello there", GREEDY).result(60)
        folder = engine.generate(f"{tiny_qwen2}:{tiny_adapters['qwen2']}", "Hello there", GREEDY)
        assert tuned.text == tagged.text == folder.result(60).text != base.text
        assert base.provenance.model_commit == store.head("tiny")
        assert tuned.provenance.adapter == "poet" and tuned.provenance.adapter_commit == first.sha
        assert len(engine.loaded()) == 2  # the store model once (adapters switch), the folder once
        with pytest.raises(NotFound):
            engine.generate("tiny:nobody", "hi", GREEDY).result(60)
        with pytest.raises(NotFound):
            engine.generate("nothing", "hi", GREEDY).result(60)
    finally:
        engine.close()


def test_a_failing_callback_ends_the_job_with_its_error(engine, tiny_qwen2):
    def explode(event):
        raise RuntimeError("callback broke")

    job = engine.generate(str(tiny_qwen2), "Hello", GREEDY, on_event=explode)
    assert job.wait(60)
    with pytest.raises(RuntimeError, match="callback broke"):
        job.result()


def test_template_errors_are_invalid_input(tiny_qwen2):
    from transformers import AutoTokenizer

    from hyprstream_tui.engine.chat import fit_conversation

    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    tok.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(InvalidInput, match="System role not supported"):
        fit_conversation(tok, [{"role": "user", "content": "hi"}], budget=100)


def test_requests_run_on_kept_threads_and_a_set_thread_count_does_not_leak(tiny_qwen2):
    """Engine.workers: a request after another runs on the same thread (OpenMP's team of threads
    is per calling thread: a new thread a request paid for a new team), and a thread count one
    request set is the default again for the next request that sets none."""
    import torch

    from hyprstream_tui.engine.cpu import usable_cores

    engine = Engine(options=LoadOptions(dtype="float32"))
    seen: list[tuple[int, int]] = []

    def run(threads):
        params = SamplingParams(temperature=0, max_tokens=2)
        from hyprstream_tui.engine.engine import Request
        from hyprstream_tui.engine.jobs import new_request_id
        from hyprstream_tui.engine.sources import parse_spec

        request = Request(spec=parse_spec(str(tiny_qwen2)), params=params, prompt="Hello", request_id=new_request_id(),
                          threads=threads)
        engine.submit(request, lambda e: seen.append((threading.get_ident(), torch.get_num_threads()))).result(60)

    run(None)
    run(1)
    run(None)
    idents = {ident for ident, _ in seen}
    assert len(idents) == 1  # one kept thread served all three
    counts = [n for _, n in seen]
    assert 1 in counts and counts[-1] == max(1, usable_cores())
    engine.close()


def test_workers_run_side_by_side_when_busy_and_raise_in_the_caller():
    from hyprstream_tui.engine.jobs import Workers

    workers = Workers("test-workers")
    gate, both = threading.Event(), threading.Barrier(2, timeout=10)
    names: list[str] = []

    def busy():
        names.append(threading.current_thread().name)
        both.wait()  # only returns when a second thread runs beside this one
        gate.wait(10)

    workers.start(busy)
    workers.start(busy)
    gate.set()
    assert workers.call(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="bad"):
        workers.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert names == ["test-workers", "test-workers"]
