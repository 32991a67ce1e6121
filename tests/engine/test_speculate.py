"""Speculative decoding (engine/speculate.py, issue 21's fp32 warm reply): an int8 draft of the
model's own weights guesses tokens, `hs_prefill_every` checks them in one pass, and the reply is
the reply of plain steps, token for token, greedy and seeded alike.

Real tiny models and the real SmolLM2-135M; nothing is mocked. Where a test needs the draft to
guess wrong it wraps the real draft's guesses (the premise is then checked: the wrapped guesses
do miss).
"""

from __future__ import annotations

import json

import pytest
import torch

from hyprstream_tui.engine import speculate
from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.generate import decode, new_cache
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState, seeded
from hyprstream_tui.engine.tuned import quant_cache, step

pytestmark = pytest.mark.skipif(step.library() is None,
                                reason=f"the fused step cannot run on this machine: {step.status()}")


def load(tiny_models, arch, **options):
    return load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(**options))


def stepped(lm, ids):
    """The logits of each token's own fused step, and the cache they leave."""
    cache = new_cache(lm.model)
    run = step.FusedStep.build(lm.model, cache, kinds=step.EVERY)
    out = []
    with torch.inference_mode():
        for pos, token in enumerate(ids.tolist()):
            out.append(run.step(token, pos))
    return torch.stack(out), cache


@pytest.mark.parametrize("arch, options", [
    ("llama", {"dtype": "float32"}), ("qwen2", {"dtype": "float32"}), ("mistral", {"dtype": "float32"}),
    ("llama", {"quantize": "int8"}), ("qwen2", {"quantize": "int4"}),
])
def test_every_row_is_its_tokens_own_step_bit_for_bit(tiny_models, arch, options, monkeypatch):
    monkeypatch.setattr(step, "FIRST_CAPACITY", 16)  # the check grows the cache on the way
    lm = load(tiny_models, arch, **options)
    ids = torch.randint(0, lm.model.config.vocab_size, (75,), generator=torch.Generator().manual_seed(3))
    want, cache_s = stepped(lm, ids)
    cache = new_cache(lm.model)
    run = step.FusedStep.build(lm.model, cache, kinds=step.EVERY)
    with torch.inference_mode():
        first = run.prefill(ids[:5], 0, every=True)
        rest = run.prefill(ids[5:], 5, every=True)  # 70 rows: over one chunk of 64
    assert first.shape == (5, lm.model.config.vocab_size) and rest.shape == (70, lm.model.config.vocab_size)
    assert torch.equal(torch.cat([first, rest]), want)
    assert cache.length == cache_s.length == 75
    for x, y in zip((*cache.keys, *cache.values), (*cache_s.keys, *cache_s.values)):
        assert torch.equal(x[:, :, :75], y[:, :, :75])


def reply(lm, ids, params, seed, draft=None, cache=None):
    """(token ids, finish reason, the cache) of one request on `lm`, with `draft` or without."""
    seq = SequenceState(ids, params, eos_ids=lm.eos_ids, generator=seeded(seed))
    cache = cache if cache is not None else new_cache(lm.model)
    list(decode(lm.model, seq, cache=cache, draft=draft))
    return seq.token_ids, seq.finish_reason, cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_tiny_models_replies_are_the_same_with_a_draft(tiny_models, arch):
    lm = load(tiny_models, arch, dtype="float32")
    draft = load(tiny_models, arch, dtype="float32", quantize="int8").model
    prompt = list(range(3, 40))
    for params, seed in ((SamplingParams(temperature=0, max_tokens=40), 0),
                         (SamplingParams(temperature=0.9, top_k=20, max_tokens=40), 11)):
        plain = reply(lm, prompt, params, seed)
        drafted = reply(lm, prompt, params, seed, draft=draft)
        assert drafted[:2] == plain[:2]
        held = plain[2].length
        assert drafted[2].length == held  # the kept cache holds the taken tokens, no guess past them


def test_wrong_guesses_are_dropped_and_the_cache_continues_alike(tiny_models, monkeypatch):
    """Every other guess made wrong: the sequence leaves it, the rest of the pass goes, and a
    second request continuing the kept cache answers as plain steps do."""
    lm = load(tiny_models, "llama", dtype="float32")
    draft = load(tiny_models, "llama", dtype="float32", quantize="int8").model
    vocab = lm.model.config.vocab_size
    real_guess = speculate.Speculator.guess
    misses = []

    def spoiled(self, upto):
        out = real_guess(self, upto)
        if len(out) >= 2:
            out[1] = (out[1] + 1) % vocab
            misses.append(out[1])
        return out

    monkeypatch.setattr(speculate.Speculator, "guess", spoiled)
    params = SamplingParams(temperature=0, max_tokens=30)
    prompt = list(range(5, 30))
    plain, drafted = reply(lm, prompt, params, 0), reply(lm, prompt, params, 0, draft=draft)
    assert misses  # the premise: wrong guesses were made
    assert drafted[:2] == plain[:2]
    follow = prompt + plain[0] + [7, 8, 9]
    cache = drafted[2]
    cache.length = min(cache.length, len(prompt) + len(plain[0]))
    again = reply(lm, follow, params, 0, draft=draft, cache=cache)
    assert again[:2] == reply(lm, follow, params, 0)[:2]


def test_the_real_models_greedy_and_seeded_replies_are_the_same_and_guesses_are_taken(real_home):
    questions = ["What is the capital of France?", "Write a short poem about the sea.", "Name three colours."]
    replies = {}
    for drafts in (False, True):
        engine = Engine(drafts=drafts, options=LoadOptions(dtype="float32"))
        lm = engine.load("smollm2")
        engine.warm("smollm2", LoadOptions(dtype="float32"), [1, 9690, 198])
        assert (lm.draft is not None) == drafts
        for i, q in enumerate(questions):
            for params in (SamplingParams(temperature=0, max_tokens=48),
                           SamplingParams(temperature=0.8, max_tokens=48, seed=i)):
                done = engine.chat("smollm2", [{"role": "user", "content": q}], params).result(120)
                replies.setdefault((q, params.temperature), []).append((done.text, done.finish_reason))
        if drafts:
            acceptance = speculate._acceptance[lm.draft]
            assert acceptance.taken[True] > 0  # greedy guesses were taken: it ran, and paid
            assert acceptance.rate(True) > 0.5
        engine.close()
    for key, (plain, drafted) in replies.items():
        assert drafted == plain, key


def test_the_keep_alive_warm_up_readies_the_draft_and_its_cache(real_home):
    engine = Engine(drafts=True, options=LoadOptions(dtype="float32"))
    ids = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47]
    engine.warm("smollm2", LoadOptions(dtype="float32"), ids)
    lm = engine.load("smollm2")
    assert lm.draft is not None
    taken = engine.prefix.take(lm, ids + [30])
    assert taken.reused == len(ids)
    state = taken.cache.draft
    assert isinstance(state, speculate.DraftState) and state.ids[: len(ids)] == ids  # the draft read the prompt too
    assert lm.tokenizer._compiled is not None  # the chat template is compiled before any request
    engine.close()
    # the draft's weights are cached (the next engine maps them); no int8 step image is written
    # for it (a command that asks for int8 itself writes its own)
    entries = [quant_cache.describe(p) for p in (real_home / "cache" / "quantized").glob("*.safetensors")]
    assert any(e.get("scheme") == "int8" for e in entries)
    images = [json.loads(e["facts"]) for e in entries if e.get("image") == "1" and "facts" in e]
    assert images and not any(f["quantize"] == "int8" for f in images)  # the fp32 model's image only


def test_no_draft_when_switched_off_or_not_fp32(real_home, monkeypatch):
    engine = Engine(drafts=True)
    monkeypatch.setenv(speculate.ENV, "0")
    engine.warm("smollm2", LoadOptions(dtype="float32"), [1, 9690])
    assert engine.load("smollm2", LoadOptions(dtype="float32")).draft is None
    monkeypatch.delenv(speculate.ENV)
    engine.warm("smollm2", LoadOptions(dtype="float32", quantize="int8"), [1, 9690])
    assert engine.load("smollm2", LoadOptions(dtype="float32", quantize="int8")).draft is None
    engine.close()


def test_a_model_loaded_by_a_request_gets_its_draft_after_the_reply(real_home):
    """After its reply is out (the client leaves then), before its job ends."""
    engine = Engine(drafts=True, options=LoadOptions(dtype="float32"))
    seen_draft = []
    params = SamplingParams(temperature=0, max_tokens=4)
    job = engine.chat("smollm2", [{"role": "user", "content": "Hi"}], params,
                      on_event=lambda e: seen_draft.append(engine.loaded()[0].draft is not None))
    job.result(120)
    assert seen_draft and not any(seen_draft)  # every event, the reply's end too, went out before the draft
    assert engine.loaded()[0].draft is not None  # made before the job ended (`close` waits for it)
    engine.close()


def test_acceptance_picks_long_passes_for_a_good_draft_and_none_for_a_bad_one():
    good, bad = speculate.Acceptance(), speculate.Acceptance()
    for _ in range(10):
        good.record(True, 7, 7)
        bad.record(False, 0, 3)
    assert good.lookahead(True) >= 6
    assert bad.lookahead(False) == 1
    fresh = speculate.Acceptance()
    assert fresh.lookahead(True) > 1 and fresh.rate(True) == pytest.approx(speculate.PRIOR[True])
