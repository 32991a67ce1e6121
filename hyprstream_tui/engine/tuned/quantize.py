"""`--quantize int8`: int8 weights, one scale per output channel (symmetric, zero point 0).

Every `nn.Linear` (the output layer included) is replaced by a weight-only int8 layer,
`Int8WeightOnlyLinear`: a decode row goes through `aten._weight_int8pack_mm` (gpt-fast's int8
path; fp32 activations are rounded to bf16 for it, as torch's fp32 variant of the kernel is tens
of times slower), a prefill dequantizes the weight once for fp32 BLAS. Activations are never
quantized: fbgemm's dynamic int8 linear, used before, quantized them too, and on a real model
with outlier activations (SmolLM2-135M) that raised perplexity on a plain English passage from
12.9 to 83 (a whole-prompt forward) and to +19% token by token; weight-only int8 stays within
0.1% (tests/real).
The projections that read the same input (a layer's q/k/v, an MLP's gate/up) are quantized as one
weight, `FusedInt8`, and each projection's module (`Int8Part`) is a slice of its product: one
call where there were three (or two), rows, scales and results unchanged (tests), no weight
stored twice.
Norms and attention run in the activation dtype. The token embedding stays bf16 (a lookup reads
one row), which keeps a tied 150k-row table from doubling in fp32.

`--quantize int4` (tuned/quantize_int4.py) walks the model the same way (`quantize_int8` with its
own `make`) and falls back to this module's int8 layers where its kernel cannot apply.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import torch

from hyprstream_tui.engine.cpu import cpu_has_bf16
from hyprstream_tui.engine.tuned.kernels import UPCAST_MIN_ROWS
from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import Model


EMBED = "embed#bf16"  # the token embedding's bf16 table, in `Packs`


class Bf16Embedding(torch.nn.Module):
    """An embedding table kept in bf16 whose rows come out in the activation dtype.

    `scale` is the factor some architectures apply to every row (Gemma: sqrt(hidden size),
    transformers' `embed_scale`), applied in bf16 as transformers applies it in the table's dtype.
    """

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, scale: float | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.scale = None if scale is None else torch.tensor(scale, dtype=torch.bfloat16)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, S] -> [B, S, D]
        rows = torch.nn.functional.embedding(ids, self.weight)
        if self.scale is not None:
            rows = rows * self.scale
        return rows.to(self.dtype)


class Packs:
    """Quantized weights by module path: those `found` (the cache's, tuned/quant_cache.py) are
    taken as they are; those quantized here are kept in `made`, for the cache to store."""

    def __init__(self, found: Mapping[str, torch.Tensor] | None = None) -> None:
        self.found = found or {}
        self.made: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        q, s = self.found.get(f"{key}#q"), self.found.get(f"{key}#s")
        if q is None or s is None or tuple(q.shape) != shape or tuple(s.shape) != shape[:1] \
                or q.dtype != torch.int8 or s.dtype != torch.float32:
            return None
        return q, s

    def add(self, key: str, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self.made[f"{key}#q"], self.made[f"{key}#s"] = qweight, scales

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.found, **self.made}


def int8_linear(*linears: torch.nn.Linear, dtype: torch.dtype = torch.float32,
                packs: Packs | None = None, key: str = "") -> "Int8WeightOnlyLinear":
    """The int8 replacement for `linears` (their output rows in turn: one product for several
    projections of the same input), weights int8 per output channel; with `packs`, the weights
    under `key` are taken from it, or quantized and added to it."""
    shape = (sum(lin.out_features for lin in linears), linears[0].in_features)
    packed = packs.get(key, shape) if packs is not None else None
    if packed is None:
        # Rounded to bf16 first, whatever dtype the checkpoint holds: the same int8 weights
        # from an fp32 or a bf16 load, and from the cache.
        weight = torch.cat([lin.weight.detach().to(torch.bfloat16).float() for lin in linears])  # [out, in]
        packed = quantize_rows(weight)
        if packs is not None:
            packs.add(key, *packed)
    if all(lin.bias is None for lin in linears):
        bias = None
    else:
        bias = torch.cat([torch.zeros(lin.out_features) if lin.bias is None
                          else lin.bias.detach().float() for lin in linears])
    return Int8WeightOnlyLinear(packed, bias, dtype)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 weight [out, in], fp32 scales [out])."""
    weight = weight.detach().float()  # [out, in]
    scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)  # [out]
    qweight = (weight / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
    return qweight, scales


class FusedInt8(torch.nn.Module):
    """Projections of one input as one int8 product (a layer's q/k/v, an MLP's gate/up); `make`
    builds that product's layer (`int8_linear`, or int4's).

    Each projection is an `Int8Part` holding this module. The first part computes the whole
    product; the parts after it slice the same result when called with the same tensor (the
    layers of these architectures call them in turn with one input and never modify it in
    place); any other call computes anew. The last part lets the result go.
    """

    def __init__(self, linears: list[torch.nn.Linear], *, dtype: torch.dtype = torch.float32,
                 packs: Packs | None = None, key: str = "", make: Callable[..., torch.nn.Module] | None = None
                 ) -> None:
        super().__init__()
        self.linear = (make or int8_linear)(*linears, dtype=dtype, packs=packs, key=key)
        self.sizes = [lin.out_features for lin in linears]
        self.in_features = linears[0].in_features
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        last = self._last
        if index > 0 and last is not None and last[0] is x:
            y = last[1]
        else:
            y = self.linear(x)
        self._last = None if index == len(self.sizes) - 1 else (x, y)
        start = sum(self.sizes[:index])
        return y[..., start : start + self.sizes[index]]


class Int8Part(torch.nn.Module):
    """One projection of a `FusedInt8`: x -> its rows of the fused product."""

    def __init__(self, fused: FusedInt8, index: int) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.in_features = fused.in_features
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.fused.part(x, self.index)


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # projections of one input


def fuse_int8(model: torch.nn.Module, *, dtype: torch.dtype = torch.float32, packs: Packs | None = None,
              make: Callable[..., torch.nn.Module] | None = None) -> int:
    """Replace each group of `FUSED` projections (plain `nn.Linear`, same input size) by the
    parts of one `FusedInt8`; return how many groups."""
    count = 0
    for path, module in list(model.named_modules()):
        for names in FUSED:
            found = [getattr(module, name, None) for name in names]
            linears = [lin for lin in found if type(lin) is torch.nn.Linear]
            if len(linears) != len(names):
                continue
            if len({lin.in_features for lin in linears}) != 1:
                continue
            fused = FusedInt8(linears, dtype=dtype, packs=packs, key=f"{path}.{'+'.join(names)}", make=make)
            for index, name in enumerate(names):
                setattr(module, name, Int8Part(fused, index))
            count += 1
    return count


class Int8WeightOnlyLinear(torch.nn.Module):
    """y = x @ (int8 weight * per-row scale)^T + bias; x stays in its dtype (fp32, bf16, fp16)."""

    KEEPS_DTYPES = True  # `quantize_int8` leaves its buffers' dtypes as they are

    # Buffers (register_buffer), declared for the type checker only: no class attributes.
    weight_int8: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out]
    ones: torch.Tensor | None  # [out] bf16, for fp32 activations only
    bias: torch.Tensor | None  # [out]

    def __init__(self, weight: torch.Tensor | tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        """`weight`: a float [out, in] weight to quantize, or `quantize_rows`'s (int8, scales)."""
        super().__init__()
        qweight, scales = quantize_rows(weight) if isinstance(weight, torch.Tensor) else weight
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight_int8", qweight)  # [out, in]
        self.register_buffer("scales", scales.to(dtype))  # [out]
        # fp32 activations: the product runs in bf16 with unit scales, the fp32 scales after it
        self.register_buffer("ones", torch.ones_like(scales, dtype=torch.bfloat16) if dtype == torch.float32 else None)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)  # [N, in]
        if flat.shape[0] >= dequantize_rows():  # a long prefill: dequantize once, fp32 BLAS
            weight = self.weight_int8.float() * self.scales.float()[:, None]  # [out, in]
            y = torch.nn.functional.linear(flat.float(), weight).to(x.dtype)
        elif flat.dtype == torch.float32:  # torch's fp32 int8pack kernel is ~50x slower than its bf16 one
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight_int8, self.ones)
            y = y.float() * self.scales  # [N, out]
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def dequantize_rows() -> int:
    """From how many rows a product dequantizes its weight for fp32 BLAS rather than run torch's
    int8 kernel, whose bf16 arithmetic is slow without native bf16. Measured, 2 threads: on the
    AVX2 EPYC without it, from 16 rows; on an AVX512-BF16 EPYC the kernel stays ahead up to about
    128 rows (SmolLM2's fused gate/up, 3072x576, at 43 rows: 1.2 ms against 7.1 ms dequantized;
    at 512 rows 14 ms against 11 ms), which took SmolLM2's prefill of a 43-token chat prompt from
    156 ms to 94 ms there (median of 7; same greedy token, logits within 0.3: activations are
    rounded to bf16 for the kernel, as in every decode step)."""
    return 128 if cpu_has_bf16() else UPCAST_MIN_ROWS


def quantize_int8(model: Model, *, dtype: str = "float32", packs: Packs | None = None,
                  make: Callable[..., torch.nn.Module] | None = None, scheme: str = "int8") -> Model:
    """Quantize `model` in place (CPU) with activations in `dtype`, and return it. With `packs`,
    weights it holds are used as they are, and those quantized here are added to it. `make`
    builds each quantized layer (default `int8_linear`; `scheme` names it in errors)."""
    make = make or int8_linear
    act = getattr(torch, dtype)
    embed = model.get_input_embeddings()
    if not isinstance(embed, torch.nn.Embedding):  # a lookup table in every architecture transformers ships
        raise InvalidInput(f"`quantize` {scheme} needs a plain token embedding, this model has {type(embed).__name__}: "
                           "leave `quantize` out.")
    scale = getattr(embed, "embed_scale", None)  # Gemma scales every row
    table = packs.found.get(EMBED) if packs is not None else None
    if table is None or table.shape != embed.weight.shape or table.dtype != torch.bfloat16:
        table = embed.weight.detach().to(torch.bfloat16)
        if packs is not None:
            packs.made[EMBED] = table
    embedding = Bf16Embedding(table, padding_idx=embed.padding_idx, dtype=act,
                              scale=None if scale is None else float(scale))
    fuse_int8(model, dtype=act, packs=packs, make=make)
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                key = f"{path}.{name}" if path else name
                setattr(module, name, make(child, dtype=act, packs=packs, key=key))
                del child
    model.set_input_embeddings(embedding)
    del embed
    # Norms, biases and the like to the activation dtype, one at a time; the embedding stays bf16.
    for module in model.modules():
        if isinstance(module, Bf16Embedding):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != act:
                converted = torch.nn.Parameter(param.detach().to(act), requires_grad=False)
                setattr(module, name, converted)
        if getattr(module, "KEEPS_DTYPES", False):  # quantized layers: their buffers as they made them
            continue
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.dtype != act and "inv_freq" not in name:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buf.to(act), persistent=persistent)
    model.config.dtype = act
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads (int8 packed weights counted at 1 byte each)."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        total += tensor.numel() * tensor.element_size()
    return total
