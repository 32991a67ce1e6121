"""The lean decode step against `model(...)`: the same logits, bit for bit, on every tiny model."""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.generate import decode_one_token, generate_tokens, new_cache, prefill
from hyprstream_tui.engine.tuned.lean import FIRST_CAPACITY, LeanDecoder
from hyprstream_tui.engine.loader import AdapterSource, LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.tiny import ARCHS

PROMPT = "Once upon a time there was a small village by the sea."


def _steps_both_ways(model, ids: list[int], steps: int) -> tuple[list, list]:
    """Logits of `steps` greedy decode steps through the lean decoder and through model(...)."""
    n = len(ids)
    positions = torch.arange(n + steps).unsqueeze(0)
    with torch.inference_mode():
        out = []
        for use_lean in (True, False):
            cache = new_cache(model)
            logits = prefill(model, torch.tensor([ids]), positions[:, :n], cache)
            lean = LeanDecoder.build(model, cache, n, steps) if use_lean else None
            assert (lean is not None) == use_lean
            seq = []
            for i in range(steps):
                token = torch.tensor([[int(logits.argmax())]])
                pos = positions[:, n + i : n + i + 1]
                if lean is not None:
                    logits = lean.step(token, pos)
                else:
                    logits = decode_one_token(model, token, pos, cache)
                seq.append(logits.clone())
            out.append(seq)
    return out[0], out[1]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("how", ["float32", "bfloat16", "int8"])
def test_lean_step_gives_the_same_logits_as_the_model(tiny_models, arch, how):
    options = LoadOptions(native=False, quantize="int8") if how == "int8" else LoadOptions(native=False, dtype=how)
    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), options)
    ids = lm.tokenizer.encode(PROMPT)
    lean, plain = _steps_both_ways(lm.model, ids, 12)
    for a, b in zip(lean, plain, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_layers_run_fused_in_the_lean_step(tiny_models, arch):
    """q/k/v (and gate/up) are parts of one int8 product, and the lean step covers int8 models:
    one call of the fused product per step serves all three parts."""
    from hyprstream_tui.engine.tuned.quantize import FusedInt8, Int8Part

    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(native=False, quantize="int8"))
    attn = lm.model.model.layers[0].self_attn
    assert all(type(m) is Int8Part and m.fused is attn.q_proj.fused
               for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    calls = []
    fused = attn.q_proj.fused
    original = type(fused.linear).forward
    fused.linear.forward = lambda x: calls.append(x.shape) or original(fused.linear, x)
    with torch.inference_mode():
        cache = new_cache(lm.model)
        prefill(lm.model, torch.tensor([[5, 6, 7]]), torch.arange(3).unsqueeze(0), cache)
        decoder = LeanDecoder.build(lm.model, cache, 3, 4)
        assert decoder is not None
        calls.clear()
        decoder.step(torch.tensor([[8]]), torch.tensor([[3]]))
    assert len(calls) == 1 and isinstance(fused, FusedInt8)


def test_lean_step_with_an_adapter_gives_the_same_logits(tiny_models, tiny_adapters):
    lm = load_model(ModelSource(name="llama", path=tiny_models["llama"]), LoadOptions(native=False))
    ids = lm.tokenizer.encode(PROMPT)
    base, _ = _steps_both_ways(lm.model, ids, 6)
    lm.use_adapter(AdapterSource(name="lora", path=tiny_adapters["llama"], commit="c0ffee"))
    try:
        lean, plain = _steps_both_ways(lm.model, ids, 6)
    finally:
        lm.use_adapter(None)
    assert all(torch.equal(a, b) for a, b in zip(lean, plain, strict=True))
    assert not torch.equal(lean[0], base[0])  # the adapter is in the lean step's products


def test_lean_cache_grows_past_its_first_capacity(tiny_models):
    lm = load_model(ModelSource(name="qwen2", path=tiny_models["qwen2"]), LoadOptions(native=False))
    ids = lm.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=FIRST_CAPACITY + 40)

    def run(tuned: bool) -> list[int]:
        return list(generate_tokens(lm.model, SequenceState(ids, params, eos_ids=frozenset(), generator=None), tuned=tuned))

    lean = run(True)
    assert len(lean) == params.max_tokens and lean == run(False)


def test_sliding_window_shorter_than_the_sequence_keeps_the_plain_path():
    from transformers import AutoModelForCausalLM

    from hyprstream_tui.engine.tiny import tiny_config

    config = tiny_config("mistral")
    config.sliding_window = 16
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.inference_mode():
        cache = new_cache(model)
        prefill(model, torch.tensor([[5, 6, 7, 8]]), torch.arange(4).unsqueeze(0), cache)
        assert LeanDecoder.build(model, cache, 4, 12) is not None  # 16 positions fit the window
        assert LeanDecoder.build(model, cache, 4, 13) is None  # 17 do not


def test_other_attention_implementations_keep_the_plain_path(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation="eager")
    with torch.inference_mode():
        cache = new_cache(model)
        prefill(model.eval(), torch.tensor([[5, 6, 7]]), torch.arange(3).unsqueeze(0), cache)
    assert LeanDecoder.build(model, cache, 3, 4) is None


def test_generation_from_a_prefilled_prefix_equals_a_whole_run(tiny_models):
    lm = load_model(ModelSource(name="llama", path=tiny_models["llama"]), LoadOptions(native=False))
    ids = lm.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=24)

    def run(cache=None) -> list[int]:
        return list(generate_tokens(lm.model, SequenceState(ids, params, eos_ids=frozenset(), generator=None),
                                    cache=cache))

    whole = run()
    cache = new_cache(lm.model)
    with torch.inference_mode():
        prefill(lm.model, torch.tensor([ids[:-3]]), torch.arange(len(ids) - 3).unsqueeze(0), cache)
    assert run(cache) == whole
    with pytest.raises(ValueError, match="last token"):
        run(cache)  # the cache now holds the whole prompt and more


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tuned_off_loads_plain_layers_and_decodes_without_the_lean_step(tiny_models, dtype, monkeypatch):
    """LoadOptions(tuned=False): torch's own nn.Linear everywhere and every decode step through
    model(...); in fp32 the greedy tokens are the tuned path's."""
    from hyprstream_tui.engine import engine as engine_module
    from hyprstream_tui.engine import generate

    source = ModelSource(name="qwen2", path=tiny_models["qwen2"])
    plain = load_model(source, LoadOptions(native=False, dtype=dtype, tuned=False))
    tuned = load_model(source, LoadOptions(native=False, dtype=dtype))
    linears = lambda lm: [type(m) for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert set(linears(plain)) == {torch.nn.Linear}
    assert set(linears(tuned)) != {torch.nn.Linear}
    built = []
    original = generate.LeanDecoder.build
    monkeypatch.setattr(generate.LeanDecoder, "build", lambda *a: built.append(a) or original(*a))
    params = SamplingParams(temperature=0, max_tokens=16)
    engine = engine_module.Engine(options=LoadOptions(native=False, dtype=dtype, tuned=False))
    off = engine.generate(str(tiny_models["qwen2"]), PROMPT, params).result()
    assert built == [] and len(off.text) > 0
    on = engine_module.Engine(options=LoadOptions(native=False, dtype=dtype)).generate(str(tiny_models["qwen2"]), PROMPT, params).result()
    assert len(built) == 1
    if dtype == "float32":
        assert on.text == off.text
