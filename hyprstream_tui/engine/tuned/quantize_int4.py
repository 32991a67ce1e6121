"""`--quantize int4`: 4-bit weights in groups of `GROUP` (32) along each row, asymmetric.

Each group of 32 input weights of an output row has a scale and a zero point (bf16):
w ~ (q - 8) * scale + zero, q in 0..15, from the group's min and max (llama.cpp's Q4_1 idea; the
scale and zero are rounded to bf16 first, then q is picked against the rounded pair). Products run
through torch's own CPU kernel, `aten._weight_int4pack_mm_for_cpu` (gpt-fast's and torchao's
int4 path), for decode rows and prompts alike: SmolLM2-135M prefills a 512-token prompt in 1.7 s
through it against 2.1 s in fp32 and 2.4 s int8 (a noisy 2-core machine), so there is no
dequantizing prefill path and no second copy of the weights. fp32 activations are rounded to bf16 for it (its fp32 variant is ~25x
slower, as with int8); fp16 activations run its fp16 variant.

The walk is int8's (`quantize.quantize_int8` with this module's `make`): the projections of one
input (q/k/v, gate/up) are one fused product, the token embedding stays bf16, norms run in the
activation dtype. Two kinds of layer stay int8 (quantize.py's layer):
- the output layer (llama.cpp's Q4_K_M keeps it at 6 or 8 bits too: Q8_0 for SmolLM2's tied table):
  on SmolLM2-135M, perplexity on tests/real's passage is +1.0% over fp32 with it int8, +8.4% int4;
- a layer the kernel does not fit: its output size must be a multiple of 16 and its input size a
  multiple of the group size (every other layer of SmolLM2-135M and the Qwen2.5 shapes fits).
Group size: 32. With 64, the same passage's perplexity rose 2.5x on SmolLM2 (whose weights come from
a Q4_1 GGUF, groups of 32: requantizing them in groups of 64 compounds the two roundings); the
kernel's speed differed by less than this machine's noise between the two.

Cached weights (tuned/quant_cache.py) are the portable form: the 4-bit values two to a byte, low
nibble first (uint8 [out, in/2]), and the scales and zeros (bf16 [in/GROUP, out, 2]). The kernel's
packed layout depends on the CPU it runs on (measured: torch's AVX2 and plain builds of the packing
lay the same values out differently), so it is made at every load (tens of milliseconds), never stored.

Imports torch at module level: only `loader.load_model` imports this module, lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from hyprstream_tui.engine.tuned.quantize import Packs, int8_linear, quantize_int8

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import Model

GROUP = 32  # input weights per scale and zero point (the kernel takes 32, 64, 128 or 256)
ROWS_MULTIPLE = 16  # the kernel's packing wants output sizes in multiples of 16


def fits(out_features: int, in_features: int, group: int = GROUP) -> bool:
    """Whether the int4 kernel applies to a weight of this shape."""
    return out_features % ROWS_MULTIPLE == 0 and in_features % group == 0


def quantize_groups(weight: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of `group` along each row of `weight` [out, in]: (the values, two
    to a byte, low nibble first: uint8 [out, in/2]; scales and zeros: bf16 [in/group, out, 2])."""
    out, inner = weight.shape
    grouped = weight.detach().float().reshape(out, inner // group, group)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [out, in/group]
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()  # the value of q = 8
    q = ((grouped - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    q = q.reshape(out, inner)
    nibbles = q[:, 0::2] | (q[:, 1::2] << 4)  # [out, in/2]
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return nibbles.contiguous(), scales_zeros


def unpack(nibbles: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of `quantize_groups`, one per int32: [out, in]."""
    return torch.stack([nibbles & 15, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1).to(torch.int32)


def dequantize(nibbles: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] that the int4 values and their groups' scales and zeros stand for."""
    q = unpack(nibbles).float()  # [out, in]
    out, inner = q.shape
    groups = scales_zeros.shape[0]
    scale, zero = scales_zeros.float().transpose(0, 1).unbind(-1)  # [out, in/group] each
    weight = (q.reshape(out, groups, -1) - 8) * scale[..., None] + zero[..., None]
    return weight.reshape(out, inner)


class Int4WeightOnlyLinear(torch.nn.Module):
    """y = x @ dequantize(int4 weight)^T + bias, through torch's int4 CPU kernel."""

    KEEPS_DTYPES = True  # `quantize_int8`'s walk leaves these buffers' dtypes as they are

    # Buffers (register_buffer), declared for the type checker only: no class attributes.
    nibbles: torch.Tensor  # quantize_groups' form (uint8 [out, in/2]), a plain attribute
    scales_zeros: torch.Tensor  # [in/group, out, 2] in the kernel's dtype
    bias: torch.Tensor | None  # [out] in the activation dtype

    def __init__(self, nibbles: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, group: int = GROUP) -> None:
        super().__init__()
        self.out_features, half = nibbles.shape
        self.in_features = 2 * half
        self.group = group
        self.kernel_dtype = torch.float16 if dtype == torch.float16 else torch.bfloat16
        # The portable form: `tuned.step`'s fused prompt and decode steps read it (from the cache's
        # memory map when the weights came from there); torch's kernel wants its own layout, packed
        # at the first product through torch (`packed`), so a model the fused step runs whole never
        # pays for it (4.8 s a load on the Qwen2.5-0.5B shape) nor holds it twice.
        self.nibbles = nibbles.contiguous()  # [out, in/2] uint8
        self._packed: torch.Tensor | None = None
        self.register_buffer("scales_zeros", scales_zeros.to(self.kernel_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @property
    def weight_int4(self) -> torch.Tensor:
        """torch's packed layout of the weight (uint8, CPU-dependent), made on first use."""
        packed = self._packed
        if packed is None:  # two threads may both pack: the same bytes, one kept
            packed = self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(self.nibbles), 1)
        return packed

    @property
    def is_packed(self) -> bool:
        """Whether torch's layout has been made (a product ran through torch's kernel)."""
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()  # [N, in]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group, self.scales_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _found(packs: Packs | None, key: str, shape: tuple[int, int], group: int
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    if packs is None:
        return None
    q, sz = packs.found.get(f"{key}#q4"), packs.found.get(f"{key}#sz")
    out, inner = shape
    if q is None or sz is None or tuple(q.shape) != (out, inner // 2) or q.dtype != torch.uint8 \
            or tuple(sz.shape) != (inner // group, out, 2) or sz.dtype != torch.bfloat16:
        return None
    return q, sz


def int4_linear(*linears: torch.nn.Linear, dtype: torch.dtype = torch.float32, packs: Packs | None = None,
                key: str = "", group: int = GROUP) -> torch.nn.Module:
    """The int4 replacement for `linears` (their output rows in turn, one product), or the int8
    one where the kernel does not fit the shape; with `packs`, weights under `key` are taken from
    it, or quantized and added to it."""
    shape = (sum(lin.out_features for lin in linears), linears[0].in_features)
    if not fits(*shape, group=group):
        return int8_linear(*linears, dtype=dtype, packs=packs, key=key)
    found = _found(packs, key, shape, group)
    if found is None:
        # Rounded to bf16 first, as int8 does: the same values from an fp32 or a bf16 load.
        weight = torch.cat([lin.weight.detach().to(torch.bfloat16).float() for lin in linears])  # [out, in]
        found = quantize_groups(weight, group)
        if packs is not None:
            packs.made[f"{key}#q4"], packs.made[f"{key}#sz"] = found
    if all(lin.bias is None for lin in linears):
        bias = None
    else:
        bias = torch.cat([torch.zeros(lin.out_features) if lin.bias is None
                          else lin.bias.detach().float() for lin in linears])
    return Int4WeightOnlyLinear(*found, bias, dtype, group)


def quantize_int4(model: Model, *, dtype: str = "float32", packs: Packs | None = None, group: int = GROUP) -> Model:
    """Quantize `model` in place (CPU) to int4 weights with activations in `dtype`, the output
    layer to int8, and return it; `packs` as for `quantize.quantize_int8`."""
    output = getattr(model, "get_output_embeddings", None)  # transformers' models; ours name it lm_head
    head = output() if callable(output) else getattr(model, "lm_head", None)
    int8_paths = {path for path, module in model.named_modules() if head is not None and module is head}

    def make(*linears: torch.nn.Linear, key: str = "", **kwargs: Any) -> torch.nn.Module:
        if key in int8_paths:
            return int8_linear(*linears, key=key, **kwargs)
        return int4_linear(*linears, key=key, group=group, **kwargs)

    return quantize_int8(model, dtype=dtype, packs=packs, make=make, scheme="int4")


def scheme(group: int = GROUP) -> str:
    """The cache's name for this scheme: the group size changes every weight."""
    return f"int4-g{group}"
