"""A whole decode step in one C call (`step.c`), and a prompt's tokens the same way, for the
engine's own model classes.

On SmolLM2-135M (30 layers, 576 wide) a quantized decode step through torch is some 600 operator
calls, and their dispatch, not the weights' bytes, was most of its time. `FusedStep` runs the same
step (embedding row, every layer, output layer) as one call into `step.c`: one OpenMP region, a
few barriers a layer, the KV cache written in place (`NativeCache`'s own tensors, so a prefill
through torch and the engine's prefix reuse see the same cache). `FusedStep.prefill` runs a
prompt's tokens (64 at a time, each weight vector converted once for three to five of them) with
each token's values exactly those of a step of its own: a prompt leaves the cache and logits its
tokens' steps would, bit for bit, wherever it was cut. The engine runs a fused model's prompts
there (int4 models then never make torch's packed layout). The projections of one input
(q/k/v, gate/up) stay where they are: fused ones are pointed at by rows, nothing is copied.

Where it applies (`FusedStep.build` -> None everywhere else, and torch's step runs):
- the engine's native classes (`engine.native`: Llama, Qwen2, Mistral) on the CPU, without LoRA
  layers;
- by default models loaded with `--quantize int8` or `int4` (fp32 activations) and fp32 models.
  Quantized activations stay fp32 where torch's int8/int4 kernels round them to bf16, so the step
  is closer to the dequantized model than torch's step is (tests compare both with it). An fp32
  model's sums run in another order than torch's kernels, some 1e-7 apart, so a greedy token could
  leave transformers' `generate` only at a tie within that; on SmolLM2-135M, 20 chat prompts of
  128 greedy tokens gave `generate`'s tokens every time (`HYPRSTREAM_FUSED_STEP=quantized` keeps
  torch's step, `generate`'s bits, for fp32);
- bf16 models with `HYPRSTREAM_FUSED_STEP=all` only: bf16 values and a bf16 KV cache, rounded
  where torch rounds them, but a sum in another order can move a value by one bf16 rounding step,
  enough to part greedy tokens from `generate`'s (in 16 of those 20 prompts, at tokens 0 to 92);
  torch's own step keeps them equal;
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

from hyprstream_tui.engine.tuned import build
from hyprstream_tui.engine.tuned.build import BuildError

from hyprstream_tui.engine.tuned.step_abi import (  # noqa: F401 - the names tests and callers use
    BF16,
    BF16_PACKED,
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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    return Lin(kind, count, inputs, _ptr(w), _ptr(s), _ptr(bias))


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


SUM_LANES = 8  # fp32 lanes of torch's sum kernel (its AVX2 build runs on AVX512 CPUs too)
XROWS = 64  # rows of a packed block (step.c's XROWS)


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


def _huge_pages(count: int) -> torch.Tensor:
    """An empty bf16 tensor of `count` values, 2 MiB aligned and, where the kernel allows, backed by
    huge pages (madvise before the first touch): a step streams these weights once a token, and
    with 4 KiB pages it read them at two thirds of the speed of a checkpoint's mapped file here."""
    raw = torch.empty(count * 2 + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    view = raw[start : start + count * 2]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        length = (count * 2 + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        libc.madvise(ctypes.c_void_p(view.data_ptr()), ctypes.c_size_t(min(length, raw.numel() - start)),
                     MADV_HUGEPAGE)  # advice only: a refusal leaves ordinary pages
    except (OSError, AttributeError):
        pass
    return view.view(torch.bfloat16)


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """bf16 rows [out, in] (out a multiple of 16) as `step.c`'s kind 5: blocks of 64 rows (the
    last may hold fewer), each [in / 2][rows][2], the pairs VDPBF16PS reads for 16 rows at once."""
    out, inputs = w.shape
    w = w.contiguous()
    packed = _huge_pages(out * inputs)
    lib = library()
    if lib is not None:
        lib.hs_pack_rows(w.data_ptr(), out, inputs, packed.data_ptr(), max(1, torch.get_num_threads()))
        return packed
    for first in range(0, out, XROWS):  # the same, in torch (tests compare the two)
        rows = min(XROWS, out - first)
        block = w[first : first + rows].reshape(rows, inputs // 2, 2).transpose(0, 1)
        packed[first * inputs : (first + rows) * inputs].view(inputs // 2, rows, 2).copy_(block)
    return packed


def _packed(module: Any, keep: list[torch.Tensor]) -> Lin:
    w = pack_rows(module.weight.detach())
    bias = module.bias
    bias = None if bias is None else bias.detach().float().contiguous()
    keep.extend(t for t in (w, bias) if t is not None)
    return Lin(BF16_PACKED, module.out_features, module.in_features, _ptr(w), None, _ptr(bias))


def exact_refusal() -> str:
    """Why a bf16 model cannot run fused bit for bit as torch runs it here ('' when it can): it
    needs a CPU with AVX512-BF16, torch's bf16 products through oneDNN and its AVX512 kernels, and
    whole steps equal to torch's on a small model (`exact_check`, once per process)."""
    if "exact" not in _state:
        with _lock:
            if "exact" not in _state:
                _state["exact"] = _exact_why()
    why: str = _state["exact"]
    return why


def _exact_why() -> str:
    from hyprstream_tui.engine.tuned.step_abi import cpu_flags

    if not {"avx512f", "avx512_bf16"} <= cpu_flags():
        return "the CPU lacks AVX512-BF16"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "torch's bf16 products are not oneDNN's"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"torch runs its {capability} kernels"
    lib = library()
    if lib is None:
        return "the library does not run here"
    return exact_check(lib)


def exact_check(lib: Any) -> str:
    """'' when the norms' sums of squares equal torch's (fp32, bit for bit, over sizes whose
    cascades differ) and exact steps of a small random bf16 model (grouped heads, q/k/v bias, an
    ffn past 512) equal torch's bit for bit: logits and KV cache, after a prompt through torch;
    else what differed."""
    from hyprstream_tui.engine.native.model import NativeConfig, build, load_weights

    g = torch.Generator().manual_seed(0)
    for n in (64, 576, 896, 1000, 4096, 8192):
        for _ in range(4):
            h = (torch.randn(n, generator=g) * 4).bfloat16().float()
            want = h.pow(2).mean(-1)
            got = torch.tensor(lib.hs_sum_squares(h.data_ptr(), n, SUM_LANES), dtype=torch.float32) / n
            if not torch.equal(got, want):
                return f"a norm's mean square of {n} values differs ({float(got)!r} against {float(want)!r})"

    config = NativeConfig(model_type="qwen2", vocab_size=320, hidden_size=128, intermediate_size=608,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                          tie_word_embeddings=True, qkv_bias=True, o_bias=False, mlp_bias=False)
    model = build(config, None)
    tensors = {name: (1.0 + 0.1 * torch.randn(t.shape, generator=g) if "norm" in name
                      else torch.randn(t.shape, generator=g) * 0.08).bfloat16()
               for name, t in model.state_dict().items() if name != "lm_head.weight"}
    load_weights(model, tensors, torch.bfloat16)
    shape = Described(model, exact=True)
    if not shape.exact:
        return "the check's model did not pack"
    ids = torch.randint(0, config.vocab_size, (1, 7), generator=g)
    with torch.inference_mode():
        theirs, ours = model.new_cache(), model.new_cache()
        model(ids, cache=theirs)
        model(ids, cache=ours)
        fused = FusedStep(lib, model, ours, shape)
        token = 5
        for pos in range(7, 12):
            want = model(torch.tensor([[token]]), cache=theirs).logits[0, -1].float()
            got = fused.step(token, pos)
            if not torch.equal(got, want):
                return f"step at position {pos}: logits differ by up to {float((got - want).abs().max()):.3g}"
            token = int(want.argmax())
        for a, b in zip(theirs.keys + theirs.values, ours.keys + ours.values):
            if not torch.equal(a[:, :, :12], b[:, :, :12]):
                return "the KV cache differs"
    return ""


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
            L.ln1, L.ln2 = _ptr(norms[0]), _ptr(norms[1])
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
            scale=hd ** -0.5, embed=_ptr(rows_of_table), embed_f32=int(rows_of_table.dtype == torch.float32),
            norm=_ptr(norm), inv_freq=_ptr(inv_freq), head=head, layer=None, scratch=None)
        self.widest = max(d, heads * hd, ffn)
        self.kinds = frozenset(runs)  # the kinds of the model's layers (which the switch picks among)
        if BF16 in self.kinds and (self.kinds != {BF16} or table.dtype != torch.bfloat16):
            raise Unfit("bf16 layers beside layers of other kinds")
        # A bf16 model runs as torch runs it: bf16 values, bf16 KV cache (step.c's `bf16`)
        self.spec.bf16 = int(self.kinds == {BF16})
        self.rotary, self.rope_positions = inner.rotary_emb, 0
        self.exact = False  # computed as torch computes it, bit for bit (step.c's `exact`)
        if self.spec.bf16 and (exact_refusal() == "" if exact is None else exact):
            self._pack(model)

    def _pack(self, model: Any) -> None:
        """Make this bf16 model exact (`step.c`'s `step_exact`): its weights packed as oneDNN's
        AVX512-BF16 products read them (a copy, the model's own rows stay torch's), torch's silu of
        every bf16 value and its rotary cos/sin, tabled. Leaves it inexact where its shapes do not
        fit (a head_dim not a multiple of 16, an ffn not of 32, rows not of 16)."""
        config, inner, spec = model.config, model.model, self.spec
        if config.head_dim % 16 or config.intermediate_size % 32:
            return
        modules = [model.lm_head] + [m for layer in inner.stack for m in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        if any(m.weight.dtype != torch.bfloat16 or m.out_features % 16 for m in modules):
            return
        keep = self.keep
        with torch.inference_mode():
            lins = [_packed(m, keep) for m in modules]
            spec.head = lins[0]
            for i in range(len(inner.stack)):
                L = self.layers[i]
                L.q, L.k, L.v, L.o, L.gate, L.up, L.down = lins[1 + 7 * i : 8 + 7 * i]
            every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
            silu = torch.nn.functional.silu(every).view(torch.int16).contiguous()
        keep.append(silu)
        spec.silu = _ptr(silu)
        spec.sum_lanes = SUM_LANES
        spec.exact = 1
        self.exact = True
        self.rope_for(FIRST_CAPACITY)

    def rope_for(self, positions: int) -> None:
        """Table torch's rotary cos and sin (bf16 values) for positions 0..`positions` - 1 at least
        (doubling; the tables a sequence's spec points at stay alive in `keep`)."""
        if positions <= self.rope_positions:
            return
        n = max(positions, 2 * self.rope_positions)
        half = self.spec.head_dim // 2
        with torch.inference_mode():
            cos, sin = self.rotary(torch.empty(0, dtype=torch.bfloat16), torch.arange(n).unsqueeze(0))
        tables = [t[0, 0, :, :half].float().contiguous() for t in (cos, sin)]
        self.keep.extend(tables)
        self.spec.rope_cos, self.spec.rope_sin = _ptr(tables[0]), _ptr(tables[1])
        self.spec.rope_positions = self.rope_positions = n


_described: "weakref.WeakKeyDictionary[Any, Described | Unfit]" = weakref.WeakKeyDictionary()


def described(model: Any) -> Described:
    """`model` described for `step.c` (once per model object); Unfit where it does not apply."""
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


class FusedStep:
    """Decode steps of one sequence through `step.c`, continuing `cache` (a `NativeCache`)."""

    def __init__(self, lib: Any, model: Any, cache: Any, shape: "Described | None" = None) -> None:
        shape = described(model) if shape is None else shape
        self._fn, self._prefill, self._floats = lib.hs_step, lib.hs_prefill, lib.hs_prefill_floats
        self.model, self.cache, self.shape = model, cache, shape
        self.spec, self.layers = for_sequence(shape.spec, shape.layers)  # its own cache pointers
        self.spec.threads = max(1, torch.get_num_threads())
        self.widest = shape.widest
        if self.spec.exact:  # the query and attention output that torch's attention reads and writes
            s = self.spec
            self._begin, self._layer = lib.hs_exact_begin, lib.hs_exact_layer
            self._q = torch.empty(1, s.heads, 1, s.head_dim, dtype=torch.bfloat16)
            self._gqa = s.heads != s.kv_heads
        self._attach()

    @classmethod
    def build(cls, model: Any, cache: Any, kinds: frozenset[int] | None = None) -> "FusedStep | None":
        """The fused step for `model` continuing `cache`, or None where torch's step must run.
        `kinds`: the weight kinds it may run; None: `fused_kinds()`."""
        if not getattr(model, "native", False) or getattr(cache, "keys", None) is None:
            return None
        lib = library()
        if lib is None:
            return None
        if any(hasattr(m, "lora_A") for m in model.modules()):
            return None  # LoRA layers: torch's step runs them
        try:
            shape = described(model)
        except Unfit:
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
            self.shape.rope_for(capacity)
            base = self.shape.spec
            s.rope_cos, s.rope_sin, s.rope_positions = base.rope_cos, base.rope_sin, base.rope_positions
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

    def prefill(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """The logits [V] (fp32) of the last of `tokens` [S] run from `position` (the cache's
        length) on; the cache grows by them all, holding what as many `step` calls leave, bit for bit."""
        count = int(tokens.numel())
        if position != self.cache.length:
            raise ValueError(f"position {position} is not the cache's length {self.cache.length}")
        if self.spec.exact:  # torch's own prompt, whose cache and logits the steps continue exactly
            ids = tokens.reshape(1, -1).to(torch.int64)
            out = self.model(input_ids=ids, position_ids=torch.arange(position, position + count).unsqueeze(0),
                             cache=self.cache, logits_to_keep=1)
            self._fit(position + count)
            return out.logits[0, -1].float()
        self._fit(position + count)
        ids = tokens.reshape(-1).to(torch.int64).contiguous()
        work = torch.empty(int(self._floats(ctypes.byref(self.spec))), dtype=torch.float32)
        logits = torch.empty(self.spec.vocab, dtype=torch.float32)
        if self._prefill(ctypes.byref(self.spec), ids.data_ptr(), count, position, logits.data_ptr(),
                         work.data_ptr()) != 0:
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
            self._exact_step(token, position, logits)
        elif self._fn(ctypes.byref(self.spec), token, position, logits.data_ptr()) != 0:
            raise ValueError(f"token {token} at position {position} is out of range")
        self.cache.length = position + 1
        return logits

    def _exact_step(self, token: int, position: int, logits: torch.Tensor) -> None:
        """An exact model's step: `step.c`'s parts, each layer's attention between them through
        torch's own kernel, called as torch's step calls it (on the cache's views)."""
        spec, q, cache = ctypes.byref(self.spec), self._q, self.cache
        attention, scale = torch.nn.functional.scaled_dot_product_attention, self.spec.head_dim ** -0.5
        end = position + 1
        if self._begin(spec, token, position, q.data_ptr()) != 0:
            raise ValueError(f"token {token} at position {position} is out of range")
        for i in range(self.spec.layers):
            out = attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end], scale=scale,
                            enable_gqa=self._gqa).contiguous()
            self._layer(spec, i, position, out.data_ptr(), q.data_ptr(), logits.data_ptr())


_lock = threading.RLock()  # exact_refusal loads the library while holding it
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
