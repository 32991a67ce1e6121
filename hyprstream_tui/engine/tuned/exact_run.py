"""One sequence through a bf16 model's exact image (`tuned.exact_image`): torch's forward, bit for
bit, without torch. Products and attention are torch's own kernels through libtorch_cpu's C
interface (`tuned.aoti`); the rest is numpy, rounded as torch rounds bf16 (`narrow`: each operation
in fp32, then to the nearest even bf16); where the image has the fused step's packed rows, decode
steps run as the engine's exact step does (`step.c`'s `hs_exact_run`).

Imports numpy, never torch.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SUM_LANES = 8  # fp32 lanes of torch's sum kernel (its AVX2 build runs on AVX512 CPUs too); `exact` checks it


def widen(a: "np.ndarray") -> "np.ndarray":
    import numpy as np

    return (a.astype(np.uint32) << 16).view(np.float32)


def narrow(a: "np.ndarray") -> "np.ndarray":
    """fp32 -> bf16 bits, rounded to nearest even as torch rounds (a NaN to 0x7FC0)."""
    import numpy as np

    b = a.view(np.uint32)
    out = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class ExactSequence:
    """One sequence: its own KV cache (bf16, [kv_heads, capacity, head_dim] a layer, as
    `NativeCache`'s), a prompt from position 0, then one token at a time."""

    def __init__(self, image: Any, capacity: int) -> None:
        np, s = image.np, image.shape
        self.image, self.np, self.capacity = image, np, capacity
        if capacity > len(image.cos):
            raise ValueError(f"{capacity} positions: the image tables {len(image.cos)}")
        self.kv = [np.zeros((s["kv_heads"], capacity, s["head_dim"]), dtype=np.uint16) for _ in range(2 * s["layers"])]
        self._buffers: dict[tuple[str, int, int], tuple[Any, Any]] = {}
        self.length = 0
        self.fused: Any = None
        if image.fused is not None:
            from hyprstream_tui.engine.tuned.step_abi import for_sequence, scratch_floats

            spec, own = for_sequence(*image.fused)
            for i in range(s["layers"]):
                own[i].kc, own[i].vc = self.kv[2 * i].ctypes.data, self.kv[2 * i + 1].ctypes.data
            spec.capacity, spec.threads = capacity, image.threads
            widest = max(s["dim"], s["heads"] * s["head_dim"], s["ffn"])
            self._scratch = np.empty(scratch_floats(spec, widest), dtype=np.float32)
            spec.scratch = self._scratch.ctypes.data
            self._q, self._att = (np.empty(s["heads"] * s["head_dim"], dtype=np.uint16) for _ in range(2))
            self.fused = (spec, own)

    def _buffer(self, name: str, rows: int, width: int) -> tuple["np.ndarray", Any]:
        """A bf16 buffer [rows, width] and torch's tensor over it, made once per name and shape (a
        step's products reuse theirs: no tensor to make per call)."""
        key = (name, rows, width)
        if key not in self._buffers:
            array = self.np.empty((rows, width), dtype=self.np.uint16)
            self._buffers[key] = (array, self.image.k.tensor(array, (rows, width)))
        return self._buffers[key]

    def _norm(self, x: "np.ndarray", w: "np.ndarray", into: str = "h") -> "np.ndarray":
        """RMSNorm of bf16 rows x (into buffer `into`): torch's sum of squares, mean, rsqrt,
        product, rounding."""
        np, lib, image = self.np, self.image.lib, self.image
        xf = widen(x)
        n = x.shape[1]
        sums = np.array([lib.hs_sum_squares(row.ctypes.data, n, SUM_LANES) for row in xf], dtype=np.float32)
        r = np.float32(1) / np.sqrt(sums / np.float32(n) + image.eps)
        out, _ = self._buffer(into, x.shape[0], n)
        out[...] = narrow(w * widen(narrow(xf * r[:, None])))
        return out

    def _linear(self, x: "np.ndarray", name: str, weight: Any, bias: Any, out: int, into: str) -> "np.ndarray":
        """torch's `F.linear` of buffer `name` (its rows x) into buffer `into` [rows, out]."""
        rows = x.shape[0]
        _, given = self._buffer(name, rows, x.shape[1])
        y, made = self._buffer(into, rows, out)
        self.image.k.linear(made, given, weight, bias)
        return y

    def _rotate(self, x: "np.ndarray", cos: "np.ndarray", sin: "np.ndarray") -> "np.ndarray":
        """x [S, heads, hd] bf16 -> x * cos + rotate_half(x) * sin, each product and the sum rounded."""
        np = self.np
        half = x.shape[2] // 2
        xf = widen(x)
        turned = np.concatenate((-xf[..., half:], xf[..., :half]), axis=-1)
        return narrow(widen(narrow(xf * cos)) + widen(narrow(turned * sin)))

    def _forward(self, ids: list[int]) -> "np.ndarray":
        np, image, s = self.np, self.image, self.image.shape
        k = image.k
        count, start, hd, H, KV = len(ids), self.length, s["head_dim"], s["heads"], s["kv_heads"]
        end = start + count
        if start + count > self.capacity or not all(0 <= i < s["vocab"] for i in ids):
            raise ValueError(f"{count} tokens from position {start}: out of range")
        x = image.embed[np.asarray(ids, dtype=np.int64)]
        c = image.cos[start:end]
        cos = np.concatenate((c, c), axis=-1)[:, None, :]
        c = image.sin[start:end]
        sin = np.concatenate((c, c), axis=-1)[:, None, :]
        att, _ = self._buffer("att", count, H * hd)
        cap, d, f = self.capacity, s["dim"], s["ffn"]
        for i, L in enumerate(image.layers):
            h = self._norm(x, L["ln1"])
            q = self._rotate(self._linear(h, "h", L["q_proj"], L["q_proj.b"], H * hd, "q").reshape(count, H, hd), cos, sin)
            kk = self._rotate(self._linear(h, "h", L["k_proj"], L["k_proj.b"], KV * hd, "k").reshape(count, KV, hd), cos, sin)
            v = self._linear(h, "h", L["v_proj"], L["v_proj.b"], KV * hd, "v").reshape(count, KV, hd)
            keys, values = self.kv[2 * i], self.kv[2 * i + 1]
            keys[:, start:end] = kk.transpose(1, 0, 2)
            values[:, start:end] = v.transpose(1, 0, 2)
            k.attention(k.tensor(q, (1, H, count, hd), (count * H * hd, hd, H * hd, 1)),
                        k.tensor(keys, (1, KV, end, hd), (KV * cap * hd, cap * hd, hd, 1)),
                        k.tensor(values, (1, KV, end, hd), (KV * cap * hd, cap * hd, hd, 1)),
                        hd ** -0.5, count > 1, att)
            o = self._linear(att, "att", L["o_proj"], L["o_proj.b"], d, "o")
            x = narrow(widen(x) + widen(o))
            h = self._norm(x, L["ln2"])
            gate = self._linear(h, "h", L["gate_proj"], L["gate_proj.b"], f, "gate")
            up = self._linear(h, "h", L["up_proj"], L["up_proj.b"], f, "up")
            act, _ = self._buffer("act", count, f)
            act[...] = narrow(image.silu[gate] * widen(up))
            x = narrow(widen(x) + widen(self._linear(act, "act", L["down_proj"], L["down_proj.b"], d, "down")))
        self.length = end
        last = self._norm(x[-1:], image.norm)
        return widen(self._linear(last, "h", image.head, None, s["vocab"], "logits"))[0]

    def prefill(self, tokens: "list[int] | np.ndarray") -> "np.ndarray":
        """The logits [V] (fp32) after the prompt `tokens`, the sequence's first."""
        if self.length:
            raise ValueError("the image runs a prompt only from position 0")
        return self._forward([int(t) for t in tokens])

    def step(self, token: int, position: int) -> "np.ndarray":
        """The logits [V] (fp32) after `token` at `position` (the cache's length)."""
        if position != self.length:
            raise ValueError(f"position {position} is not the cache's length {self.length}")
        if self.fused is not None:
            logits = self.np.empty(self.image.shape["vocab"], dtype=self.np.float32)
            done = self.image.lib.hs_exact_run(ctypes.byref(self.fused[0]), int(token), position, self._q.ctypes.data,
                                               self._att.ctypes.data, logits.ctypes.data,
                                               self.image.shape["head_dim"] ** -0.5)
            if done == 0:
                self.length += 1
                return logits
            if done == 1:
                raise ValueError(f"token {token} at position {position} is out of range")
        return self._forward([int(token)])


__all__ = ["SUM_LANES", "ExactSequence", "narrow", "widen"]
