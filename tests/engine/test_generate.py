"""Our prefill + decode loop against transformers' `generate`, token for token."""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine.generate import generate_tokens, stream_text
from hyprstream_tui.engine.loader import AdapterSource, LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState, seeded
from hyprstream_tui.engine.tiny import ARCHS

PROMPT = "Once upon a time there was a small village by the sea."
GREEDY = SamplingParams(temperature=0, max_tokens=24)


def _reference(model, ids, max_new):
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def _ours(lm, ids, params=GREEDY, *, generator=None):
    return list(generate_tokens(lm.model, SequenceState(ids, params, eos_ids=frozenset(), generator=generator)))


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {
        arch: load_model(ModelSource(name=arch, path=path), LoadOptions(dtype="float32"))
        for arch, path in tiny_models.items()
    }


@pytest.fixture(scope="module")
def plain(tiny_models):
    """Each tiny model exactly as transformers loads it (float32): the reference."""
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(path).eval() for arch, path in tiny_models.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(loaded, plain, arch):
    lm = loaded[arch]
    ids = lm.tokenizer.encode(PROMPT)
    assert _ours(lm, ids) == _reference(plain[arch], ids, GREEDY.max_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_through_transformers_classes_matches_generate(tiny_models, plain, arch):
    """`LoadOptions(native=False)`: transformers' own classes under our loop, the path every
    architecture the native decoder does not cover takes."""
    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]),
                    LoadOptions(dtype="float32", native=False))
    assert not getattr(lm.model, "native", False)
    ids = lm.tokenizer.encode(PROMPT)
    assert _ours(lm, ids) == _reference(plain[arch], ids, GREEDY.max_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_native_decoder_covers_the_llama_family(loaded, arch):
    """llama, qwen2 and mistral load through `engine.native` (no transformers classes); gemma
    (another norm and activation) through transformers."""
    assert getattr(loaded[arch].model, "native", False) == (arch != "gemma")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_bf16_matches_generate_on_the_plain_model(tiny_models, arch):
    """In bf16 (with the fp32 prefill kernel where the CPU lacks native bf16) against
    `generate` on the model exactly as transformers loads it."""
    from transformers import AutoModelForCausalLM

    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(dtype="bfloat16"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.bfloat16).eval()
    ids = lm.tokenizer.encode(PROMPT + " " + PROMPT)  # over 16 tokens: the prefill kernel runs
    assert _ours(lm, ids) == _reference(plain, ids, GREEDY.max_tokens)


def test_upcast_prefill_linear_agrees_with_bf16():
    from hyprstream_tui.engine.tuned.kernels import UpcastPrefillLinear, upcast_prefill

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    reference = torch.nn.Linear(64, 32).to(torch.bfloat16)
    reference.load_state_dict(layer[0].state_dict())
    assert upcast_prefill(layer) == 1 and isinstance(layer[0], UpcastPrefillLinear)
    for rows in (1, 40):
        x = torch.randn(1, rows, 64, dtype=torch.bfloat16)
        a, b = layer(x).float(), reference(x).float()
        assert layer(x).dtype == torch.bfloat16
        assert torch.allclose(a, b, rtol=2**-7, atol=1e-3)  # within bf16 rounding


@pytest.mark.parametrize("bias", [True, False])
def test_rows_first_linear_agrees_with_fp32_and_is_exact_for_one_row(bias):
    from hyprstream_tui.engine.tuned.kernels import RowsFirstLinear, rows_first

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=bias))
    reference = torch.nn.Linear(64, 48, bias=bias)
    reference.load_state_dict(layer[0].state_dict())
    assert rows_first(layer) == 1 and isinstance(layer[0], RowsFirstLinear)
    with torch.inference_mode():
        one = torch.randn(1, 1, 64)
        assert torch.equal(layer(one), reference(one))  # a single stream: the plain kernel
        for batch, rows in ((4, 1), (2, 16), (1, 64), (1, 65)):  # decode batch, prefill, edges
            x = torch.randn(batch, rows, 64)
            out = layer(x)
            assert out.shape == (batch, rows, 48) and out.is_contiguous()
            assert torch.allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_loader_uses_rows_first_for_fp32_on_cpu(tiny_models):
    from hyprstream_tui.engine.tuned.kernels import RowsFirstLinear

    arch, path = next(iter(tiny_models.items()))
    lm = load_model(ModelSource(name=arch, path=path), LoadOptions(dtype="float32", device="cpu"))
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is RowsFirstLinear for m in linears)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_adapter_matches_peft_generate(loaded, tiny_models, tiny_adapters, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = loaded[arch]
    ids = lm.tokenizer.encode(PROMPT)
    adapter = AdapterSource(name="lora", path=tiny_adapters[arch], commit="c0ffee")
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_models[arch]), str(tiny_adapters[arch])
    ).eval()
    expected = _reference(reference, ids, GREEDY.max_tokens)
    base = _ours(lm, ids)
    base_model = lm.model.model if hasattr(lm.model, "model") else lm.model
    weights_before = next(base_model.parameters()).data_ptr()
    try:
        lm.use_adapter(adapter)
        assert _ours(lm, ids) == expected
        assert expected != base  # the adapter changes the answer...
        lm.use_adapter(None)
        assert _ours(lm, ids) == base  # ...and switching back restores the base model
        lm.use_adapter(adapter)
        assert _ours(lm, ids) == expected
    finally:
        lm.use_adapter(None)
    assert next(base_model.parameters()).data_ptr() == weights_before  # never reloaded


def test_stop_string_split_across_tokens_is_never_emitted(loaded):
    lm = loaded["qwen2"]
    ids = lm.tokenizer.encode(PROMPT)
    full_ids = _ours(lm, ids, SamplingParams(temperature=0, max_tokens=40))
    # A stop string that straddles a token boundary in the greedy output.
    pieces = [lm.tokenizer.decode([t]) for t in full_ids]
    k = next(i for i in range(5, len(pieces) - 1) if pieces[i].strip() and pieces[i + 1].strip())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = lm.tokenizer.decode(full_ids)
    params = SamplingParams(temperature=0, max_tokens=40, stop=(stop,))
    seq = SequenceState(ids, params, eos_ids=frozenset(), generator=None, tokenizer=lm.tokenizer)
    deltas = list(stream_text(lm.model, seq))
    assert "".join(deltas) == full[: full.index(stop)] == seq.text
    assert seq.finish_reason == "stop" and seq.stop == stop
    assert not any(stop in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_same_seed_same_text(loaded):
    lm = loaded["llama"]
    ids = lm.tokenizer.encode(PROMPT)

    def run(seed):
        return _ours(lm, ids, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=30), generator=seeded(seed))

    assert run(1) == run(1) != run(2)


def test_eos_ends_generation(loaded):
    lm = loaded["qwen2"]
    ids = lm.tokenizer.encode(PROMPT)
    first = _ours(lm, ids)[3]
    seq = SequenceState(ids, GREEDY, eos_ids=frozenset({first}), generator=None)
    out = list(generate_tokens(lm.model, seq))
    assert first not in out and seq.finish_reason == "eos" and out == seq.token_ids


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_quantization_stays_close(tiny_models, dtype, arch):
    source = ModelSource(name=arch, path=tiny_models[arch])
    full = load_model(source, LoadOptions(dtype="float32"))
    q8 = load_model(source, LoadOptions(quantize="int8", dtype=dtype))
    ids = torch.tensor([full.tokenizer.encode(PROMPT + " The quick brown fox jumps.")])
    with torch.inference_mode():
        a, b = full.model(ids).logits[0], q8.model(ids).logits[0]
    rel = float((a - b).abs().max() / a.abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    assert rel < 0.25 and agree > 0.7, (rel, agree)
    assert q8.dtype == dtype and q8.options.quantize == "int8"
    linears = [m for m in q8.model.modules() if type(m) is torch.nn.Linear]
    assert linears == []  # every linear layer, the output layer included, is int8
    assert _ours(q8, full.tokenizer.encode(PROMPT))  # and it generates


def test_fused_int8_parts_equal_separate_int8_layers():
    from hyprstream_tui.engine.tuned.quantize import FusedInt8, Int8Part, int8_linear

    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=b) for n, b in ((96, True), (32, False), (32, True))]
    fused = FusedInt8(linears)
    parts = [Int8Part(fused, i) for i in range(3)]
    alone = [int8_linear(lin) for lin in linears]
    with torch.inference_mode():
        for rows in (1, 7, 40):  # a decode step, a short prompt, a prefill
            x = torch.randn(1, rows, 64)
            for part, single in zip(parts, alone):
                assert torch.equal(part(x), single(x))
            # parts called out of turn, or with another input, compute their own product
            y = torch.randn(1, rows, 64)
            assert torch.equal(parts[2](y), alone[2](y))
            assert torch.equal(parts[0](x), alone[0](x)) and torch.equal(parts[1](y), alone[1](y))
            assert fused._last is not None
            assert torch.equal(parts[2](x), alone[2](x)) and fused._last is None  # let go


def test_int8_refuses_adapters_with_a_clear_error(tiny_models, tiny_adapters):
    from hyprstream_tui.errors import InvalidInput

    q8 = load_model(ModelSource(name="qwen2", path=tiny_models["qwen2"]), LoadOptions(quantize="int8"))
    with pytest.raises(InvalidInput, match="quantize"):
        q8.use_adapter(AdapterSource(name="lora", path=tiny_adapters["qwen2"]))
