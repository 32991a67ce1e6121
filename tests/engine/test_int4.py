"""`--quantize int4` (engine/tuned/quantize_int4.py, issue 15): group-wise 4-bit weights through
torch's int4 CPU kernel, close to fp32 on the tiny models, every linear layer replaced (the output
layer and shapes the kernel does not fit: int8), and its weights cached per model commit like
int8's, in a form that does not depend on the CPU."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hyprstream_tui.engine.generate import generate_tokens
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.sources import resolve_source
from hyprstream_tui.engine.tiny import ARCHS
from hyprstream_tui.engine.tuned import quant_cache, quantize_int4
from hyprstream_tui.engine.tuned.quantize import FusedInt8, Int8Part, Int8WeightOnlyLinear
from hyprstream_tui.engine.tuned.quantize_int4 import (GROUP, Int4WeightOnlyLinear, dequantize, int4_linear,
                                                       quantize_groups)
from hyprstream_tui.errors import InvalidInput

INT4 = LoadOptions(quantize="int4")
PROMPT = "The quick brown fox jumps over the lazy dog."


def logits(lm, text=PROMPT):
    ids = torch.tensor([lm.tokenizer.encode(text)])
    with torch.inference_mode():
        return lm.model(ids).logits[0]


def entries(store):
    """The cache's weight entries (`<key>.safetensors`; not the step images beside them,
    `<key>.stepN.safetensors`, which engine/light.py reads: tests/engine/test_light.py)."""
    where = quant_cache.folder(store.paths.cache)
    return sorted(p for p in where.glob("*.safetensors") if "." not in p.stem) if where.is_dir() else []


@pytest.mark.parametrize("group", [32, 64])
def test_groups_round_trip_within_half_a_step(group):
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.05
    weight[3, :group] = 0.25  # a constant group: exact
    nibbles, scales_zeros = quantize_groups(weight, group)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (48, 64)
    assert scales_zeros.dtype == torch.bfloat16 and scales_zeros.shape == (128 // group, 48, 2)
    back = dequantize(nibbles, scales_zeros)
    step = scales_zeros[..., 0].float().transpose(0, 1).repeat_interleave(group, dim=1)  # [out, in]
    assert bool(((back - weight).abs() <= 0.5 * step * 1.02 + 1e-3).all())
    assert torch.allclose(back[3, :group], torch.full((group,), 0.25), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 40])  # a decode step, a short prompt, a prefill
def test_the_kernel_computes_the_dequantized_product(dtype, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128) * 0.05, torch.randn(96)
    nibbles, scales_zeros = quantize_groups(weight)
    layer = Int4WeightOnlyLinear(nibbles, scales_zeros, bias, dtype)
    x = torch.randn(2, rows, 128)
    y = layer(x.to(dtype))
    expected = torch.nn.functional.linear(x, dequantize(nibbles, scales_zeros), bias)
    assert y.dtype == dtype and y.shape == (2, rows, 96)
    assert float((y.float() - expected).abs().max() / expected.abs().max()) < 0.02  # activations rounded to bf16/fp16


def test_fused_int4_parts_equal_separate_int4_layers():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=b) for n, b in ((96, True), (32, False), (32, True))]
    fused = FusedInt8(linears, make=int4_linear)
    assert isinstance(fused.linear, Int4WeightOnlyLinear)
    parts = [Int8Part(fused, i) for i in range(3)]
    alone = [int4_linear(lin) for lin in linears]
    with torch.inference_mode():
        for rows in (1, 7, 40):
            x = torch.randn(1, rows, 64)
            for part, single in zip(parts, alone):
                assert torch.allclose(part(x), single(x), atol=1e-5)


def test_a_layer_the_kernel_does_not_fit_stays_int8():
    assert isinstance(int4_linear(torch.nn.Linear(64, 48)), Int4WeightOnlyLinear)
    assert isinstance(int4_linear(torch.nn.Linear(64, 40)), Int8WeightOnlyLinear)  # 40 rows: not a multiple of 16
    assert isinstance(int4_linear(torch.nn.Linear(48, 32)), Int8WeightOnlyLinear)  # 48 inputs: not groups of 32


def _as_quantized(lm) -> None:
    """`lm` (fp32, torch's own layers) with the weights `--quantize int4` stands for, in fp32: the
    output layer int8 per row, the others int4 in groups, the embedding rounded to bf16."""
    from hyprstream_tui.engine.tuned.quantize import quantize_rows

    model = lm.model
    embed = model.get_input_embeddings()
    embed.weight = torch.nn.Parameter(embed.weight.detach().to(torch.bfloat16).float(), requires_grad=False)
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight.detach().to(torch.bfloat16).float()
        if name == "lm_head":
            q, scales = quantize_rows(weight)
            weight = q.float() * scales[:, None]
        else:
            weight = dequantize(*quantize_groups(weight))
        module.weight = torch.nn.Parameter(weight, requires_grad=False)  # unties a tied output layer too


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int4_quantization_stays_close(tiny_models, dtype, arch):
    source = ModelSource(name=arch, path=tiny_models[arch])
    full = load_model(source, LoadOptions(dtype="float32"))
    same = load_model(source, LoadOptions(dtype="float32", tuned=False))
    _as_quantized(same)
    q4 = load_model(source, LoadOptions(quantize="int4", dtype=dtype))
    text = PROMPT + " The quick brown fox jumps."
    a, b, c = logits(full, text), logits(q4, text).float(), logits(same, text)
    # The tiny models' random weights are the worst case for 4 bits (no structure, flat logits):
    # against fp32 a bound only; against the same weights in fp32, close (activations go through
    # the kernel in bf16). SmolLM2's perplexity is the quality figure (tests/real).
    assert float((a - b).abs().max() / a.abs().max()) < 0.6
    rel = float((c - b).abs().max() / c.abs().max())
    agree = float((c.argmax(-1) == b.argmax(-1)).float().mean())
    assert rel < 0.05 and agree > 0.9, (rel, agree)
    assert q4.dtype == dtype and q4.options.quantize == "int4"
    kinds = [type(m) for m in q4.model.modules()]
    assert torch.nn.Linear not in kinds  # every linear layer is quantized:
    assert kinds.count(Int8WeightOnlyLinear) == 1  # the output layer int8, the rest int4
    assert kinds.count(Int4WeightOnlyLinear) == 4 * q4.model.config.num_hidden_layers  # qkv, o, gate+up, down
    seq = SequenceState(full.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=8),
                        eos_ids=frozenset(), generator=None)
    assert len(list(generate_tokens(q4.model, seq))) == 8  # and it generates


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lean_step_decodes_int4_models_as_the_plain_step_does(tiny_models, arch):
    q4 = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(native=False, quantize="int4"))

    def greedy(lean: bool) -> list[int]:
        seq = SequenceState(q4.tokenizer.encode(PROMPT), SamplingParams(temperature=0, max_tokens=12),
                            eos_ids=frozenset(), generator=None)
        return list(generate_tokens(q4.model, seq, tuned=lean))

    assert greedy(True) == greedy(False)


def test_unknown_schemes_are_one_clear_line():
    with pytest.raises(InvalidInput, match="use int8, int4 or leave it out"):
        LoadOptions(quantize="int3")


def test_the_cli_offers_int4(tiny_model_src, capsys):
    from hyprstream_tui.cli.generate import add_infer_commands

    parser = argparse.ArgumentParser()
    add_infer_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["infer", str(tiny_model_src), "--prompt", "Hi", "--temperature", "0",
                              "--max-tokens", "4", "--quantize", "int4", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] <= 4


def test_the_first_int4_load_makes_its_entry_and_the_next_maps_it_with_equal_logits(tiny_store, monkeypatch):
    made = load_model(resolve_source("tiny", tiny_store), INT4)
    assert made.quant_cache == "made" and len(entries(tiny_store)) == 1
    [entry] = entries(tiny_store)
    assert quant_cache.describe(entry)["scheme"] == f"int4-g{GROUP}"

    def refuse(*args, **kwargs):
        raise AssertionError("quantized again despite the cache")

    monkeypatch.setattr(quantize_int4, "quantize_groups", refuse)
    hit = load_model(resolve_source("tiny", tiny_store), INT4)
    assert hit.quant_cache == "hit" and len(entries(tiny_store)) == 1
    assert torch.equal(logits(made), logits(hit))
    # the entry holds the portable form (4-bit values two a byte), never the kernel's CPU-specific packing
    tensors = quant_cache.read(tiny_store.paths.cache, entry.stem)
    assert tensors is not None
    fours = {k: v for k, v in tensors.items() if k.endswith("#q4")}
    assert fours and all(v.dtype == torch.uint8 for v in fours.values())
    assert all(v.data_ptr() % quant_cache.ALIGN == 0 for v in tensors.values())


def test_int4_and_int8_entries_are_apart(tiny_store):
    q4 = load_model(resolve_source("tiny", tiny_store), INT4)
    q8 = load_model(resolve_source("tiny", tiny_store), LoadOptions(quantize="int8"))
    assert q4.quant_cache == q8.quant_cache == "made" and len(entries(tiny_store)) == 2
    assert load_model(resolve_source("tiny", tiny_store), INT4).quant_cache == "hit"
    assert sorted(quant_cache.describe(e)["scheme"] for e in entries(tiny_store)) == sorted(["int8", f"int4-g{GROUP}"])


def test_a_damaged_int4_entry_is_made_again_with_the_same_result(tiny_store):
    good = logits(load_model(resolve_source("tiny", tiny_store), INT4))
    [entry] = entries(tiny_store)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again = load_model(resolve_source("tiny", tiny_store), INT4)
    assert again.quant_cache == "made" and torch.equal(logits(again), good)
