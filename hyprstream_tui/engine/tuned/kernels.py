"""Linear layers that pick the faster kernel for the shape at hand.

On CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX), PyTorch's bf16 matrix-matrix
product is several times slower than converting the weight to fp32 and using fp32 BLAS, while the
one-row product of a decode step is fastest in bf16 (it reads half the bytes). `UpcastPrefillLinear`
runs inputs of many rows (a prompt's prefill) in fp32 and rounds the result back to bf16; decode
steps keep the bf16 kernel. Both accumulate in fp32, so results agree to bf16 rounding.
`GemvLinear` runs a one-row bf16 product (a decode step) through `engine.tuned.gemv`'s C kernel where
that kernel is available: torch's bits, read faster. `UpcastPrefillLinear` is one too.

`RowsFirstLinear` is for fp32 weights: for a few rows (a decode batch of a server, a short
prompt), MKL's x @ W^T runs several times slower than the same product written as (W @ x^T)^T
(measured on the 2-core AVX2 EPYC: the 151936-wide output layer at 4 rows 209 ms vs 55 ms, a
4864x896 MLP projection 4.8 ms vs 2.2 ms); one row keeps the plain kernel, so a single stream
computes exactly what transformers computes.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyprstream_tui.engine.tuned import gemv

UPCAST_MIN_ROWS = 16  # below this many rows, bf16 is as fast (measured: 2-core AVX2 EPYC)


class GemvLinear(torch.nn.Linear):
    """A bf16 `nn.Linear` whose one-row products run through `engine.tuned.gemv` where it is available
    (same bits as torch's kernel; see there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.numel() == self.in_features:
            native = gemv.kernel()
            if native is not None and native.fits(x, self.weight, self.bias):
                return native.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class UpcastPrefillLinear(GemvLinear):
    """A `GemvLinear` whose many-row bf16 products run in fp32 (same weights, same module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.dtype != torch.bfloat16 or x.numel() < UPCAST_MIN_ROWS * self.in_features:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)


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
    return _switch(model, torch.bfloat16, UpcastPrefillLinear)


def native_gemv(model: torch.nn.Module) -> int:
    """Switch every plain bf16 `nn.Linear` of `model` to `GemvLinear`; return how many."""
    gemv.kernel()
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
