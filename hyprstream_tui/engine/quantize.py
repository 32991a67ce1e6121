"""`--quantize int8`: int8 weights, one scale per output channel, on PyTorch's fbgemm kernels.

Every `nn.Linear` (the output layer included) becomes a dynamically quantized linear whose weight
is int8 with a per-row scale (symmetric, zero point 0); activations stay fp32 and are quantized
per call by the kernel. Norms and attention run in fp32. The token embedding stays bf16 (a row
lookup reads almost nothing), which keeps a tied 150k-row table from doubling in fp32.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

import warnings

import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear


class Bf16Embedding(torch.nn.Module):
    """An embedding table kept in bf16 whose rows come out fp32."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, S] -> [B, S, D] fp32
        return torch.nn.functional.embedding(ids, self.weight).float()


def int8_linear(linear: torch.nn.Linear) -> DynamicLinear:
    """A dynamic-quantized replacement for `linear`, weights int8 per output channel."""
    weight = linear.weight.detach().float()  # [out, in]
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()  # [out]
    zero_points = torch.zeros_like(scales, dtype=torch.long)  # [out]
    bias = None if linear.bias is None else linear.bias.detach().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager quantization moves to torchao
        qweight = torch.quantize_per_channel(
            weight, scales, zero_points, axis=0, dtype=torch.qint8
        )
        qlinear = DynamicLinear(linear.in_features, linear.out_features, dtype=torch.qint8)
    qlinear.set_weight_bias(qweight, bias)
    return qlinear


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Quantize `model` in place (CPU) and return it."""
    embed = model.get_input_embeddings()
    embedding = Bf16Embedding(embed.weight.detach(), padding_idx=embed.padding_idx)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, int8_linear(child))
                del child
    model.set_input_embeddings(embedding)
    del embed
    # Norms, biases and the like to fp32, one tensor at a time; the embedding stays bf16.
    for module in model.modules():
        if isinstance(module, Bf16Embedding):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != torch.float32:
                setattr(module, name, torch.nn.Parameter(param.detach().float(), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buf.float(), persistent=persistent)
    model.config.dtype = torch.float32
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads (int8 packed weights counted at 1 byte each)."""
    total = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            w, b = module._weight_bias()
            total += w.numel() + (0 if b is None else b.numel() * 4)
    for p in model.parameters():
        total += p.numel() * p.element_size()
    return total
