"""The fused prompt (`FusedStep.prefill`, `hs_prefill` in engine/tuned/step.c, issue 15): a
prompt's tokens through the whole model in C, many at once, each computed exactly as the fused
decode step computes it alone. So the cache and logits a prompt leaves are those of as many steps,
bit for bit, however the prompt is cut (a reused prefix, chunks of 64, a cache that grows), and
the engine's quantized models run their prompts there, never through torch's kernels.
"""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine import generate, native
from hyprstream_tui.engine.generate import generate_tokens, new_cache
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.native.model import NativeForCausalLM
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.tuned import step
from hyprstream_tui.engine.tuned.quantize_int4 import Int4WeightOnlyLinear

pytestmark = pytest.mark.skipif(step.library() is None,
                                reason=f"the fused step cannot run on this machine: {step.status()}")
LENGTH = 70  # over one chunk of 64 rows


def load(tiny_models, arch, **options):
    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(**options))
    assert isinstance(lm.model, NativeForCausalLM)
    return lm


def tokens(lm, n=LENGTH, seed=0):
    return torch.randint(0, lm.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def fused(lm):
    cache = new_cache(lm.model)
    run = step.FusedStep.build(lm.model, cache, kinds=step.EVERY)
    assert run is not None
    return run, cache


def stepped(lm, ids):
    run, cache = fused(lm)
    with torch.inference_mode():
        for pos, token in enumerate(ids.tolist()):
            logits = run.step(token, pos)
    return logits, cache


def same_cache(a, b, n):
    assert a.length == b.length == n
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        assert torch.equal(x[:, :, :n], y[:, :, :n])


@pytest.mark.parametrize("arch, options", [
    ("llama", {"quantize": "int8"}), ("qwen2", {"quantize": "int8"}), ("llama", {"quantize": "int4"}),
    ("qwen2", {"quantize": "int4"}), ("mistral", {"dtype": "float32"}), ("llama", {"dtype": "bfloat16"}),
])
def test_a_prompt_in_pieces_leaves_what_steps_leave_bit_for_bit(tiny_models, arch, options, monkeypatch):
    monkeypatch.setattr(native.model, "FIRST_CAPACITY", 16)  # the prompt grows the cache twice over
    monkeypatch.setattr(step, "FIRST_CAPACITY", 16)
    # bf16: step.c's own prompts (an exact model's prompt is torch's: test_exact_step.py)
    monkeypatch.setitem(step._state, "exact", "held off by the test")
    lm = load(tiny_models, arch, **options)
    ids = tokens(lm)
    want, cache_s = stepped(lm, ids)
    run, cache = fused(lm)
    with torch.inference_mode():
        first = run.prefill(ids[:5], 0)
        assert torch.equal(first, stepped(lm, ids[:5])[0])
        got = run.prefill(ids[5:], 5)  # a reused prefix's rest: 65 tokens, two chunks
    assert cache.keys[0].shape[2] >= LENGTH > 16
    assert torch.equal(got, want)
    same_cache(cache, cache_s, LENGTH)
    with torch.inference_mode():  # and steps continue either cache alike
        assert torch.equal(run.step(7, LENGTH), stepped(lm, torch.cat([ids, torch.tensor([7])]))[0])


@pytest.mark.parametrize("arch, scheme", [("llama", "int8"), ("qwen2", "int4")])
def test_the_prompt_computes_the_dequantized_model(tiny_models, arch, scheme):
    """As the steps do (test_fused_step.py): fp32 activations over the dequantized weights."""
    from tests.engine.test_fused_step import dequantized_reference

    lm = load(tiny_models, arch, quantize=scheme)
    ref = dequantized_reference(tiny_models, arch, lm.model)
    ids = tokens(lm, 40, seed=1)
    run, _ = fused(lm)
    with torch.inference_mode():
        ours = run.prefill(ids, 0)
        theirs = generate.prefill(ref, ids[None], torch.arange(40)[None], new_cache(ref))
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


def test_a_token_out_of_range_or_a_wrong_position_writes_nothing(tiny_models):
    lm = load(tiny_models, "llama", quantize="int8")
    run, cache = fused(lm)
    ids = tokens(lm, 10)
    with torch.inference_mode():
        run.prefill(ids, 0)
        before = [k.clone() for k in cache.keys]
        bad = ids.clone()
        bad[6] = lm.model.config.vocab_size
        with pytest.raises(ValueError, match="out of range"):
            run.prefill(bad, 10)
        with pytest.raises(ValueError, match="cache's length"):
            run.prefill(ids, 12)
    assert cache.length == 10
    # Bytes, not values: the cache's spare capacity is uninitialised memory, which may hold NaN
    # bit patterns that never compare equal as floats.
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(before, cache.keys))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_engine_runs_a_quantized_prompt_fused_and_int4_never_packs_for_torch(tiny_models, scheme,
                                                                                 monkeypatch):
    lm = load(tiny_models, "qwen2", quantize=scheme)
    int4 = [m for m in lm.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert bool(int4) == (scheme == "int4")
    calls = []
    real_prefill = generate.prefill
    monkeypatch.setattr(generate, "prefill", lambda *a, **k: calls.append(1) or real_prefill(*a, **k))
    ids = lm.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then some more words.")
    params = SamplingParams(temperature=0, max_tokens=6)
    out = list(generate_tokens(lm.model, SequenceState(list(ids), params, eos_ids=frozenset(), generator=None)))
    assert calls == []  # torch never ran the prompt
    assert not any(m.is_packed for m in int4)  # nor made its int4 layout
    logits, _ = stepped(lm, torch.tensor(ids))  # the first token: the steps' greedy pick
    assert out[0] == int(logits.argmax())
    step.set_enabled(False)  # torch's path: it packs its layout on first use, and runs
    try:
        plain = list(generate_tokens(lm.model, SequenceState(list(ids), params, eos_ids=frozenset(), generator=None)))
    finally:
        step.set_enabled(True)
    assert calls == [1] and len(plain) == 6
    assert all(m.is_packed for m in int4)
