"""engine.tuned.gemv: the C one-row bf16 kernel gives torch's bits, is used where it should be, and
falls back to torch's kernel, with a reason, wherever it cannot be built or trusted."""

from __future__ import annotations

import os
import platform
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from hyprstream_tui.engine.tuned import gemv
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.generate import generate_tokens
from hyprstream_tui.engine.tuned.kernels import GemvLinear, UpcastPrefillLinear, native_gemv
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.params import SamplingParams

# Where the kernel must be on: what `gemv._load` asks for. Elsewhere the tests that need the
# kernel skip and say why; on this project's machines (and CI) they run.
CAN_RUN = (
    sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
    and torch.backends.cpu.get_cpu_capability() == "AVX2"
    and shutil.which(os.environ.get("CC") or "cc") is not None
)
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason="needs Linux x86-64, torch at AVX2, and $CC or cc")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.delenv(gemv.ENV_SWITCH, raising=False)
    k = gemv.kernel()
    assert k is not None, gemv.status()
    return k


@pytest.fixture
def counted(kernel, monkeypatch):
    """Counts the kernel's calls (it still computes: the real kernel runs)."""
    calls = []
    real = gemv.Kernel.linear

    def linear(self, x, weight, bias):
        calls.append(tuple(weight.shape))
        return real(self, x, weight, bias)

    monkeypatch.setattr(gemv.Kernel, "linear", linear)
    return calls


@needs_kernel
def test_kernel_is_on_here(kernel):
    assert gemv.status().startswith("native bf16 GEMV: on")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_gives_torchs_bits_on_model_shapes(kernel, threads):
    """The Qwen2.5-0.5B decode shapes (q/o, k/v, gate/up, down, a slice of the output layer) and
    odd row counts, with and without bias, at several input scales."""
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for n, k, bias in ((896, 896, True), (128, 896, True), (4864, 896, False),
                               (896, 4864, False), (20001, 896, False), (1, 64, True), (3, 192, False)):
                w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
                b = torch.randn(n, generator=g).bfloat16() if bias else None
                for scale in (0.01, 1.0, 300.0):
                    x = (torch.randn(1, 1, k, generator=g) * scale).bfloat16()
                    ours = kernel.linear(x, w, b)
                    assert ours.shape == (1, 1, n)
                    assert torch.equal(bits(ours), bits(F.linear(x, w, b))), (n, k, bias, scale)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_kernel_gives_torchs_bits_on_extreme_values(kernel):
    """Wide magnitudes, sums that overflow, subnormals, inf and NaN: the self-check's cases."""
    cases = gemv.check_values(torch.Generator().manual_seed(11))
    assert len(cases) >= 8
    for x, w, b in cases:
        assert torch.equal(bits(kernel.linear(x, w, b)), bits(F.linear(x, w, b)))
    assert gemv.self_check(kernel) == ""


def test_self_check_catches_a_kernel_that_sums_in_another_order():
    """A kernel that rounds differently (here: fp32 products through torch's fp32 GEMM, a
    different summation order) must fail the check that guards loading."""

    class Reordered:
        def linear(self, x, w, b):
            return F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()

    assert "values" in gemv.self_check(Reordered())


def test_order_revealing_rows_tell_summation_orders_apart():
    """The self-check's rows built to show a change of order: another order (fp32 GEMM) gives
    other bf16 values in many of them, where random data differs in about 1 value in 10,000.
    (Changing one step of the C kernel's final sum, or its pairing of the 8 vectors, was caught
    this way: 237 and 100 of 512 values.)"""
    x, w, _ = gemv.order_revealing(torch.Generator().manual_seed(5), 512, 896)
    x, w = x.bfloat16(), w.bfloat16()
    torchs = F.linear(x, w)
    other = F.linear(x.float(), w.float()).bfloat16()
    assert (bits(torchs) != bits(other)).float().mean() > 0.1


@needs_kernel
def test_fits_only_one_bf16_row_it_covers(kernel):
    w = torch.zeros(8, 128, dtype=torch.bfloat16)
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    assert kernel.fits(x, w, None)
    assert kernel.fits(x.view(1, 1, 128), w, torch.zeros(8, dtype=torch.bfloat16))
    assert not kernel.fits(torch.zeros(2, 128, dtype=torch.bfloat16), w, None)  # two rows
    assert not kernel.fits(torch.zeros(1, 96, dtype=torch.bfloat16),
                           torch.zeros(8, 96, dtype=torch.bfloat16), None)  # 96 % 64 != 0
    assert not kernel.fits(x.float(), w.float(), None)
    assert not kernel.fits(torch.zeros(1, 256, dtype=torch.bfloat16)[:, ::2], w, None)
    assert not kernel.fits(x, torch.zeros(128, 8, dtype=torch.bfloat16).t(), None)
    assert not kernel.fits(x, w, torch.zeros(8))  # fp32 bias
    assert not kernel.fits(x.clone().requires_grad_(), w, None)  # autograd: torch's kernel
    with torch.no_grad():
        assert kernel.fits(x.clone().requires_grad_(), w, None)


@needs_kernel
def test_gemv_linear_runs_one_row_through_the_kernel_and_the_rest_through_torch(counted):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(128, 40)).to(torch.bfloat16)
    reference = torch.nn.Linear(128, 40).to(torch.bfloat16)
    reference.load_state_dict(layer[0].state_dict())
    assert native_gemv(layer) == 1 and type(layer[0]) is GemvLinear
    with torch.inference_mode():
        for rows in (1, 2, 40):
            x = torch.randn(1, rows, 128).bfloat16()
            assert torch.equal(bits(layer(x)), bits(reference(x)))
    assert counted == [(40, 128)]  # the one-row call only
    x = torch.randn(1, 1, 128).bfloat16().requires_grad_()
    layer[0].requires_grad_(True)
    layer(x).float().sum().backward()  # training keeps torch's kernel, gradients and all
    assert x.grad is not None and counted == [(40, 128)]


@needs_kernel
def test_greedy_bf16_tokens_are_the_same_with_and_without_the_kernel(tiny_models, counted):
    lm = load_model(ModelSource(name="qwen2", path=tiny_models["qwen2"]),
                    LoadOptions(dtype="bfloat16"))
    assert any(isinstance(m, UpcastPrefillLinear) for m in lm.model.modules())
    ids = lm.tokenizer.encode("Once upon a time there was a small village by the sea.")
    params = SamplingParams(temperature=0, max_tokens=24)

    def run():
        return list(generate_tokens(lm.model, SequenceState(ids, params, eos_ids=frozenset(), generator=None)))

    with_kernel = run()
    used = len(counted)
    gemv.set_enabled(False)
    try:
        without = run()
    finally:
        gemv.set_enabled(True)
    layers = lm.model.config.num_hidden_layers
    assert used >= 23 * (7 * layers + 1)  # every projection of each decode step, output layer too
    assert len(counted) == used  # off means off
    assert with_kernel == without and len(with_kernel) == 24


def test_loader_switches_bf16_layers_without_the_fp32_prefill(tiny_models):
    lm = load_model(ModelSource(name="qwen2", path=tiny_models["qwen2"]),
                    LoadOptions(dtype="bfloat16", prefill_fp32=False))
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is GemvLinear for m in linears)


# Building: cached, atomic, and every failure is a reason, not an exception.

@needs_kernel
def test_build_is_cached_and_leaves_no_temp_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    first = gemv._build()
    assert first.parent == tmp_path / "cache" / "kernels"
    stamp = first.stat().st_mtime_ns
    assert gemv._build() == first and first.stat().st_mtime_ns == stamp  # not built again
    assert [p.name for p in first.parent.iterdir()] == [first.name]


@needs_kernel
def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    path = gemv._build()
    path.write_bytes(b"not a shared library")
    k, why = gemv._load()
    assert k is not None and why == "" and k.path == path
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_status_says_when_the_kernel_was_turned_off():
    gemv.set_enabled(False)
    try:
        assert gemv.kernel() is None
        assert gemv.status() == "native bf16 GEMV: off (turned off in this process)"
    finally:
        gemv.set_enabled(True)


def test_a_compiler_that_fails_leaves_torchs_kernel_and_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # /bin/false: a compiler that fails
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64") \
            and torch.backends.cpu.get_cpu_capability() == "AVX2":
        k, why = gemv._load()
        assert k is None and "failed" in why and "\n" not in why
    with pytest.raises(gemv.BuildError, match="failed"):
        gemv._build()
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_no_compiler_and_the_switch_are_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(gemv.BuildError, match="no C compiler"):
        gemv._build()
    monkeypatch.setenv(gemv.ENV_SWITCH, "0")
    assert gemv._load() == (None, f"{gemv.ENV_SWITCH}=0")
