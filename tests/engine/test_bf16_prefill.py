"""The bf16 output layer at the end of a prefill: `GemvLinear` runs torch's unfoldable strided input
(`hidden[:, -1:, :]`) as one flat product instead of torch's batched path, which copies the whole
transposed weight on every call; only where `flat_check` found the same bits on this CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hyprstream_tui.engine.generate import new_cache, prefill
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.tuned import kernels
from hyprstream_tui.engine.tuned.kernels import GemvLinear, flat_check, flat_rows_exact, native_gemv, one_batch


def _layer(k: int, n: int, *, bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=bias)).to(torch.bfloat16)
    assert native_gemv(model) == 1 and isinstance(model[0], GemvLinear)
    return model[0]


def test_one_batch_is_torchs_unfoldable_batch_of_one():
    hidden = torch.zeros(1, 43, 64)
    assert one_batch(hidden[:, -1:, :])  # the prefill's last row: strides (43*64, 64, 1)
    assert one_batch(hidden[:, -3:, :])
    assert not one_batch(hidden)  # contiguous: torch folds it into one matrix itself
    assert not one_batch(hidden[:, -1:, :].clone(memory_format=torch.contiguous_format))
    assert not one_batch(hidden[0, -1:, :])  # 2-D
    assert not one_batch(torch.zeros(2, 43, 64)[:, -1:, :])  # a batch of two: left to torch
    assert not one_batch(hidden[:, :0, :])  # no rows


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_strided_rows_give_f_linears_bits(rows, bias):
    """Whatever `flat_check` says on this CPU, the layer's output is F.linear's, bit for bit."""
    layer = _layer(896, 1000, bias=bias)
    with torch.inference_mode():
        hidden = torch.randn(1, 43, 896).bfloat16()
        x = hidden[:, -rows:, :]
        ours = layer(x)
        assert ours.shape == (1, rows, 1000)
        assert torch.equal(ours.view(torch.int16), F.linear(x, layer.weight, layer.bias).view(torch.int16))


def test_flat_check_catches_another_order_of_additions():
    """The check has teeth: products that sum in another order (K reversed) or in fp32 fail it."""
    assert flat_check(lambda x, w: F.linear(x.flip(-1).contiguous(), w.flip(-1).contiguous())) != ""
    assert flat_check(lambda x, w: F.linear(x.float(), w.float()).bfloat16()) != ""


def test_flat_status_says_on_or_why_not():
    line = kernels.flat_status()
    assert line == "flat bf16 rows: on" if flat_rows_exact() else line.startswith("flat bf16 rows: off (")


def test_prefill_last_row_skips_the_weight_copy():
    """Where the check passed, the output layer on the prefill's last row runs one matrix product:
    no batched product and no copy of the weight (which torch's own path makes, 272 MB on Qwen2.5-0.5B)."""
    if not flat_rows_exact():
        pytest.skip(f"not on this CPU: {kernels.flat_status()}")
    layer = _layer(896, 4096)
    x = torch.randn(1, 43, 896).bfloat16()[:, -1:, :]
    with torch.inference_mode():
        layer(x)  # oneDNN compiles its kernel on the first call
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x)
    names = {e.key for e in prof.key_averages()}
    assert "aten::mm" in names and "aten::bmm" not in names and "aten::copy_" not in names


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_bf16_prefill_logits_equal_torchs_own_kernels(tiny_models, arch):
    """A 43-token bf16 prefill: the tuned kernels' logits are those of torch's own, bit for bit
    (bf16 prefill kept in bf16 on every CPU, so the comparison holds on CPUs without native bf16 too)."""
    source = ModelSource(name=arch, path=tiny_models[arch])
    tuned = load_model(source, LoadOptions(dtype="bfloat16", prefill_fp32=False))
    plain = load_model(source, LoadOptions(dtype="bfloat16", tuned=False))
    assert any(isinstance(m, GemvLinear) for m in tuned.model.modules())
    assert not any(isinstance(m, GemvLinear) for m in plain.model.modules())
    ids = torch.arange(5, 48).unsqueeze(0)
    positions = torch.arange(43).unsqueeze(0)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ours = prefill(tuned.model, ids, positions, new_cache(tuned.model))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as plain_prof:
        theirs = prefill(plain.model, ids, positions, new_cache(plain.model))
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    if flat_rows_exact():  # torch's batched output layer is the one batched product the flat one replaced
        assert _bmm_calls(plain_prof) == _bmm_calls(prof) + 1


def _bmm_calls(prof: profile) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "aten::bmm")
