"""The fused step's exact bf16 mode: a bf16 model's decode step computed as torch computes it, bit for
bit, so bf16 keeps greedy parity with transformers' `generate` and still runs fused (`step.c`'s
`hs_exact_begin` / `hs_exact_layer`, whose comment says what each sum does).

Where: a CPU with AVX512-BF16 whose torch runs its AVX512 kernels and its bf16 products through
oneDNN (the orders `step.c` reproduces are those), and a check at first use in each process
(`check`): the norms' sums against torch's, and whole steps of a small random model against
torch's step, bit for bit. Elsewhere `refusal` says why, and bf16 models keep torch's step (or,
with `HYPRSTREAM_FUSED_STEP=all`, the inexact fused one).

What it holds per model (`pack`): every weight packed as VDPBF16PS reads it (a copy beside
torch's own rows, which prompts, LoRA and the server's batches use), on huge pages where the
kernel gives them; torch's silu of every bf16 value; the rotary tables (`step.Described.rope_for`).
Each layer's attention is torch's own kernel on the cache, called between the step's C parts
(`step.FusedStep`): its sums' orders depend on the context's length in ways not reproduced here.

Imports torch at module level; `step` (which asks `refusal` and runs `check` once per process)
hands it the library and its classes, so this module does not import `step`.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import torch

from hyprstream_tui.engine.tuned import aoti
from hyprstream_tui.engine.tuned.exact_run import SUM_LANES
from hyprstream_tui.engine.tuned.step_abi import BF16_PACKED, Lin, cpu_flags, exact_marker, this_cpu
from hyprstream_tui.store.atomic import tmp_name


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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


def pack_rows(w: torch.Tensor, lib: Any) -> torch.Tensor:
    """bf16 rows [out, in] (out a multiple of 16) as `step.c`'s kind 5: blocks of 64 rows (the
    last may hold fewer), each [in / 2][rows][2], the pairs VDPBF16PS reads for 16 rows at once."""
    out, inputs = w.shape
    w = w.contiguous()
    packed = _huge_pages(out * inputs)
    if lib is not None:
        lib.hs_pack_rows(w.data_ptr(), out, inputs, packed.data_ptr(), max(1, torch.get_num_threads()))
        return packed
    for first in range(0, out, XROWS):  # the same, in torch (tests compare the two)
        rows = min(XROWS, out - first)
        block = w[first : first + rows].reshape(rows, inputs // 2, 2).transpose(0, 1)
        packed[first * inputs : (first + rows) * inputs].view(inputs // 2, rows, 2).copy_(block)
    return packed


def packed(module: Any, keep: list[torch.Tensor], lib: Any, rows: torch.Tensor | None = None) -> Lin:
    """The kind-5 `Lin` of a bf16 linear layer: its rows packed (or `rows`, packed already), its
    bias as fp32 values."""
    w = pack_rows(module.weight.detach(), lib) if rows is None else rows
    bias = module.bias
    bias = None if bias is None else bias.detach().float().contiguous()
    keep.extend(t for t in (w, bias) if t is not None)
    return Lin(BF16_PACKED, module.out_features, module.in_features, ptr(w), None, ptr(bias))


def refusal() -> str:
    """Why this machine's torch cannot be reproduced here ('' when it may be, subject to `check`):
    it needs a CPU with AVX512-BF16, torch's bf16 products through oneDNN, and its AVX512 kernels."""
    if not {"avx512f", "avx512_bf16"} <= cpu_flags():
        return "the CPU lacks AVX512-BF16"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "torch's bf16 products are not oneDNN's"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"torch runs its {capability} kernels"
    return ""


def check(lib: Any, described: Any, fused: Any) -> str:
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
    shape = described(model, exact=True)
    if not shape.exact:
        return "the check's model did not pack"
    ids = torch.randint(0, config.vocab_size, (1, 7), generator=g)
    with torch.inference_mode():
        theirs, ours = model.new_cache(), model.new_cache()
        model(ids, cache=theirs)
        model(ids, cache=ours)
        fused = fused(lib, model, ours, shape)
        token = 5
        for pos in range(7, 12):
            want = model(torch.tensor([[token]]), cache=theirs).logits[0, -1].float()
            got = fused.step(token, pos)
            if not torch.equal(got, want):
                return f"step at position {pos}: logits differ by up to {float((got - want).abs().max()):.3g}"
            token = int(want.argmax())
        for a, b in zip(theirs.keys + theirs.values, ours.keys + ours.values):
            if a is None or b is None or not torch.equal(a[:, :, :12], b[:, :, :12]):
                return "the KV cache differs"
    return ""


def mark_text() -> str:
    """What a passed check is remembered for: this CPU, this torch and its kernels, the orders."""
    return f"{this_cpu()} {torch.__version__} {torch.backends.cpu.get_cpu_capability()} {SUM_LANES} {SCHEME}"


def check_once(lib: Any, path: Path | None, described: Any, fused: Any) -> str:
    """`check`, skipped where it passed before for this library (`path`), CPU and torch: a marker
    beside the library says so (its first run in a process costs a cold call some 0.3 s of torch's
    first products)."""
    marker = None if path is None else exact_marker(path)
    mark = mark_text()
    try:
        if marker is not None and marker.read_text() == mark:
            return ""
    except OSError:
        pass
    why = check(lib, described, fused)
    if not why and marker is not None:
        try:
            tmp = tmp_name(marker)
            tmp.write_text(mark)
            os.replace(tmp, marker)
        except OSError:
            pass
    return why


def pack(shape: Any, model: Any, lib: Any) -> None:
    """Make the bf16 model `shape` (a `step.Described`) describes exact: its weights packed as oneDNN's AVX512-BF16
    products read them (a copy; the model's own rows stay torch's), torch's silu of every bf16
    value tabled; the caller tables the rotary cos/sin (`Described.rope_for`). Leaves it inexact
    where its shapes do not fit (a head_dim not a multiple of 16, an ffn not of 32, rows not of 16)."""
    config, inner, spec = model.config, model.model, shape.spec
    if config.head_dim % 16 or config.intermediate_size % 32:
        return
    modules = [model.lm_head] + [m for layer in inner.stack for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    if any(m.weight.dtype != torch.bfloat16 or m.out_features % 16 for m in modules):
        return
    keep = shape.keep
    with torch.inference_mode():
        made = _cached(model, modules)
        rows = made if made is not None else [pack_rows(m.weight.detach(), lib) for m in modules]
        if made is None:
            _store(model, rows)
        lins = [packed(m, keep, lib, r) for m, r in zip(modules, rows)]
        spec.head = lins[0]
        for i in range(len(inner.stack)):
            L = shape.layers[i]
            L.q, L.k, L.v, L.o, L.gate, L.up, L.down = lins[1 + 7 * i : 8 + 7 * i]
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        silu = torch.nn.functional.silu(every).view(torch.int16).contiguous()
    keep.append(silu)
    spec.silu = ptr(silu)
    spec.sum_lanes = SUM_LANES
    spec.exact = 1
    shape.exact = True


SCHEME = f"bf16-exact-{XROWS}"  # the packed rows' entry in the home's weight cache (`quant_cache`)


def _cached(model: Any, modules: list[Any]) -> list[torch.Tensor] | None:
    """The packed rows of `modules` from the home's weight cache (memory-mapped), where the loader
    named an entry (`hs_pack_cache`: folder, name) and it holds them all; else None."""
    from hyprstream_tui.engine.tuned import quant_cache

    where = getattr(model, "hs_pack_cache", None)
    entry = quant_cache.read(*where) if where is not None else None
    if entry is None:
        return None
    rows = [entry.get(str(i)) for i in range(len(modules))]
    if any(r is None or r.dtype != torch.bfloat16 or r.numel() != m.weight.numel() for r, m in zip(rows, modules)):
        return None
    return [r for r in rows if r is not None]


def _store(model: Any, rows: list[torch.Tensor]) -> None:
    """Write the packed rows to the entry the loader named (once per model commit), so that later
    loads map them instead of packing: a pack's fresh pages cost a cold call up to 0.7 s."""
    from hyprstream_tui.engine.tuned import quant_cache

    where = getattr(model, "hs_pack_cache", None)
    if where is not None:
        quant_cache.write(where[0], where[1], {str(i): r for i, r in enumerate(rows)},
                          about={**getattr(model, "hs_pack_about", {}), "scheme": SCHEME})


def rope_for(shape: Any, positions: int) -> tuple[int, int, int]:
    """Torch's rotary cos and sin (bf16 values) tabled in `shape` (a `step.Described`) for positions
    0..`positions` - 1 at least (doubling): (cos, sin, positions) for a sequence's spec. Old tables
    stay alive in `shape.keep` (specs may point at them); one thread at a time grows them."""
    with shape.rope_lock:
        if positions > shape.rope_positions:
            n = max(positions, 2 * shape.rope_positions)
            half = shape.spec.head_dim // 2
            with torch.inference_mode():
                cos, sin = shape.rotary(torch.empty(0, dtype=torch.bfloat16), torch.arange(n).unsqueeze(0))
            tables = [t[0, 0, :, :half].float().contiguous() for t in (cos, sin)]
            shape.keep.extend(tables)
            shape.spec.rope_cos, shape.spec.rope_sin = ptr(tables[0]), ptr(tables[1])
            shape.spec.rope_positions = shape.rope_positions = n
        return shape.spec.rope_cos, shape.spec.rope_sin, shape.rope_positions


def run_step(fused: Any, token: int, position: int, logits: torch.Tensor) -> None:
    """An exact model's step (`fused`, a `step.FusedStep`): `step.c`'s parts, each layer's attention
    between them through torch's own kernel, called as torch's step calls it (on the cache's
    views); the logits into `logits`. One C call where step.c holds torch's attention."""
    spec, q, cache = ctypes.byref(fused.spec), fused.q, fused.cache
    scale = fused.spec.head_dim ** -0.5  # the model's `Attention.scaling`
    if aoti.hand_to(fused.lib):
        att = torch.empty_like(q)
        done = fused.lib.hs_exact_run(spec, token, position, q.data_ptr(), att.data_ptr(), logits.data_ptr(), scale)
        if done == 1:
            raise ValueError(f"token {token} at position {position} is out of range")
        if done == 0:
            return
    attention = torch.nn.functional.scaled_dot_product_attention
    end = position + 1
    if fused.lib.hs_exact_begin(spec, token, position, q.data_ptr()) != 0:
        raise ValueError(f"token {token} at position {position} is out of range")
    for i in range(fused.spec.layers):
        out = attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end], scale=scale,
                        enable_gqa=fused.gqa).contiguous()
        fused.lib.hs_exact_layer(spec, i, position, out.data_ptr(), q.data_ptr(), logits.data_ptr())


__all__ = ["SUM_LANES", "XROWS", "check", "check_once", "mark_text", "pack", "pack_rows", "packed", "refusal", "rope_for", "run_step"]
