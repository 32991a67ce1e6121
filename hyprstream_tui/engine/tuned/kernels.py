"""Linear layers that pick the faster kernel for the shape at hand.

On CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX), PyTorch's bf16 matrix-matrix
product is several times slower than converting the weight to fp32 and using fp32 BLAS, while the
one-row product of a decode step is fastest in bf16 (it reads half the bytes). `UpcastPrefillLinear`
runs inputs of many rows (a prompt's prefill) in fp32 and rounds the result back to bf16; decode
steps keep the bf16 kernel. Both accumulate in fp32, so results agree to bf16 rounding.
`GemvLinear` runs a one-row bf16 product (a decode step) through `engine.tuned.gemv`'s C kernel where
that kernel is available: torch's bits, read faster. `UpcastPrefillLinear` is one too.

`GemvLinear` also flattens a strided bf16 input that torch would not fold into one matrix, such as
the output layer's input at the end of a prefill (`hidden[:, -1:, :]`, a slice of the prompt's
rows). For it, without bias, `F.linear` takes torch's batched path (`bmm`), which copies the whole
transposed weight first: on the Qwen2.5-0.5B shape 272 MB, about 0.5 s of a 0.7 s prefill of 43
tokens (2-core AVX-512-BF16 EPYC). The flat product runs the same oneDNN kernel on the weight as it
lies; it is used only where `flat_rows_exact` found, on this CPU and torch, that it gives the
batched path's bits.

`RowsFirstLinear` is for fp32 weights: for a few rows (a decode batch of a server, a short
prompt), MKL's x @ W^T runs several times slower than the same product written as (W @ x^T)^T
(measured on the 2-core AVX2 EPYC: the 151936-wide output layer at 4 rows 209 ms vs 55 ms, a
4864x896 MLP projection 4.8 ms vs 2.2 ms); one row keeps the plain kernel, so a single stream
computes exactly what transformers computes.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hyprstream_tui.engine.tuned import gemv

UPCAST_MIN_ROWS = 16  # below this many rows, bf16 is as fast (measured: 2-core AVX2 EPYC)


class GemvLinear(torch.nn.Linear):
    """A bf16 `nn.Linear` whose one-row products run through `engine.tuned.gemv` where it is available
    (same bits as torch's kernel; see there), and whose unfoldable inputs run flat (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.numel() == self.in_features:
            native = gemv.kernel()
            if native is not None and native.fits(x, self.weight, self.bias):
                return native.linear(x, self.weight, self.bias)
        if self.bias is None and x.dtype == torch.bfloat16 and one_batch(x) and flat_rows_exact():
            return _flat_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class UpcastPrefillLinear(GemvLinear):
    """A `GemvLinear` whose many-row bf16 products run in fp32 (same weights, same module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.dtype != torch.bfloat16 or x.numel() < UPCAST_MIN_ROWS * self.in_features:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)


def one_batch(x: torch.Tensor) -> bool:
    """Whether torch's `matmul` runs x @ W^T as a batched product (`bmm`) of a batch of one, rather
    than folding x's leading dimensions into one matrix: x has 3 or more dimensions, all but its
    last two of size 1, rows, no gradient, and strides that do not fold (the test of `should_fold`
    in ATen's LinearAlgebra.cpp). A batch of several is left to torch: its one-matrix products
    can sum in another order than one product of all the rows (seen at in_features 4864)."""
    if x.dim() < 3 or x.numel() == 0 or x.requires_grad or any(n != 1 for n in x.shape[:-2]):
        return False
    size, stride = x.shape, x.stride()
    return any(stride[i] != stride[i + 1] * size[i + 1] for i in range(x.dim() - 2))


_flat: dict[str, str] = {}


def flat_rows_exact() -> bool:
    """Whether a bf16 product without bias gives the same bits from x flattened to [rows, in] as
    from torch's batched path on the strided x; checked once per process (`flat_check`)."""
    if "why" not in _flat:
        _flat["why"] = flat_check()
    return _flat["why"] == ""


def flat_status() -> str:
    """One line: whether unfoldable bf16 inputs run flat, and why not."""
    ok = flat_rows_exact()
    return "flat bf16 rows: on" if ok else f"flat bf16 rows: off ({_flat['why']})"


def _flat_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) with x flattened to [rows, in]: shape [..., out]."""
    return F.linear(x.reshape(-1, weight.shape[1]), weight).view(*x.shape[:-1], weight.shape[0])


def flat_check(flat: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _flat_linear) -> str:
    """'' when F.linear of a strided (unfoldable) bf16 input equals F.linear of it flattened to
    2-D bit for bit, for one row and for several, on weights of the model's widths whose fp32 sums
    reveal the order of their additions (`gemv.order_revealing`; their out_features leave a tail),
    and on inputs of ones, of huge values (sums overflow), of tiny ones (subnormal products) and
    holding inf and nan; else what differed. About 0.1 s (each shape compiles oneDNN kernels).
    `flat` is the product checked (tests hand in others)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k in (896, 4864):
            w = gemv.order_revealing(g, 549, k)[1].bfloat16()
            seq = torch.randn(1, 7, k, generator=g)  # row 0 left out: [:, 1:] is strided too
            seq[0, 2] = 3e38  # sums overflow to inf
            seq[0, 3] *= 1e-38  # subnormal products
            seq[0, 4, ::7] = float("inf")
            seq[0, 5, 5] = float("nan")
            seq[0, 6] = 1.0  # the order-revealing sums
            seq = seq.bfloat16()
            for strided in (seq[:, -1:], seq[:, 1:]):
                if not one_batch(strided):
                    return f"the case {tuple(strided.shape)} folds"
                theirs = F.linear(strided, w).view(torch.int16)
                ours = flat(strided, w).view(torch.int16)
                if not torch.equal(ours, theirs):
                    return (f"{int((ours != theirs).sum())} of {theirs.numel()} values differ, "
                            f"input {tuple(strided.shape)}, weight {tuple(w.shape)}")
    return ""


def _switch(model: torch.nn.Module, dtype: torch.dtype, cls: type[torch.nn.Linear]) -> int:
    """Switch every plain `nn.Linear` of `model` with `dtype` weights to `cls`; return how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == dtype:
            module.__class__ = cls
            count += 1
    return count


def upcast_prefill(model: torch.nn.Module) -> int:
    """Switch every plain bf16 `nn.Linear` of `model` to `UpcastPrefillLinear`; return how many.
    Builds and checks the one-row kernel now, so the first decode step does not wait for it."""
    gemv.kernel()
    flat_rows_exact()
    return _switch(model, torch.bfloat16, UpcastPrefillLinear)


def native_gemv(model: torch.nn.Module) -> int:
    """Switch every plain bf16 `nn.Linear` of `model` to `GemvLinear`; return how many.
    Runs the kernels' checks now, so the first prompt does not wait for them."""
    gemv.kernel()
    flat_rows_exact()
    return _switch(model, torch.bfloat16, GemvLinear)


ROWS_FIRST_MAX_ROWS = 64  # measured faster from 2 up to 64 rows; beyond, the plain kernel


class RowsFirstLinear(torch.nn.Linear):
    """An fp32 `nn.Linear` whose products of 2..64 rows run as (W @ x^T)^T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        if x.dtype != torch.float32 or not 2 <= rows <= ROWS_FIRST_MAX_ROWS or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)  # [rows, in]
        y = torch.mm(self.weight, flat.t()).t().contiguous()  # [out, rows] -> [rows, out]
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def rows_first(model: torch.nn.Module) -> int:
    """Switch every plain fp32 `nn.Linear` of `model` to `RowsFirstLinear`; return how many."""
    return _switch(model, torch.float32, RowsFirstLinear)
