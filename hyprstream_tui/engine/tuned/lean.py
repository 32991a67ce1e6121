"""A lean decode step for Llama-shaped models: transformers' own layers, none of its glue.

A decode step through `model(...)` also pays for transformers' glue: the cache object
concatenates every layer's keys and values anew each step, masks are built and discarded, and
each layer goes through kwargs plumbing. On the Qwen2.5-0.5B shape in bf16 on this CPU that glue
is small next to torch's bf16 kernels (matrix products about two thirds of a step, attention a
sixth). Torch's one-row bf16 product is slow here, so `kernels.GemvLinear` runs it through
`engine.tuned.gemv`'s C kernel (torch's bits): `benchmarks/decode.py`, paired rounds, gives 1.37x
`generate` (1.32-1.49 over rounds; 1.34x and 1.45x in two other runs), 1.09x with torch's kernel.
`LeanDecoder` runs the same computation for one token at a time with:
- the model's own modules for everything that holds weights (norms, q/k/v/o projections, MLP,
  output layer), so int8 layers and LoRA adapters work unchanged;
- the same attention kernel transformers calls (SDPA, grouped heads without `repeat_kv`);
- a preallocated KV cache that grows by doubling, written in place.
Greedy tokens equal `generate`'s bit for bit (tests, and `benchmarks/decode.py` on the 0.5B
shape in bf16). Prefill still runs through `model(...)` (one call; its cache is copied in).

With `--quantize int8` the layer's q/k/v and gate/up parts share one product each
(`quantize.FusedInt8`): the step calls the parts, which slice it.

Covers the decoder layer transformers writes for Llama, Qwen2, Mistral and Gemma (pre-norm
attention + MLP, rotary positions); anything else, an attention implementation other than SDPA,
or a sequence longer than a sliding window, keeps the plain path (`LeanDecoder.build` -> None).

Imports torch at module level: only `engine.generate` imports this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCHITECTURES = frozenset({"llama", "qwen2", "mistral", "gemma"})
MLPS = frozenset({"LlamaMLP", "Qwen2MLP", "MistralMLP", "GemmaMLP"})  # down(act(gate(x)) * up(x))
FIRST_CAPACITY = 256  # positions reserved past the prompt before the first doubling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, the operations of transformers' `apply_rotary_pos_emb`."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class LeanDecoder:
    """Decode one token at a time for one sequence, after a prefill through `model(...)`."""

    def __init__(self, model, layers: list, cache, length: int, capacity: int) -> None:
        self.model = model
        self.inner = model.model
        self.layers = layers  # [(layer, attn, kv_heads, head_dim, groups)]
        self.length = length  # positions filled
        first = cache.layers[0].keys  # [1, kv_heads, length, head_dim]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, (_, _, kv_heads, head_dim, _) in enumerate(layers):
            shape = (1, kv_heads, capacity, head_dim)
            k = torch.empty(shape, dtype=first.dtype, device=first.device)
            v = torch.empty(shape, dtype=first.dtype, device=first.device)
            k[:, :, :length] = cache.layers[i].keys
            v[:, :, :length] = cache.layers[i].values
            self.keys.append(k)
            self.values.append(v)

    @classmethod
    def build(cls, model, cache, length: int, max_new: int) -> "LeanDecoder | None":
        """A decoder continuing `cache` (a prefill of `length` positions), or None where the
        plain path must run (the architecture or the sequence is one this step does not cover)."""
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if (
            config is None
            or getattr(config, "model_type", None) not in ARCHITECTURES
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or inner is None
            or not hasattr(inner, "layers")
            or len(getattr(cache, "layers", ())) != len(inner.layers)
        ):
            return None
        total = length + max_new
        model_window = getattr(config, "sliding_window", None) if config.model_type == "mistral" \
            else None
        layers = []
        for layer in inner.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None:
                return None
            window = getattr(attn, "sliding_window", None) or model_window
            if window is not None and total > window:
                return None
            groups = attn.num_key_value_groups
            layers.append((layer, attn, config.num_key_value_heads, attn.head_dim, groups))
        keys = cache.layers[0].keys
        if keys is None or keys.shape[0] != 1 or keys.shape[2] != length:
            return None
        capacity = length + min(max_new, FIRST_CAPACITY)
        return cls(model, layers, cache, length, capacity)

    def _grow(self) -> None:
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_empty((*old.shape[:2], 2 * old.shape[2], old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token: [1, 1] at position: [1, 1] (== self.length) -> logits of that position: [V]."""
        p = self.length
        if p == self.keys[0].shape[2]:
            self._grow()
        hidden = self.inner.embed_tokens(token)  # [1, 1, D]
        cos, sin = self.inner.rotary_emb(hidden, position)  # [1, 1, head_dim] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, 1, head_dim]
        for i, (layer, attn, _, head_dim, groups) in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.view(1, 1, -1, head_dim).transpose(1, 2)  # [1, H, 1, hd]
            k = k.view(1, 1, -1, head_dim).transpose(1, 2)  # [1, KV, 1, hd]
            v = v.reshape(1, 1, -1, head_dim).transpose(1, 2)  # [1, KV, 1, hd]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            keys, values = self.keys[i], self.values[i]
            keys[:, :, p : p + 1] = k
            values[:, :, p : p + 1] = v
            if groups > 1:
                out = F.scaled_dot_product_attention(
                    q, keys[:, :, : p + 1], values[:, :, : p + 1], scale=attn.scaling,
                    enable_gqa=True,
                )
            else:
                out = F.scaled_dot_product_attention(
                    q, keys[:, :, : p + 1], values[:, :, : p + 1], scale=attn.scaling
                )
            out = out.transpose(1, 2).reshape(1, 1, -1)  # [1, 1, H * hd]
            residual = residual + attn.o_proj(out)
            hidden = residual + layer.mlp(layer.post_attention_layernorm(residual))
        self.length = p + 1
        hidden = self.inner.norm(hidden)
        return self.model.lm_head(hidden)[0, -1]
