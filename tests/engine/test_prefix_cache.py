"""The engine's prefix reuse of KV caches (engine/prefix.py): same tokens and logits as a full
prefill, never across an adapter switch, a new adapter commit, a reloaded model or another
quantize scheme. Real tiny models throughout; the engine's PrefixCache is wrapped by a spy that
records what each request reused (it calls the real one)."""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.generate import decode, new_cache
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.prefix import PrefixCache, common_prefix
from hyprstream_tui.engine.sequence import SequenceState

GREEDY = SamplingParams(temperature=0, max_tokens=12)
SYSTEM = {"role": "system", "content": "You are a helpful assistant who answers briefly and well."}
# Logits after a prefill that continues a kept cache differ from a full prefill only by the
# order of float32 sums (other matrix shapes): measured at most 2e-6 on the tiny model (0 in int8).
ATOL = 1e-4


class Recording(SequenceState):
    """A SequenceState that keeps the logits of every step it picks from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []

    def pick(self, logits: torch.Tensor) -> int:
        self.logits.append(logits.clone())
        return super().pick(logits)


def _run(lm, ids, prefix: PrefixCache | None):
    """Greedy decode of `ids`: (token ids, logits per step, positions reused)."""
    seq = Recording(ids, GREEDY, eos_ids=frozenset(), generator=None)
    taken = prefix.take(lm, ids) if prefix is not None else None
    cache = taken.cache if taken is not None and taken.cache is not None else new_cache(lm.model)
    list(decode(lm.model, seq, cache=cache, tuned=lm.options.tuned))
    if prefix is not None:
        prefix.keep(lm, seq.seen[: seq.n_prompt + len(seq.token_ids)].tolist(), cache)
    return seq.token_ids, seq.logits, taken.reused if taken is not None else 0


def _chat_ids(lm, *turns: str) -> list[int]:
    from hyprstream_tui.engine.chat import render

    messages = [SYSTEM] + [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                           for i, t in enumerate(turns)]
    return render(lm.tokenizer, messages)


@pytest.mark.parametrize(("native", "quantize"), [(True, None), (True, "int8"), (False, None)],
                         ids=["native-cache", "native-int8", "dynamic-cache"])
def test_reused_prefix_gives_the_same_tokens_and_logits(tiny_qwen2, native, quantize, monkeypatch):
    # int8: torch's steps on both sides. With the fused step a reused prompt's last token runs
    # through it (fp32 activations) where a fresh prefill runs torch's kernel (bf16 activations):
    # both right, not equal to 1e-4; tests/engine/test_fused_step.py checks that path.
    from hyprstream_tui.engine.tuned import step

    monkeypatch.setattr(step, "_state", {"off": True})
    options = LoadOptions(dtype="float32", native=native, quantize=quantize)
    lm = load_model(ModelSource(name="tiny", path=tiny_qwen2), options)
    assert bool(getattr(lm.model, "native", False)) == native
    prefix = PrefixCache()
    first = _chat_ids(lm, "What is the capital of France?")
    second = _chat_ids(lm, "What is the capital of Spain, and why?")
    shared = common_prefix(first, second)
    assert 10 < shared < len(second) - 1  # the system prompt and more, not the whole prompt

    _run(lm, first, prefix)
    tokens, logits, reused = _run(lm, second, prefix)
    assert reused == shared
    fresh_tokens, fresh_logits, _ = _run(lm, second, None)
    assert tokens == fresh_tokens
    assert len(logits) == len(fresh_logits)
    for ours, full in zip(logits, fresh_logits):
        assert torch.allclose(ours, full, atol=ATOL, rtol=0), (ours - full).abs().max()

    again, again_logits, reused = _run(lm, second, prefix)  # the same prompt: all but its last token
    assert reused == len(second) - 1
    assert again == fresh_tokens
    assert all(torch.allclose(a, b, atol=ATOL, rtol=0) for a, b in zip(again_logits, fresh_logits))


class Spy:
    """Wraps an engine's PrefixCache: records the positions each request reused."""

    def __init__(self, engine: Engine) -> None:
        self.real, self.reused = engine.prefix, []
        engine.prefix = self  # type: ignore[assignment]

    def take(self, lm, ids):
        taken = self.real.take(lm, ids)
        self.reused.append(taken.reused)
        return taken

    def __getattr__(self, name):
        return getattr(self.real, name)


def _chat(engine: Engine, spec: str, *turns: str) -> str:
    messages = [SYSTEM] + [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                           for i, t in enumerate(turns)]
    return engine.chat(spec, messages, GREEDY).result(60).text


@pytest.fixture
def poet_store(tiny_store, tiny_adapters):
    """The tiny model as `tiny`, with the adapter `poet` committed on it."""
    tiny_store.create_adapter("tiny", "poet", rank=4, target_modules=["q_proj", "v_proj"])
    files = {f"adapter/{name}": (tiny_adapters["qwen2"] / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    tiny_store.write_files("tiny", "poet", files, "Random LoRA weights")
    return tiny_store


def test_two_prompts_sharing_a_prefix_and_a_multi_turn_chat_come_out_right(tiny_store):
    options = LoadOptions(dtype="float32")
    engine, plain = Engine(store=tiny_store, options=options), Engine(store=tiny_store, options=options)
    plain.prefix = PrefixCache(max_entries=0)  # keeps nothing: every prompt prefilled whole
    spy = Spy(engine)
    try:
        conversations = [("What is the capital of France?",), ("Name a river in Spain.",),
                         ("Name a river in Spain.",)]
        for turns in conversations:
            assert _chat(engine, "tiny", *turns) == _chat(plain, "tiny", *turns)
        first_reply = _chat(plain, "tiny", "Name a river in Spain.")
        turns = ("Name a river in Spain.", first_reply, "And one in France?")
        assert _chat(engine, "tiny", *turns) == _chat(plain, "tiny", *turns)
        assert spy.reused[0] == 0 and all(n > 10 for n in spy.reused[1:])
        # the next turn re-sends the first: at least that whole first prompt is reused
        first_prompt = len(_chat_ids(engine.load("tiny"), "Name a river in Spain."))
        assert spy.reused[3] >= first_prompt
        assert len(spy.real) == 1  # one model, one state: the latest cache only
    finally:
        engine.close()
        plain.close()


def test_a_switched_adapter_or_a_new_commit_never_reuses(poet_store, tiny_adapters):
    engine = Engine(store=poet_store, options=LoadOptions(dtype="float32"))
    spy = Spy(engine)
    question = "What is the capital of France?"
    try:
        base = _chat(engine, "tiny", question)
        tuned = _chat(engine, "tiny:poet", question)
        assert tuned != base and spy.reused == [0, 0]  # the base model's cache is not the adapter's
        assert _chat(engine, "tiny:poet", question) == tuned and spy.reused[-1] > 0
        assert _chat(engine, "tiny", question) == base and spy.reused[-1] > 0  # each state its own

        # a new commit on the adapter (training would make one): other weights, no reuse
        weights = tiny_adapters["qwen2"] / "adapter_model.safetensors"
        from safetensors.torch import load_file, save_file

        changed = {k: v * 3 for k, v in load_file(weights).items()}
        tmp = weights.with_name("changed.safetensors")
        save_file(changed, tmp)
        poet_store.write_files("tiny", "poet", {"adapter/adapter_model.safetensors": tmp.read_bytes()},
                               "New weights")
        retrained = _chat(engine, "tiny:poet", question)
        assert spy.reused[-1] == 0
        fresh = Engine(store=poet_store, options=LoadOptions(dtype="float32"))
        try:
            assert retrained == _chat(fresh, "tiny:poet", question)
        finally:
            fresh.close()
    finally:
        engine.close()


def test_a_reloaded_model_or_another_quantize_scheme_never_reuses(tiny_store):
    engine = Engine(store=tiny_store, options=LoadOptions(dtype="float32"))
    spy = Spy(engine)
    question = "What is the capital of France?"
    try:
        _chat(engine, "tiny", question)
        engine.unload()
        assert len(spy.real) == 0  # an unloaded model's caches go with it
        _chat(engine, "tiny", question)
        assert spy.reused == [0, 0]
        _chat(engine, "tiny", question)
        assert spy.reused[-1] > 0
        from hyprstream_tui.engine.engine import Request
        from hyprstream_tui.engine.sources import parse_spec

        request = Request(spec=parse_spec("tiny"), params=GREEDY, request_id="q8",
                          messages=(SYSTEM, {"role": "user", "content": question}),
                          options=LoadOptions(dtype="float32", quantize="int8"))
        engine.submit(request).result(60)
        assert spy.reused[-1] == 0  # the int8 model is another model: nothing of fp32's reused
    finally:
        engine.close()


def test_the_store_is_bounded(tiny_qwen2):
    lm = load_model(ModelSource(name="tiny", path=tiny_qwen2), LoadOptions(dtype="float32"))
    ids = _chat_ids(lm, "Hello there")
    nothing = PrefixCache(max_bytes=1)
    _run(lm, ids, nothing)
    assert len(nothing) == 0  # one cache is larger than the cap: not kept
    two = PrefixCache(max_entries=2)
    other = _chat_ids(lm, "Hello there") + [5]
    for _ in range(3):  # a cache taken and kept again is one entry, not three
        _run(lm, ids, two)
    _run(lm, [7, 8, 9, 10], two)
    _run(lm, [11, 12, 13], two)
    assert len(two) == 2 and two.take(lm, other).reused == 0  # the oldest went first
