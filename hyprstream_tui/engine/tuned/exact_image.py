"""A bf16 model's replies without `import torch`, bit for bit the engine's (issue 21's bf16 cold start).

The engine's bf16 replies are torch's: its prompt is torch's forward, its steps are torch's step
(or the fused step's exact mode, which equals it). This module runs the same forward
(`native.model.NativeForCausalLM.forward`) with every product and every attention computed by
torch's own kernels through libtorch_cpu's C interface (`tuned.aoti`: no Python torch, about 0.25 s
to load against 1.2 s), and the rest in numpy, as torch rounds it: each bf16 operation is the fp32
operation on the widened values, rounded to the nearest even bf16; the norms' sums of squares in
torch's order (`step.c`'s `hs_sum_squares`); silu and the rotary cos/sin from tables of torch's own
values.

- **Written** by the engine after a store model's first bf16 reply on the CPU (`save_soon`, which
  `loader.load_model` leaves in `LoadedModel.after_first_reply`), in a thread at the lowest
  priority: the tables, the shape, the facts a reply needs, and the bf16 weights, each one linked
  to the checkpoint where it is stored there in bf16, else copied. Before writing, it runs a prompt
  and two steps both ways and writes nothing unless the logits and the cache are equal bit for bit
  (`_agrees`): on this CPU, this torch build and this model. The image records the torch build it
  was made with; another build is not used.
- **Read** by `engine.light` (`ExactImage.open`); `sequence(capacity)` runs one sequence
  (`exact_run`). Where the weight cache holds the exact fused step's packed rows and that step
  passed its check here, decode steps run through it (`fuse`): the engine's own step.

Content-addressed in the home's weight cache like a step image (`quant_cache`, scheme `SCHEME`).
"""

from __future__ import annotations

import json
import logging
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui.engine.cpu import lowest_priority
from hyprstream_tui.engine.tuned import quant_cache
from hyprstream_tui.engine.tuned.aoti import Kernels, build_id
from hyprstream_tui.engine.tuned.exact_run import SUM_LANES, ExactSequence, widen
from hyprstream_tui.engine.tuned.step_image import checkpoint_tensors

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
FORMAT = 1
SCHEME = f"bf16-image{FORMAT}"
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


def save(model: Any, cache: Path, key: str, facts: Facts, about: dict[str, str], files: list[Path],
         packed: str | None = None) -> Path | None:
    """Write the image of the bf16 model `model` (an `engine.native` one; `packed`: the weight
    cache's entry of its packed rows, which the fused step's exact mode writes) unless it is there;
    None where it cannot run it exactly or cannot be written."""
    import torch

    from hyprstream_tui.engine.tuned import exact, step

    lib = step.library()  # the fused step's checked library: its norm sums

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
    linked = checkpoint_tensors(files, ("BF16",))
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
            links[name] = [link[0].name, link[1], link[2]]
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
            "linked_files": json.dumps({f.name: f.stat().st_size for f in files}),
            # decode steps through the exact fused step where its check passed (`step_abi.exact_marker`)
            "exact_mark": exact.mark_text() if packed and step.exact_refusal() == "" else "", "packed": packed or ""}
    if not _agrees(model, tensors, links, shape, meta, files, lib, kernels):
        return None
    return quant_cache.write(cache, key, tensors, about=meta)


_saving: dict[Path, threading.Thread] = {}
_saving_lock = threading.Lock()


def save_soon(model: Any, cache: Path, key: str, facts: Facts, about: dict[str, str], files: list[Path],
              packed: str | None = None) -> None:
    """`save` in a thread of its own at the lowest CPU priority, unless the image is there or on its
    way: its self-check and its copy take some 0.7 s on SmolLM2, which a load (a model switch in the
    app) must not wait for. Not a daemon (said so: a thread inherits its starter's, and the engine's
    request threads are daemons): a command's process ends once it is written, never mid-torch."""
    path = path_for(cache, key)
    if path.is_file():
        return
    with _saving_lock:
        if path in _saving and _saving[path].is_alive():
            return
        _saving[path] = thread = threading.Thread(target=_save_quietly, name="hyprstream-exact-image", daemon=False,
                                                  args=(model, cache, key, facts, about, files, packed))
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
        self.silu_bits = weights.pop("#silu")
        self.silu, self.cos, self.sin = (widen(t) for t in (self.silu_bits, weights.pop("#cos"), weights.pop("#sin")))
        d, hd = shape["dim"], shape["head_dim"]
        self.cos = self.cos.reshape(-1, hd // 2)
        self.sin = self.sin.reshape(-1, hd // 2)
        self.embed = weights["model.embed_tokens.weight"].reshape(shape["vocab"], d)
        head = weights["model.embed_tokens.weight" if shape["tied"] else "lm_head.weight"]
        self.head = self._weight(head, shape["vocab"], d)
        self.norm = widen(weights["model.norm.weight"])
        self.layers = []
        for i in range(shape["layers"]):
            p = f"model.layers.{i}."
            outs = {"q_proj": shape["heads"] * hd, "k_proj": shape["kv_heads"] * hd, "v_proj": shape["kv_heads"] * hd,
                    "o_proj": d, "gate_proj": shape["ffn"], "up_proj": shape["ffn"], "down_proj": d}
            layer: dict[str, Any] = {"ln1": widen(weights[p + "input_layernorm.weight"]),
                                     "ln2": widen(weights[p + "post_attention_layernorm.weight"])}
            for proj in PROJECTIONS:
                short = proj.split(".")[1]
                inputs = shape["heads"] * hd if short == "o_proj" else shape["ffn"] if short == "down_proj" else d
                layer[short] = self._weight(weights[f"{p}{proj}.weight"], outs[short], inputs)
                bias = weights.get(f"{p}{proj}.bias")
                layer[short + ".b"] = None if bias is None else kernels.tensor(bias, (outs[short],))
                layer[short + ".bias"] = None if bias is None else widen(bias)
            self.layers.append(layer)
        self.fused: Any = None  # (spec, layers) of the exact fused step, where `fuse` gave them
        self.use_threads(threads)

    def fuse(self, rows: list["np.ndarray"]) -> None:
        """Decode steps through the fused step's exact mode (`step.c`'s `hs_exact_run`, torch's
        attention called from there) over `rows`, the weight cache's packed rows (the output layer's,
        then each layer's q, k, v, o, gate, up, down): the engine's exact step, bit for bit."""
        from hyprstream_tui.engine.tuned.aoti import hand_to
        from hyprstream_tui.engine.tuned.step_abi import BF16_PACKED, Layer, Lin, Spec

        np, s = self.np, self.shape
        d, hd, H, KV, f = s["dim"], s["head_dim"], s["heads"], s["kv_heads"], s["ffn"]
        if len(rows) != 1 + 7 * s["layers"] or not hand_to(self.lib):
            return
        sizes = {"q_proj": (H * hd, d), "k_proj": (KV * hd, d), "v_proj": (KV * hd, d), "o_proj": (d, H * hd),
                 "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

        def lin(w: Any, out: int, inputs: int, bias: Any) -> Lin:
            if w.dtype != np.uint16 or w.size != out * inputs:
                raise ValueError(f"packed rows of {w.size} values, not {out}x{inputs}")
            return Lin(BF16_PACKED, out, inputs, w.ctypes.data, None, None if bias is None else bias.ctypes.data)

        layers = (Layer * s["layers"])()
        for i, L in enumerate(self.layers):
            parts = [lin(rows[1 + 7 * i + j], *sizes[name], L[name + ".bias"])
                     for j, name in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))]
            layers[i].q, layers[i].k, layers[i].v, layers[i].o, layers[i].gate, layers[i].up, layers[i].down = parts
            layers[i].ln1, layers[i].ln2 = L["ln1"].ctypes.data, L["ln2"].ctypes.data
        self._inv_freq = np.zeros(hd // 2, dtype=np.float32)  # read by the inexact step only
        spec = Spec(layers=s["layers"], dim=d, heads=H, kv_heads=KV, head_dim=hd, ffn=f, vocab=s["vocab"],
                    capacity=0, threads=self.threads, eps=float(self.eps), scale=hd ** -0.5, bf16=1,
                    embed=self.embed.ctypes.data, embed_f32=0, norm=self.norm.ctypes.data,
                    inv_freq=self._inv_freq.ctypes.data, head=lin(rows[0], s["vocab"], d, None), layer=None,
                    scratch=None, exact=1, sum_lanes=SUM_LANES, rope_positions=len(self.cos),
                    silu=self.silu_bits.ctypes.data, rope_cos=self.cos.ctypes.data, rope_sin=self.sin.ctypes.data)
        self._rows = rows
        self.fused = (spec, layers)

    def _weight(self, rows: "np.ndarray", out: int, inputs: int) -> Any:
        """The [inputs, out] view of a [out, inputs] weight, as `F.linear` hands it to `addmm`."""
        if rows.size != out * inputs:
            raise ValueError(f"a weight of {rows.size} values, not {out}x{inputs}")
        return self.k.tensor(rows, (inputs, out), (1, inputs))

    def use_threads(self, n: int) -> None:
        self.threads = max(1, n)
        self.k.threads(self.threads)
        if self.fused is not None:
            self.fused[0].threads = self.threads

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
            rows = _packed_rows(path.parent, meta)
            if rows is not None:
                image.fuse(rows)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            return None
        quant_cache.touch(path)
        return image

    def sequence(self, capacity: int) -> "ExactSequence":
        return ExactSequence(self, capacity)


def _packed_rows(folder: Path, meta: dict[str, str]) -> "list[np.ndarray] | None":
    """The packed rows of the weight cache's entry the image names, mapped, where the fused step's
    exact mode passed its check for this library, CPU and torch (the marker beside the library
    holds what it held when the image was written); None otherwise (numpy and torch's kernels)."""
    import numpy as np

    from hyprstream_tui.engine.tuned.step_abi import exact_marker

    marker = exact_marker()
    if not meta.get("exact_mark") or not meta.get("packed") or marker is None:
        return None
    try:
        if marker.read_text() != meta["exact_mark"]:
            return None
        with open(folder / f"{meta['packed']}{quant_cache.SUFFIX}", "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    size = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8 : 8 + size])
    raw = np.frombuffer(mapped, dtype=np.uint8)
    rows = []
    for i in range(len(header)):
        info = header.get(str(i))
        if info is None:
            break
        start, end = (8 + size + int(v) for v in info["data_offsets"])
        if info["dtype"] != "BF16" or end > len(mapped) or start % 64:
            return None
        rows.append(raw[start:end].view(np.uint16))
    return rows


__all__ = ["FORMAT", "SCHEME", "ExactImage", "Facts", "path_for", "save", "save_soon", "settle"]
