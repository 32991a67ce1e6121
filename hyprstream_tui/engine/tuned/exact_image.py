"""A bf16 model's replies without `import torch`, bit for bit the engine's (issue 21's bf16 cold start).

The engine's bf16 replies are torch's: its prompt is torch's forward, its steps are torch's step
(or the fused step's exact mode, which equals it). This module runs the same forward
(`native.model.NativeForCausalLM.forward`) with every product and every attention computed by
torch's own kernels through libtorch_cpu's C interface (`tuned.aoti`: no Python torch, about 0.25 s
to load against 1.2 s), and the rest in numpy, as torch rounds it: each bf16 operation is the fp32
operation on the widened values, rounded to the nearest even bf16; the norms' sums of squares in
torch's order (`step.c`'s `hs_sum_squares`); silu and the rotary cos/sin from tables of torch's own
values.

- **Written** by the engine when it loads a store model in bf16 on the CPU (`save`, from
  `loader.load_model`): the tables, the shape, the facts a reply needs, and the bf16 weights, each
  one linked to the checkpoint where it is stored there in bf16, else copied. Before writing, the
  engine runs a prompt and two steps both ways and writes nothing unless the logits and the cache are
  equal bit for bit (`_agrees`): on this CPU, this torch build and this model. The image records the
  torch build it was made with; another build is not used.
- **Read** by `engine.light` (`ExactImage.open`); `sequence(capacity)` runs one sequence.

Content-addressed in the home's weight cache like a step image (`quant_cache`, scheme `SCHEME`).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui.engine.cpu import lowest_priority
from hyprstream_tui.engine.tuned import quant_cache
from hyprstream_tui.engine.tuned.aoti import Kernels, build_id

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
FORMAT = 1
SCHEME = f"bf16-image{FORMAT}"
SUM_LANES = 8  # as `exact.SUM_LANES`: the fp32 lanes of torch's sum kernel
SHAPE = ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn", "vocab", "qkv_bias", "o_bias", "mlp_bias", "tied")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Facts:
    dtype: str
    window: int
    eos_ids: tuple[int, ...]
    quantize: str | None = None


def path_for(cache: Path, key: str) -> Path:
    return quant_cache.folder(cache) / f"{key}{quant_cache.SUFFIX}"


def _names(shape: dict[str, int]) -> list[str]:
    """The model's bf16 tensors the forward reads, by transformers' names."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not shape["tied"]:
        names.append("lm_head.weight")
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}{proj}.weight" for proj in PROJECTIONS]
        if shape["qkv_bias"]:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
        if shape["o_bias"]:
            names.append(p + "self_attn.o_proj.bias")
        if shape["mlp_bias"]:
            names += [f"{p}mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    return names


def _bf16_in(files: list[Path]) -> dict[str, list[Any]]:
    """The checkpoint's BF16 tensors: name -> [file name, start, end] (file offsets)."""
    where: dict[str, list[Any]] = {}
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__" and info.get("dtype") == "BF16":
                    start, end = (int(v) for v in info["data_offsets"])
                    where[name] = [file.name, 8 + size + start, 8 + size + end]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue  # that file's tensors are copied
    return where


def save(model: Any, cache: Path, key: str, facts: Facts, about: dict[str, str], files: list[Path],
         lib: Any) -> Path | None:
    """Write the image of the bf16 model `model` (an `engine.native` one, `lib` the fused step's
    checked library) unless it is there; None where it cannot run it exactly or cannot be written."""
    import torch

    path = path_for(cache, key)
    if path.is_file():
        return path
    config = model.config
    kernels = Kernels.load()
    if kernels is None or lib is None or not getattr(model, "native", False) or model.lm_head.weight.dtype != torch.bfloat16:
        return None
    shape = {"layers": config.num_hidden_layers, "dim": config.hidden_size, "heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim, "ffn": config.intermediate_size,
             "vocab": config.vocab_size, "qkv_bias": int(config.qkv_bias), "o_bias": int(config.o_bias),
             "mlp_bias": int(config.mlp_bias), "tied": int(bool(config.tie_word_embeddings))}
    state = model.state_dict()
    linked = _bf16_in(files)
    tensors: dict[str, torch.Tensor] = {}
    links: dict[str, list[Any]] = {}
    for name in _names(shape):
        t = state[name]
        if t.dtype != torch.bfloat16:
            return None
        link = linked.get(name)
        if link is None and name == "model.embed_tokens.weight" and shape["tied"]:
            link = linked.get("lm_head.weight")  # a tied table may be stored under the head's name
        if link is not None and link[2] - link[1] == t.numel() * 2:
            links[name] = link
        else:
            tensors[name] = t.detach().contiguous()
    with torch.inference_mode():
        every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        tensors["#silu"] = torch.nn.functional.silu(every).contiguous()
        cos, sin = model.model.rotary_emb(torch.empty(0, dtype=torch.bfloat16), torch.arange(facts.window).unsqueeze(0))
        half = config.head_dim // 2
        tensors["#cos"], tensors["#sin"] = (t[0, 0, :, :half].contiguous() for t in (cos, sin))
    meta = {**about, "scheme": SCHEME, "shape": json.dumps(shape), "eps": repr(float(config.rms_norm_eps)),
            "facts": json.dumps(facts.__dict__), "links": json.dumps(links), "torch": build_id(kernels.path),
            "linked_files": json.dumps({f.name: f.stat().st_size for f in files})}
    if not _agrees(model, tensors, links, shape, meta, files, lib, kernels):
        return None
    return quant_cache.write(cache, key, tensors, about=meta)


_saving: dict[Path, threading.Thread] = {}
_saving_lock = threading.Lock()


def save_soon(model: Any, cache: Path, key: str, facts: Facts, about: dict[str, str], files: list[Path],
              lib: Any) -> None:
    """`save` in a thread of its own at the lowest CPU priority, unless the image is there or on its
    way: its self-check and its copy take some 0.7 s on SmolLM2, which a load (a model switch in the
    app) must not wait for. Not a daemon: a command's process ends once it is written."""
    path = path_for(cache, key)
    if path.is_file():
        return
    with _saving_lock:
        if path in _saving and _saving[path].is_alive():
            return
        _saving[path] = thread = threading.Thread(target=_save_quietly, name="hyprstream-exact-image",
                                                  args=(model, cache, key, facts, about, files, lib))
        thread.start()


def _save_quietly(*args: Any) -> None:
    lowest_priority()
    try:
        save(*args)
    except Exception:  # noqa: BLE001 - a background write must never take the process down
        log.warning("cannot write a bf16 model's image", exc_info=True)


def settle(timeout: float | None = None) -> None:
    """Wait for the images being written (tests; a process that must not leave one half done)."""
    with _saving_lock:
        threads = list(_saving.values())
    for thread in threads:
        thread.join(timeout)


def _agrees(model: Any, tensors: dict[str, Any], links: dict[str, list[Any]], shape: dict[str, int],
            meta: dict[str, str], files: list[Path], lib: Any, kernels: Kernels) -> bool:
    """Whether this image's forward equals torch's, bit for bit: a prompt of 7 tokens and 2 steps."""
    import numpy as np
    import torch

    arrays = {k: t.view(torch.int16).numpy().view(np.uint16) for k, t in tensors.items()}
    folder = files[0].parent
    image = ExactImage(arrays, meta, folder, lib, kernels, threads=torch.get_num_threads())
    ids = [min(i * 7919 % shape["vocab"], shape["vocab"] - 1) for i in range(1, 10)]
    run, cache = image.sequence(16), model.new_cache()
    with torch.inference_mode():
        for count, start in ((7, 0), (1, 7), (1, 8)):
            got = run.prefill(ids[:count]) if start == 0 else run.step(ids[start], start)
            want = model(input_ids=torch.tensor([ids[start : start + count]]),
                         position_ids=torch.arange(start, start + count).unsqueeze(0), cache=cache,
                         logits_to_keep=1).logits[0, -1].float().numpy()
            if not np.array_equal(got, want):
                return False
        k = cache.keys[shape["layers"] - 1][0, :, :9].view(torch.int16).numpy().view(np.uint16)
        return bool(np.array_equal(run.kv[-2][:, :9], k))


def _widen(a: "np.ndarray") -> "np.ndarray":
    import numpy as np

    return (a.astype(np.uint32) << 16).view(np.float32)


def _narrow(a: "np.ndarray") -> "np.ndarray":
    """fp32 -> bf16 bits, rounded to nearest even as torch rounds (a NaN to 0x7FC0)."""
    import numpy as np

    b = a.view(np.uint32)
    out = ((b + (0x7FFF + ((b >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class ExactImage:
    """The image's tables and weights (numpy views of maps), and torch's kernels over them."""

    def __init__(self, arrays: dict[str, "np.ndarray"], meta: dict[str, str], folder: Path, lib: Any,
                 kernels: Kernels, threads: int, keep: Any = None) -> None:
        import numpy as np

        self.np, self.lib, self.k = np, lib, kernels
        self.shape = shape = json.loads(meta["shape"])
        facts = json.loads(meta["facts"])
        self.facts = Facts(dtype=facts["dtype"], window=int(facts["window"]),
                           eos_ids=tuple(int(i) for i in facts["eos_ids"]), quantize=None)
        self.eps = np.float32(float(meta["eps"]))
        self._maps: list[Any] = [keep]  # the image's map (numpy views keep it open) and the linked files'
        weights = dict(arrays)
        sizes = json.loads(meta.get("linked_files", "{}"))
        opened: dict[str, Any] = {}
        for name, (file, start, end) in json.loads(meta.get("links", "{}")).items():
            if "/" in file or file in ("", ".", ".."):
                raise ValueError(f"a link outside the model's folder: {file!r}")
            if file not in opened:
                with open(folder / file, "rb") as fh:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if len(mapped) != int(sizes[file]):
                    raise ValueError(f"{file} is not the linked file")
                opened[file] = np.frombuffer(mapped, dtype=np.uint8)
                self._maps.append(opened[file])
            if not 0 <= int(start) <= int(end) <= int(sizes[file]) or (int(end) - int(start)) % 2:
                raise ValueError(f"a link past the end of {file}")
            weights[name] = opened[file][int(start) : int(end)].view(np.uint16)
        self.silu, self.cos, self.sin = (_widen(weights.pop(k)) for k in ("#silu", "#cos", "#sin"))
        d, hd = shape["dim"], shape["head_dim"]
        self.cos = self.cos.reshape(-1, hd // 2)
        self.sin = self.sin.reshape(-1, hd // 2)
        self.embed = weights["model.embed_tokens.weight"].reshape(shape["vocab"], d)
        head = weights["model.embed_tokens.weight" if shape["tied"] else "lm_head.weight"]
        self.head = self._weight(head, shape["vocab"], d)
        self.norm = _widen(weights["model.norm.weight"])
        self.layers = []
        for i in range(shape["layers"]):
            p = f"model.layers.{i}."
            outs = {"q_proj": shape["heads"] * hd, "k_proj": shape["kv_heads"] * hd, "v_proj": shape["kv_heads"] * hd,
                    "o_proj": d, "gate_proj": shape["ffn"], "up_proj": shape["ffn"], "down_proj": d}
            layer: dict[str, Any] = {"ln1": _widen(weights[p + "input_layernorm.weight"]),
                                     "ln2": _widen(weights[p + "post_attention_layernorm.weight"])}
            for proj in PROJECTIONS:
                short = proj.split(".")[1]
                inputs = shape["heads"] * hd if short == "o_proj" else shape["ffn"] if short == "down_proj" else d
                layer[short] = self._weight(weights[f"{p}{proj}.weight"], outs[short], inputs)
                bias = weights.get(f"{p}{proj}.bias")
                layer[short + ".b"] = None if bias is None else kernels.tensor(bias, (outs[short],))
            self.layers.append(layer)
        self.use_threads(threads)

    def _weight(self, rows: "np.ndarray", out: int, inputs: int) -> Any:
        """The [inputs, out] view of a [out, inputs] weight, as `F.linear` hands it to `addmm`."""
        if rows.size != out * inputs:
            raise ValueError(f"a weight of {rows.size} values, not {out}x{inputs}")
        return self.k.tensor(rows, (inputs, out), (1, inputs))

    def use_threads(self, n: int) -> None:
        self.threads = max(1, n)
        self.k.threads(self.threads)

    @classmethod
    def open(cls, path: Path, folder: Path, lib: Any, threads: int) -> "ExactImage | None":
        """The image at `path` of the model in `folder`; None where it is missing, unreadable, or made
        with another torch build (the engine writes it anew)."""
        import numpy as np

        try:
            with open(path, "rb") as fh:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            size = int.from_bytes(mapped[:8], "little")
            header = json.loads(mapped[8 : 8 + size])
            meta = header.pop("__metadata__")
            kernels = Kernels.load()
            if kernels is None or meta.get("scheme") != SCHEME or meta.get("torch") != build_id(kernels.path):
                return None
            raw = np.frombuffer(mapped, dtype=np.uint8)
            arrays = {}
            for name, info in header.items():
                if name.startswith(quant_cache.PAD):
                    continue
                start, end = (8 + size + int(v) for v in info["data_offsets"])
                if info["dtype"] != "BF16" or end > len(mapped):
                    return None
                arrays[name] = raw[start:end].view(np.uint16)
            image = cls(arrays, meta, folder, lib, kernels, threads, keep=raw)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            return None
        try:
            os.utime(path)  # most recently used: the cache's cap evicts others first
        except OSError:
            pass
        return image

    def sequence(self, capacity: int) -> "ExactSequence":
        return ExactSequence(self, capacity)


class ExactSequence:
    """One sequence: its own KV cache (bf16, [kv_heads, capacity, head_dim] a layer, as
    `NativeCache`'s), a prompt from position 0, then one token at a time."""

    def __init__(self, image: ExactImage, capacity: int) -> None:
        np, s = image.np, image.shape
        self.image, self.np, self.capacity = image, np, capacity
        if capacity > len(image.cos):
            raise ValueError(f"{capacity} positions: the image tables {len(image.cos)}")
        self.kv = [np.zeros((s["kv_heads"], capacity, s["head_dim"]), dtype=np.uint16) for _ in range(2 * s["layers"])]
        self._buffers: dict[tuple[str, int, int], tuple[Any, Any]] = {}
        self.length = 0

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
        xf = _widen(x)
        n = x.shape[1]
        sums = np.array([lib.hs_sum_squares(row.ctypes.data, n, SUM_LANES) for row in xf], dtype=np.float32)
        r = np.float32(1) / np.sqrt(sums / np.float32(n) + image.eps)
        out, _ = self._buffer(into, x.shape[0], n)
        out[...] = _narrow(w * _widen(_narrow(xf * r[:, None])))
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
        xf = _widen(x)
        turned = np.concatenate((-xf[..., half:], xf[..., :half]), axis=-1)
        return _narrow(_widen(_narrow(xf * cos)) + _widen(_narrow(turned * sin)))

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
            x = _narrow(_widen(x) + _widen(o))
            h = self._norm(x, L["ln2"])
            gate = self._linear(h, "h", L["gate_proj"], L["gate_proj.b"], f, "gate")
            up = self._linear(h, "h", L["up_proj"], L["up_proj.b"], f, "up")
            act, _ = self._buffer("act", count, f)
            act[...] = _narrow(image.silu[gate] * _widen(up))
            x = _narrow(_widen(x) + _widen(self._linear(act, "act", L["down_proj"], L["down_proj.b"], d, "down")))
        self.length = end
        last = self._norm(x[-1:], image.norm)
        return _widen(self._linear(last, "h", image.head, None, s["vocab"], "logits"))[0]

    def prefill(self, tokens: "list[int] | np.ndarray") -> "np.ndarray":
        """The logits [V] (fp32) after the prompt `tokens`, the sequence's first."""
        if self.length:
            raise ValueError("the image runs a prompt only from position 0")
        return self._forward([int(t) for t in tokens])

    def step(self, token: int, position: int) -> "np.ndarray":
        """The logits [V] (fp32) after `token` at `position` (the cache's length)."""
        if position != self.length:
            raise ValueError(f"position {position} is not the cache's length {self.length}")
        return self._forward([int(token)])


__all__ = ["FORMAT", "SCHEME", "ExactImage", "ExactSequence", "Facts", "path_for", "save", "save_soon", "settle"]
