"""A whole decode step in one C call (`step.c`), and a prompt's tokens the same way, for the
engine's own model classes. On SmolLM2-135M (30 layers, 576 wide) a quantized decode step through
torch is some 600 operator calls, and their dispatch, not the weights' bytes, was most of its
time. `FusedStep` runs the same
step (embedding row, every layer, output layer) as one call into `step.c`: one OpenMP region, a
few barriers a layer, the KV cache written in place (`NativeCache`'s own tensors, so a prefill
through torch and the engine's prefix reuse see the same cache). `FusedStep.prefill` runs a
prompt's tokens (64 at a time, each weight vector converted once for three to five of them) with
each token's values exactly those of a step of its own: a prompt leaves the cache and logits its
tokens' steps would, bit for bit, wherever it was cut (int4 models then never make torch's
packed layout). Fused q/k/v and gate/up products are pointed at by rows, nothing is copied.

Where it applies (`FusedStep.build` -> None everywhere else, and torch's step runs):
- the engine's native classes (Llama, Qwen2, Mistral) on the CPU, without LoRA layers;
- by default models loaded with `--quantize int8` or `int4` (fp32 activations) and fp32 models.
  Quantized activations stay fp32 where torch's int8/int4 kernels round them to bf16, so the step
  is closer to the dequantized model than torch's step is (tests compare both with it). An fp32
  model's sums run in another order than torch's, some 1e-7 apart: 20 chat prompts of 128 greedy
  tokens on SmolLM2 gave `generate`'s tokens (`quantized` keeps torch's step, its bits, for fp32);
- bf16 models where they run exactly (`engine.tuned.exact`): torch's values bit for bit. Elsewhere
  only with `HYPRSTREAM_FUSED_STEP=all`: values rounded where torch rounds them, but sums in
  another order part greedy tokens from `generate`'s (16 of those 20 prompts, at tokens 0 to 92);
- Linux on x86-64 with AVX2 and FMA, a C compiler, `HYPRSTREAM_FUSED_STEP` not `0`, and the
  library's row products agreeing with torch's on the self-check (`self_check`, about 10 ms) at
  its first load in each process.

Imports torch at module level: only `engine.generate` imports this module.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from hyprstream_tui.engine.cpu import lowest_priority
from hyprstream_tui.engine.tuned import build
from hyprstream_tui.engine.tuned import exact as exact_mode
from hyprstream_tui.engine.tuned.exact import ptr
from hyprstream_tui.engine.tuned.build import BuildError
from hyprstream_tui.engine.tuned.step_abi import (  # noqa: F401 - the names tests and callers use
    BF16,
    ENV_SWITCH,
    EVERY,
    FLAGS,
    FP32,
    GROUP,
    INT4,
    INT8,
    MAX_HEAD_DIM,
    QUANTIZED,
    SOURCE,
    STEM,
    Layer,
    Lin,
    Spec,
    for_sequence,
    fused_kinds,
    mark_checked,
    open_library,
    scratch_floats,
)

FIRST_CAPACITY = 512  # positions of a cache this step allocates (it doubles when full), as NativeCache's


class Unfit(Exception):
    """The model is not one the fused step covers (the message says why)."""


def describe(module: Any, keep: list[torch.Tensor], rows: tuple[int, int] | None = None,
             runs: list[int] | None = None) -> Lin:
    """The `Lin` of a linear layer (int8, int4, fp32 or bf16), or of its output rows `rows`
    (start, count); tensors it points into go to `keep`, the layer's kind to `runs`. An fp32 layer
    widened from a bf16 checkpoint (`hs_bf16_weight`, the loader's) is read as those bf16 rows:
    `step.c` computes the same products from them, bit for bit, reading half the bytes."""
    from hyprstream_tui.engine.tuned.quantize import Int8WeightOnlyLinear
    from hyprstream_tui.engine.tuned.quantize_int4 import Int4WeightOnlyLinear

    bias = getattr(module, "bias", None)
    s: torch.Tensor | None
    if isinstance(module, Int8WeightOnlyLinear):
        w, s = module.weight_int8, module.scales
        if s.dtype != torch.float32:
            raise Unfit("int8 scales that are not fp32 (activations other than fp32)")
        kind = INT8
    elif isinstance(module, Int4WeightOnlyLinear):
        if module.group != GROUP or module.scales_zeros.dtype != torch.bfloat16:
            raise Unfit("int4 groups other than 32, or activations other than fp32")
        w = module.nibbles
        s = module.scales_zeros.transpose(0, 1).contiguous()  # [in/32, out, 2] -> [out, in/32, 2]
        kind = INT4
    elif isinstance(module, torch.nn.Linear) and module.weight.dtype in (torch.float32, torch.bfloat16):
        w, s = module.weight, None
        kind = FP32 if w.dtype == torch.float32 else BF16
    else:
        raise Unfit(f"a {type(module).__name__} layer")
    if runs is not None:
        runs.append(kind)
    narrow = getattr(module, "hs_bf16_weight", None) if kind == FP32 else None
    if narrow is not None and narrow.shape == w.shape and narrow.dtype == torch.bfloat16:
        w, kind = narrow, BF16
    if bias is not None:
        if bias.dtype not in (torch.float32, torch.bfloat16):
            raise Unfit("a bias that is not fp32 or bf16")
        bias = bias.detach().float().contiguous()  # a bf16 bias: its values, exactly
    out, inputs = module.out_features, module.in_features
    if inputs % GROUP or not w.is_contiguous() or w.device.type != "cpu":
        raise Unfit(f"a {out}x{inputs} layer")
    first, count = rows if rows is not None else (0, out)
    w = w[first : first + count]
    s = None if s is None else s[first : first + count]
    bias = None if bias is None else bias[first : first + count]
    keep.extend(t for t in (w, s, bias) if t is not None)
    return Lin(kind, count, inputs, ptr(w), ptr(s), ptr(bias))


def parts(module: Any, names: tuple[str, ...], sizes: list[int], keep: list[torch.Tensor],
          runs: list[int]) -> list[Lin]:
    """The `Lin`s of projections `names` of `module`: their rows of quantize's `FusedInt8`, or the
    layers themselves."""
    found: list[Any] = [getattr(module, name, None) for name in names]
    fused = getattr(found[0], "fused", None)
    if fused is None:
        lins = [describe(layer, keep, runs=runs) for layer in found]
    elif any(getattr(p, "fused", None) is not fused or p.index != i for i, p in enumerate(found)) \
            or list(fused.sizes) != sizes:
        raise Unfit(f"{'/'.join(names)} are not one fused product")
    else:
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        lins = [describe(fused.linear, keep, (a, n), runs) for a, n in zip(starts, sizes)]
    if [lin.out for lin in lins] != sizes or len({lin.inputs for lin in lins}) != 1:
        raise Unfit(f"{'/'.join(names)} do not have the model's sizes")
    return lins


class Described:
    """A model's weights as `step.c` reads them: made once per model (`described`), shared by its
    sequences. `keep` holds every tensor the structures point into."""

    def __init__(self, model: Any, exact: bool | None = None) -> None:
        """exact: pack a bf16 model to run as torch does (None: where `exact_refusal` allows)."""
        config = model.config
        inner = model.model
        self.keep: list[torch.Tensor] = []
        keep = self.keep
        runs: list[int] = []  # each layer's kind as the model holds it
        heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        if hd % 2 or hd > MAX_HEAD_DIM or heads % kv_heads:
            raise Unfit(f"head_dim {hd}, {heads} heads over {kv_heads}")
        d, ffn = config.hidden_size, config.intermediate_size
        layers = (Layer * len(inner.stack))()
        for i, layer in enumerate(inner.stack):
            attn, mlp = layer.self_attn, layer.mlp
            norms = tuple(n.weight.detach().float().contiguous()  # bf16 norms: their values, exactly
                          for n in (layer.input_layernorm, layer.post_attention_layernorm))
            keep.extend(norms)
            L = layers[i]
            L.q, L.k, L.v = parts(attn, ("q_proj", "k_proj", "v_proj"), [heads * hd, kv_heads * hd, kv_heads * hd],
                                  keep, runs)
            L.o = describe(attn.o_proj, keep, runs=runs)
            L.gate, L.up = parts(mlp, ("gate_proj", "up_proj"), [ffn, ffn], keep, runs)
            L.down = describe(mlp.down_proj, keep, runs=runs)
            L.ln1, L.ln2 = ptr(norms[0]), ptr(norms[1])
        embed = inner.embed_tokens
        table = embed.weight
        if getattr(embed, "scale", None) is not None or table.dtype not in (torch.bfloat16, torch.float32):
            raise Unfit("a scaled or non-bf16/fp32 embedding")
        widened = table.dtype == torch.float32 and getattr(embed, "hs_bf16_weight", None) is not None
        rows_of_table = embed.hs_bf16_weight if widened else table  # the same values, exactly
        norm = inner.norm.weight.detach().float().contiguous()
        inv_freq = inner.rotary_emb.inv_freq.float().contiguous()
        keep.extend((table, rows_of_table, norm, inv_freq))
        head = describe(model.lm_head, keep, runs=runs)
        self.layers = layers
        self.spec = Spec(
            layers=len(inner.stack), dim=d, heads=heads, kv_heads=kv_heads, head_dim=hd, ffn=ffn,
            vocab=config.vocab_size, capacity=0, threads=1, eps=config.rms_norm_eps,
            scale=hd ** -0.5, embed=ptr(rows_of_table), embed_f32=int(rows_of_table.dtype == torch.float32),
            norm=ptr(norm), inv_freq=ptr(inv_freq), head=head, layer=None, scratch=None)
        self.widest = max(d, heads * hd, ffn)
        self.kinds = frozenset(runs)  # the kinds of the model's layers (which the switch picks among)
        if BF16 in self.kinds and (self.kinds != {BF16} or table.dtype != torch.bfloat16):
            raise Unfit("bf16 layers beside layers of other kinds")
        # A bf16 model runs as torch runs it: bf16 values, bf16 KV cache (step.c's `bf16`)
        self.spec.bf16 = int(self.kinds == {BF16})
        self.rotary, self.rope_positions, self.rope_lock = inner.rotary_emb, 0, threading.Lock()
        self.exact = False  # computed as torch computes it, bit for bit (step.c's `exact`)
        if self.spec.bf16 and (_wants_exact() if exact is None else exact):
            exact_mode.pack(self, model, library())
            if self.exact:
                exact_mode.rope_for(self, FIRST_CAPACITY)


_described: "weakref.WeakKeyDictionary[Any, Described | Unfit]" = weakref.WeakKeyDictionary()
_making = threading.Lock()  # one Described made at a time (a pack copies a whole model)
_packing: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models being packed in the background


def described(model: Any) -> Described:
    """`model` described for `step.c` (once per model object); Unfit where it does not apply."""
    found = _described.get(model)
    if found is None:
        with _making:
            found = _described.get(model)
            if found is None:
                try:
                    found = Described(model)
                except (Unfit, AttributeError, TypeError) as exc:
                    found = exc if isinstance(exc, Unfit) else Unfit(f"{type(exc).__name__}: {exc}")
                _described[model] = found
    if isinstance(found, Unfit):
        raise found
    return found


def described_soon(model: Any) -> Described | None:
    """`described`, except that a bf16 model that packs (exact) is packed in a background thread (at
    the lowest priority) and None comes back meanwhile (`packing`): its steps run through torch."""
    if model not in _described and _packs(model):
        if model not in _packing:
            _packing.add(model)
            threading.Thread(target=_describe_quietly, args=(weakref.ref(model),), daemon=False,
                             name="hyprstream-pack").start()
        return None
    return described(model)


def packing(model: Any) -> bool:
    """Whether `model`'s weights are being packed in the background (`described_soon`)."""
    return model in _packing and model not in _described


def _wants_exact() -> bool:  # `quantized` keeps torch's bf16 step: no copy to make
    return os.environ.get(ENV_SWITCH, "1") in ("1", "all") and exact_refusal() == ""


def _packs(model: Any) -> bool:
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return getattr(model, "native", False) and head is not None and head.dtype == torch.bfloat16 and _wants_exact()


def _describe_quietly(ref: "weakref.ref[Any]") -> None:
    lowest_priority()  # the next model's load (a switch in the app) must not wait for the copy
    model = ref()
    if model is not None:
        try:
            described(model)
        except Unfit:
            pass


class FusedStep:
    """Decode steps of one sequence through `step.c`, continuing `cache` (a `NativeCache`)."""

    def __init__(self, lib: Any, model: Any, cache: Any, shape: "Described | None" = None) -> None:
        shape = shape or described(model)
        self._fn, self._prefill, self._every, self._floats = (lib.hs_step, lib.hs_prefill, lib.hs_prefill_every,
                                                              lib.hs_prefill_floats)
        self.model, self.cache, self.shape = model, cache, shape
        self.spec, self.layers = for_sequence(shape.spec, shape.layers)  # its own cache pointers
        self.spec.threads = max(1, torch.get_num_threads())
        self.widest = shape.widest
        if self.spec.exact:  # the query and attention output that torch's attention reads and writes
            s = self.spec
            self.lib, self.gqa = lib, s.heads != s.kv_heads
            self.q = torch.empty(1, s.heads, 1, s.head_dim, dtype=torch.bfloat16)
        self._attach()

    @classmethod
    def build(cls, model: Any, cache: Any, kinds: frozenset[int] | None = None,
              wait: bool = True) -> "FusedStep | None":
        """The fused step for `model` continuing `cache`, or None where torch's step must run.
        `kinds`: the weight kinds it may run; None: `fused_kinds()`. wait=False: None while the
        model is packed in the background (`packing`)."""
        if not getattr(model, "native", False) or getattr(cache, "keys", None) is None:
            return None
        lib = library()
        if lib is None:
            return None
        if any(hasattr(m, "lora_A") for m in model.modules()):
            return None  # LoRA layers: torch's step runs them
        try:
            shape = described(model) if wait else described_soon(model)
        except Unfit:
            return None
        if shape is None:
            return None
        allowed = fused_kinds() if kinds is None else kinds
        if kinds is None and shape.exact and os.environ.get(ENV_SWITCH, "1") == "1":
            allowed = allowed | {BF16}  # exact: torch's own bits, so it runs by default
        if not shape.kinds <= allowed:
            return None
        return cls(lib, model, cache)

    @property
    def exact(self) -> bool:
        """Steps equal torch's bit for bit (an exact bf16 model); prompts then run through torch."""
        return bool(self.spec.exact)

    def _attach(self) -> None:
        """Point the spec at the cache's tensors and a scratch buffer sized for its capacity (an
        empty cache gets its tensors here: a prompt can start through the step)."""
        keys, values = self.cache.keys, self.cache.values
        dtype = torch.bfloat16 if self.spec.bf16 else torch.float32
        if self.cache.length == 0 and all(k is None for k in (*keys, *values)):
            shape = (1, self.spec.kv_heads, FIRST_CAPACITY, self.spec.head_dim)
            for i in range(self.spec.layers):
                keys[i], values[i] = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        if any(k is None or k.dtype != dtype or not k.is_contiguous() for k in (*keys, *values)):
            raise Unfit(f"a KV cache that is not {dtype}")
        capacity = keys[0].shape[2]
        for i in range(self.spec.layers):
            self.layers[i].kc, self.layers[i].vc = keys[i].data_ptr(), values[i].data_ptr()
        s = self.spec
        s.capacity = capacity
        if s.exact:
            s.rope_cos, s.rope_sin, s.rope_positions = exact_mode.rope_for(self.shape, capacity)
        self.scratch = torch.empty(scratch_floats(s, self.widest), dtype=torch.float32)
        s.scratch = self.scratch.data_ptr()

    def _grow(self) -> None:
        cache = self.cache
        length = cache.length
        for store in (cache.keys, cache.values):
            for i, old in enumerate(store):
                new = old.new_empty((*old.shape[:2], 2 * old.shape[2], old.shape[3]))
                new[:, :, :length] = old[:, :, :length]
                store[i] = new
        self._attach()

    def _fit(self, positions: int) -> None:
        """Grow the cache (doubling) until it holds `positions`; re-point at it if it moved."""
        if positions > self.spec.capacity or self.cache.keys[0].data_ptr() != self.layers[0].kc:
            while positions > self.cache.keys[0].shape[2]:
                self._grow()
            self._attach()

    def prefill(self, tokens: torch.Tensor, position: int, every: bool = False) -> torch.Tensor:
        """The logits [V] (fp32) of the last of `tokens` [S] run from `position` (the cache's
        length) on; the cache grows by them all, holding what as many `step` calls leave, bit for bit.
        every: the logits [S, V] of each token, each its own step's (not for an exact model)."""
        count = int(tokens.numel())
        if position != self.cache.length:
            raise ValueError(f"position {position} is not the cache's length {self.cache.length}")
        if count == 1 and not every:  # one token (a prompt continuing a kept cache): a step, the same bits
            return self.step(int(tokens.reshape(-1)[0]), position)
        if self.spec.exact:  # torch's own prompt, whose cache and logits the steps continue exactly
            ids = tokens.reshape(1, -1).to(torch.int64)
            out = self.model(input_ids=ids, position_ids=torch.arange(position, position + count).unsqueeze(0),
                             cache=self.cache, logits_to_keep=1)
            self._fit(position + count)
            return out.logits[0, -1].float()
        self._fit(position + count)
        ids = tokens.reshape(-1).to(torch.int64).contiguous()
        work = torch.empty(int(self._floats(ctypes.byref(self.spec))), dtype=torch.float32)
        logits = torch.empty((count, self.spec.vocab) if every else self.spec.vocab, dtype=torch.float32)
        if (self._every if every else self._prefill)(ctypes.byref(self.spec), ids.data_ptr(), count, position,
                                                     logits.data_ptr(), work.data_ptr()) != 0:
            raise ValueError(f"a token of {ids.tolist()} is out of range, or position {position}")
        self.cache.length = position + count
        return logits

    def step(self, token: int, position: int) -> torch.Tensor:
        """The logits [V] (fp32) of `token` at `position` (the cache's length); the cache grows by it."""
        if position != self.cache.length:
            raise ValueError(f"position {position} is not the cache's length {self.cache.length}")
        self._fit(position + 1)
        logits = torch.empty(self.spec.vocab, dtype=torch.float32)
        if self.spec.exact:
            exact_mode.run_step(self, token, position, logits)
        elif self._fn(ctypes.byref(self.spec), token, position, logits.data_ptr()) != 0:
            raise ValueError(f"token {token} at position {position} is out of range")
        self.cache.length = position + 1
        return logits


_lock = threading.Lock()
_exact_lock = threading.Lock()  # held while the check loads the library (under _lock)
_state: dict[str, Any] = {}


def library() -> Any:
    """The checked library, built and loaded on first use; None where torch's step must run."""
    if _state.get("off"):
        return None
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"], _state["why"] = _load()
    return _state["lib"]


def exact_refusal() -> str:
    """Why a bf16 model cannot run exactly here ('' when it can; `engine.tuned.exact`): the
    platform's reason, or the library's, or what `exact.check` found (once per process)."""
    with _exact_lock:
        if "exact" not in _state:
            lib, built = library(), build.built(SOURCE, FLAGS, STEM)
            _state["exact"] = (exact_mode.refusal() or ("" if lib is not None else f"no library ({_state['why']})")
                               or exact_mode.check_once(lib, built, Described, FusedStep))
    why: str = _state["exact"]
    return why


def set_enabled(on: bool) -> None:
    """Turn the fused step off (torch's step everywhere) or back on, for this process."""
    _state["off"] = not on


def status() -> str:
    """One line: whether quantized decode steps run fused, and why not."""
    if _state.get("off"):
        return "fused decode step: off (turned off in this process)"
    lib = library()
    return "fused decode step: on" if lib is not None else f"fused decode step: off ({_state['why']})"


def compile_library() -> Path:
    """The compiled library's path, built now unless the home's cache holds it (BuildError)."""
    return build.library(SOURCE, FLAGS, STEM)


def _load() -> tuple[Any, str]:
    from hyprstream_tui.engine.tuned import step_abi

    why = step_abi.refusal()
    if why:
        return None, why
    try:
        lib = build.opened(SOURCE, FLAGS, STEM, open_library)
    except BuildError as exc:
        return None, str(exc)
    except (OSError, AttributeError) as exc:
        return None, f"cannot load the library: {exc}"
    bad = self_check(lib)
    if bad:
        return None, f"its results differ from torch's ({bad})"
    path = build.built(SOURCE, FLAGS, STEM)
    if path is not None:
        mark_checked(path)  # for engine.light, which cannot run the check without torch
    return lib, ""


def rows(lib: Any, lin: Lin, x: torch.Tensor) -> torch.Tensor:
    """lin's product with x [rows, in] through the library's row kernels (one thread)."""
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], lin.out, dtype=torch.float32)
    scratch = torch.empty(lin.inputs + lin.inputs // GROUP + 16, dtype=torch.float32)
    lib.hs_rows(ctypes.byref(lin), x.data_ptr(), x.shape[0], y.data_ptr(), scratch.data_ptr())
    return y


def self_check(lib: Any, product: Callable[[Lin, torch.Tensor], torch.Tensor] | None = None) -> str:
    """'' when each kind of row product (`product`, default: the library's) agrees with the same
    weights dequantized through torch (relative error under 1e-5), else what differed."""
    from hyprstream_tui.engine.tuned.quantize import Int8WeightOnlyLinear
    from hyprstream_tui.engine.tuned.quantize_int4 import Int4WeightOnlyLinear, dequantize, quantize_groups

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for out, inputs in ((48, 96), (64, 576)):
            w = torch.randn(out, inputs, generator=g) * 0.05
            x = torch.randn(3, inputs, generator=g) * 2
            bias = torch.randn(out, generator=g)
            dense = torch.nn.Linear(inputs, out)
            dense.weight.copy_(w)
            dense.bias.copy_(bias)
            int8 = Int8WeightOnlyLinear(w, bias, torch.float32)
            nibbles, sz = quantize_groups(w)
            int4 = Int4WeightOnlyLinear(nibbles, sz, bias, torch.float32)
            half = torch.nn.Linear(inputs, out).to(torch.bfloat16)
            half.weight.copy_(w)
            half.bias.copy_(bias)
            xb = x.bfloat16().float()  # bf16 models' inputs are bf16 values
            cases = (
                ("bf16", half, half.weight.float()),
                ("fp32", dense, w),
                ("int8", int8, int8.weight_int8.float() * int8.scales[:, None]),
                ("int4", int4, dequantize(nibbles, sz)),
            )
            for name, module, weight in cases:
                keep: list[torch.Tensor] = []
                lin = describe(module, keep)
                xi = xb if name == "bf16" else x
                ours = product(lin, xi) if product is not None else rows(lib, lin, xi)
                want = (xi.double() @ weight.double().T + bias.bfloat16().double() if name == "bf16"
                        else xi.double() @ weight.double().T + bias.double()).float()
                err = float((ours - want).abs().max() / want.abs().max())
                if not err < 1e-5:
                    return f"{name} {out}x{inputs}: relative error {err:.2g}"
    return ""


__all__ = ["FusedStep", "Unfit", "library", "self_check", "set_enabled", "status"]
