"""Llama, Qwen2 and Mistral decoders in plain torch: transformers' computation, not its imports.

Importing transformers' modeling code costs about 2.6 s on this machine class before a weight is
read (torch._dynamo, torch.distributed.tensor, sympy, scipy come with it): more than the whole cold
answer of llama.cpp. These classes compute what transformers' `LlamaForCausalLM` computes (the same
operations in the same order and dtypes, so greedy tokens are the same; tests compare them), with:

- the same module names (`model.layers.N.self_attn.q_proj`, ...), so checkpoints load by name,
  PEFT injects LoRA layers into them and `engine.tuned` swaps their Linear layers as usual;
- a preallocated KV cache (`NativeCache`) written in place, so a decode step neither concatenates
  nor builds masks;
- the forward signature the engine calls (`input_ids`, `position_ids`, `cache`, `logits_to_keep`).

`NativeConfig.read` says what it covers: default rotary positions, SiLU MLPs, no sliding window
shorter than the context. Anything else loads through transformers (`engine.loader`).

Imports torch at module level: only the loader imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hyprstream_tui.engine.native.unsupported import Unsupported

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}
FIRST_CAPACITY = 512  # KV positions reserved at first; the cache doubles when it fills


@dataclass(kw_only=True)
class NativeConfig:
    """The part of config.json these classes read (`dtype`: the activations', once quantized)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    dtype: object = None

    @classmethod
    def read(cls, folder: Path) -> "NativeConfig":
        """The config of the model in `folder`; Unsupported where transformers must load it."""
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError, RecursionError) as exc:  # the loader words a bad file
            raise Unsupported(f"config.json: {type(exc).__name__}") from None
        if not isinstance(raw, dict):
            raise Unsupported("config.json is not an object")
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise Unsupported(f"model_type {model_type!r}")
        if raw.get("hidden_act", "silu") != "silu":
            raise Unsupported(f"hidden_act {raw.get('hidden_act')!r}")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise Unsupported(f"rotary scaling {rope!r}")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        window = raw.get("sliding_window")
        positions = int(raw.get("max_position_embeddings") or 2048)
        sliding = raw.get("use_sliding_window", model_type == "mistral")
        if window is not None and sliding and int(window) < positions:
            raise Unsupported(f"sliding window {window} < {positions} positions")
        if raw.get("layer_types") and any(t != "full_attention" for t in raw["layer_types"]):
            raise Unsupported("layers other than full attention")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta if theta is not None else 10000.0),
                max_position_embeddings=positions,
                tie_word_embeddings=bool(raw.get("tie_word_embeddings",
                                                 model_type != "mistral")),
                qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Unsupported(f"config.json: {type(exc).__name__}: {exc}") from None

    def get_text_config(self) -> "NativeConfig":
        return self


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


class Rotary(nn.Module):
    """cos/sin of the default rotary embedding, computed in float32 as transformers does."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta ** exponents), persistent=False)

    def forward(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, S] -> cos, sin: [B, 1, S, head_dim] in `like`'s dtype."""
        inv = self.inv_freq[None, :, None].float().expand(positions.shape[0], -1, 1)
        freqs = (inv @ positions[:, None, :].float()).transpose(1, 2)  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(like.dtype).unsqueeze(1), emb.sin().to(like.dtype).unsqueeze(1)


def linear(inputs: int, outputs: int, *, bias: bool) -> nn.Linear:
    """An `nn.Linear` with uninitialised weights: the checkpoint fills them. (`reset_parameters`
    would spend time on random values; building on the meta device instead makes torch import
    its compiler stack, about 0.7 s.)"""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = inputs, outputs
    layer.weight = nn.Parameter(torch.empty(outputs, inputs), requires_grad=False)
    if bias:
        layer.bias = nn.Parameter(torch.empty(outputs), requires_grad=False)
    else:
        layer.register_parameter("bias", None)
    return layer


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class NativeCache:
    """Per-layer keys and values, [1, KV, capacity, head_dim], written in place; doubles when full."""

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0  # positions filled (the same in every layer once a forward ends)

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([1, KV, S, hd]) at `start`; return every position so far."""
        end = start + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or keys.shape[2] < end:
            capacity = max(end, FIRST_CAPACITY, 2 * (keys.shape[2] if keys is not None else 0))
            new_k = k.new_empty((*k.shape[:2], capacity, k.shape[3]))
            new_v = v.new_empty((*v.shape[:2], capacity, v.shape[3]))
            if keys is not None and values is not None:
                new_k[:, :, :start] = keys[:, :, :start]
                new_v[:, :, :start] = values[:, :, :start]
            self.keys[layer], self.values[layer] = keys, values = new_k, new_v
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = hd ** -0.5
        self.q_proj = linear(d, config.num_attention_heads * hd, bias=config.qkv_bias)
        self.k_proj = linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.v_proj = linear(d, config.num_key_value_heads * hd, bias=config.qkv_bias)
        self.o_proj = linear(config.num_attention_heads * hd, d, bias=config.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: NativeCache,
                layer: int, start: int) -> torch.Tensor:
        b, s, _ = x.shape  # b == 1
        hd = self.head_dim
        q = self.q_proj(x).view(b, s, -1, hd).transpose(1, 2)  # [1, H, S, hd]
        k = self.k_proj(x).view(b, s, -1, hd).transpose(1, 2)  # [1, KV, S, hd]
        v = self.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        keys, values = cache.update(layer, start, k, v)
        groups = self.num_key_value_groups
        if start == 0 or s == 1:
            # As transformers' SDPA path without a mask: causal over the prompt, or one query
            out = F.scaled_dot_product_attention(q, keys, values, scale=self.scaling,
                                                 is_causal=s > 1, enable_gqa=groups > 1)
        else:  # a prompt continuing cached positions: an explicit mask, keys repeated
            total = start + s
            mask = torch.ones(s, total, dtype=torch.bool, device=x.device).tril(start)
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        out = out.transpose(1, 2).contiguous().reshape(b, s, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        d, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = linear(d, m, bias=bias)
        self.up_proj = linear(d, m, bias=bias)
        self.down_proj = linear(m, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.embed_tokens: nn.Module = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size))
        stack = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(stack)
        self.stack: list[DecoderLayer] = stack  # the same modules, typed
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config.head_dim, config.rope_theta)


@dataclass
class Output:
    logits: torch.Tensor


class NativeForCausalLM(nn.Module):
    """A decoder-only LM with transformers' parameter names and the engine's forward."""

    native = True  # the engine's own cache (`new_cache`), not transformers' DynamicCache

    def __init__(self, config: NativeConfig, generation: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.generation_config = SimpleNamespace(**(generation or {}))
        self.model = Decoder(config)
        self.lm_head = linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """The output layer reads the token embedding's table (tie_word_embeddings)."""
        weight = self.model.embed_tokens.weight
        assert isinstance(weight, nn.Parameter)
        self.lm_head.weight = weight

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, embedding: nn.Module) -> None:
        self.model.embed_tokens = embedding

    def load_adapter(self, path: str, *, adapter_name: str) -> None:
        """Inject the LoRA adapter in folder `path` as `adapter_name`, as transformers'
        `load_adapter` does for its models (PEFT's injection and state-dict loading)."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        config = LoraConfig.from_pretrained(path)
        inject_adapter_in_model(config, self, adapter_name=adapter_name)
        prefix = "base_model.model."
        weights = {k.removeprefix(prefix): v for k, v in load_peft_weights(path).items()}
        set_peft_model_state_dict(self, weights, adapter_name=adapter_name)
        peft_config = getattr(self, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config[adapter_name] = config

    def new_cache(self) -> NativeCache:
        return NativeCache(len(self.model.layers))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cache: NativeCache | None = None, logits_to_keep: int = 0,
                **_: Any) -> Output:
        """input_ids, position_ids: [1, S] -> logits [1, S or logits_to_keep, V]; `cache` grows."""
        if input_ids.shape[0] != 1:
            raise ValueError("the native decoder runs one sequence at a time")
        cache = cache if cache is not None else self.new_cache()
        start = cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + input_ids.shape[1],
                                        device=input_ids.device).unsqueeze(0)
        inner = self.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        for i, layer in enumerate(inner.stack):
            residual = hidden
            attn = layer.self_attn(layer.input_layernorm(hidden), cos, sin, cache, i, start)
            hidden = residual + attn
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        cache.length = start + input_ids.shape[1]
        hidden = inner.norm(hidden)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        return Output(logits=self.lm_head(hidden[:, keep, :]))


def build(config: NativeConfig, generation: dict[str, Any] | None) -> NativeForCausalLM:
    """The model's modules with uninitialised weights: `load_weights` fills them."""
    return NativeForCausalLM(config, generation)


def load_weights(model: NativeForCausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
                 ) -> None:
    """Move `tensors` (the checkpoint, by transformers' names) into `model`, cast to `dtype`
    (None: kept as they are)."""
    state = {k: v.to(dtype) if v.is_floating_point() and dtype is not None else v for k, v in tensors.items()}
    # bf16 weights widened to fp32: the fused step reads the checkpoint's bf16 rows instead, whose
    # products its fp32 rows' equal bit for bit, at half the bytes (`Linear.hs_bf16_weight`)
    narrow = {k: v for k, v in tensors.items()
              if dtype == torch.float32 and v.dtype == torch.bfloat16 and k.endswith(".weight")}
    if model.config.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        # A tied checkpoint may hold the table under either name (safetensors' `save_model` keeps
        # one of the names of a shared tensor)
        if head is not None and "model.embed_tokens.weight" not in state:
            state["model.embed_tokens.weight"] = head
            if "lm_head.weight" in narrow:
                narrow["model.embed_tokens.weight"] = narrow["lm_head.weight"]
        narrow.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")
               and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise Unsupported(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    for name, weight in narrow.items():
        try:
            module = model.get_submodule(name.removesuffix(".weight"))
        except AttributeError:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and weight.is_contiguous():
            module.hs_bf16_weight = weight  # a plain attribute: not in the state dict, never trained
    if model.config.tie_word_embeddings and hasattr(model.model.embed_tokens, "hs_bf16_weight"):
        model.lm_head.hs_bf16_weight = model.model.embed_tokens.hs_bf16_weight
    rotary = model.model.rotary_emb
    exponents = torch.arange(0, model.config.head_dim, 2, dtype=torch.int64).to(dtype=torch.float)
    rotary.inv_freq = 1.0 / (model.config.rope_theta ** (exponents / model.config.head_dim))


__all__ = ["NativeCache", "NativeConfig", "NativeForCausalLM", "Unsupported", "build", "load_weights"]
