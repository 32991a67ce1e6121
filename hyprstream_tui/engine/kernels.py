"""Linear layers that pick the faster kernel for the shape at hand.

On CPUs without native bf16 arithmetic (no AVX512-BF16 / AMX), PyTorch's bf16 matrix-matrix
product is several times slower than converting the weight to fp32 and using fp32 BLAS, while the
one-row product of a decode step is fastest in bf16 (it reads half the bytes). `UpcastPrefillLinear`
runs inputs of many rows (a prompt's prefill) in fp32 and rounds the result back to bf16; decode
steps keep the bf16 kernel. Both accumulate in fp32, so results agree to bf16 rounding.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UPCAST_MIN_ROWS = 16  # below this many rows, bf16 is as fast (measured: 2-core AVX2 EPYC)


class UpcastPrefillLinear(torch.nn.Linear):
    """An `nn.Linear` whose many-row bf16 products run in fp32 (same weights, same module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if x.dtype != torch.bfloat16 or x.numel() < UPCAST_MIN_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)


def upcast_prefill(model: torch.nn.Module) -> int:
    """Switch every plain bf16 `nn.Linear` of `model` to `UpcastPrefillLinear`; return how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
            module.__class__ = UpcastPrefillLinear
            count += 1
    return count
