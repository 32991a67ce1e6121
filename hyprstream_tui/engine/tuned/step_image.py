"""A fused model's image: everything `step.c` reads for one quantized model, in one file that a
process without torch can map and run (`engine.light`, issue 21's cold start).

- **Written** by the engine (torch) when it loads a store model of the engine's own classes that
  the fused step runs by default, quantized through the home's quantized cache or fp32 (`save`,
  from `loader.load_model`): the bytes the fused step's structures point at (`step.described`),
  each row range as the step reads it, and in the metadata the model's shape, each product's kind,
  and the facts a reply needs (dtype, context window, end-of-reply ids). A tensor whose bytes are
  the model's own checkpoint tensor (an fp32 model's weights; a quantized model's fp32 norms and
  embedding) is not copied: the image links it (the file, the offsets, the file's size), so an
  fp32 model's image is a few kilobytes. So is one loaded in fp32 from a bf16 checkpoint: each fp32
  tensor widened from a bf16 one links that, and the step reads it as bf16 rows (kind 4 with fp32
  activations), whose products are the fp32 rows' exactly (`step.c`: the same FMAs on the same
  values), at half the bytes. The image's name is content-addressed like the cache's
  entries (`<key>.step<FORMAT>.safetensors`, the key of the commit, the checkpoint files' sizes
  and times, and the scheme: `int8`, `int4-g32` or `float32`), beside the entry of a quantized
  model. The cache's cap and `hyprstream cache prune` evict it like an entry.
- **Read** without torch (`ImageModel.open`): numpy views of read-only memory maps of the image and
  of the checkpoint files it links, pointed at by the library's structures;
  `ImageModel.sequence` gives a sequence its own KV cache.

A reply through the image is the engine's reply, bit for bit: the same library runs the same
bytes, prompts through `hs_prefill` and tokens through `hs_step` as the engine's `FusedStep` does.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui.engine.tuned import quant_cache
from hyprstream_tui.engine.tuned.step_abi import (
    BF16,
    DEFAULT_KINDS,
    FP32,
    GROUP,
    INT4,
    INT8,
    LINEARS,
    Layer,
    Lin,
    Spec,
    for_sequence,
    scratch_floats,
)

if TYPE_CHECKING:
    import numpy as np

FORMAT = 1
SHAPE = ("layers", "dim", "heads", "kv_heads", "head_dim", "ffn", "vocab", "bf16", "embed_f32")


def name_for(key: str) -> str:
    """The image's name in the quantized cache for entry `key`."""
    return f"{key}.step{FORMAT}"


def path_for(cache: Path, key: str) -> Path:
    return quant_cache.folder(cache) / f"{name_for(key)}{quant_cache.SUFFIX}"


def scheme(quantize: str | None) -> str:
    """The cache's scheme name for `quantize` (None: an fp32 model), in the group size the fused
    step reads."""
    if quantize is None:
        return "float32"
    return quantize if quantize == "int8" else f"int4-g{GROUP}"


def _lin_bytes(lin: Lin) -> tuple[int, int]:
    """Bytes of a product's weights and of its scales."""
    out, inputs = lin.out, lin.inputs
    if lin.kind == INT8:
        return out * inputs, out * 4
    if lin.kind == INT4:
        return out * inputs // 2, out * (inputs // GROUP) * 4
    return out * inputs * (4 if lin.kind == FP32 else 2), 0


@dataclass(frozen=True)
class Facts:
    """What a reply needs besides the weights (a `LoadedModel`'s fields)."""

    dtype: str
    window: int
    eos_ids: tuple[int, ...]
    quantize: str | None


def save(model: Any, cache: Path, key: str, facts: Facts, about: dict[str, str],
         files: list[Path]) -> Path | None:
    """Write the image of `model` (`key` its cache key; `about`: its model and commit, for
    `hyprstream cache list`; `files`: its checkpoint, which the image may link) unless it is there;
    None where the fused step does not run it whole by default or the cache cannot be written."""
    import torch

    from hyprstream_tui.engine.tuned import step

    path = path_for(cache, key)
    if intact(path):
        return path
    try:
        shape = step.described(model)
    except step.Unfit:
        return None
    if not shape.kinds <= DEFAULT_KINDS or shape.spec.bf16 or not getattr(model, "native", False):
        return None
    if step.library() is None:  # no library that passed its check here: nothing could read it
        return None
    spec = shape.spec
    tensors: dict[str, torch.Tensor] = {}
    lins: dict[str, list[int]] = {}
    checkpoint = _Checkpoint(model, files)

    def raw(name: str, address: int | None, size: int, fp32: bool = False) -> bool:
        """Link or copy the bytes the step reads; True where an fp32 tensor was linked to the
        checkpoint's bf16 one it was widened from (the step then reads those, to the same values)."""
        if not (address and size):
            return False
        view = (ctypes.c_uint8 * size).from_address(address)
        if checkpoint.link(name, address, view):
            return False
        if fp32 and checkpoint.link(name, address, view, widened=True):
            return True
        tensors[name] = torch.frombuffer(view, dtype=torch.uint8)  # a copy
        return False

    def product(name: str, lin: Lin) -> None:
        weights, scales = _lin_bytes(lin)
        narrowed = raw(f"{name}.w", lin.w, weights, fp32=lin.kind == FP32)
        raw(f"{name}.s", lin.s, scales)
        raw(f"{name}.b", lin.bias, lin.out * 4)
        # kind 4 with fp32 activations: step.c's bf16 rows, whose products are its fp32 rows' exactly
        lins[name] = [BF16 if narrowed else lin.kind, lin.out, lin.inputs]

    for i, layer in enumerate(shape.layers):
        for field in LINEARS:
            product(f"L{i}.{field}", getattr(layer, field))
        raw(f"L{i}.ln1", layer.ln1, spec.dim * 4)
        raw(f"L{i}.ln2", layer.ln2, spec.dim * 4)
    product("head", spec.head)
    dims = {k: int(getattr(spec, k)) for k in SHAPE}
    if raw("embed", spec.embed, spec.vocab * spec.dim * (4 if spec.embed_f32 else 2), fp32=bool(spec.embed_f32)):
        dims["embed_f32"] = 0  # the rows are widened as they are read: the same values
    raw("norm", spec.norm, spec.dim * 4)
    raw("inv_freq", spec.inv_freq, spec.head_dim // 2 * 4)
    meta = {
        **about,
        "scheme": f"{scheme(facts.quantize)} step image",
        "image": str(FORMAT),
        "shape": json.dumps(dims),
        "eps_scale": json.dumps([spec.eps, spec.scale]),  # the c_floats' values, exactly
        "runs": json.dumps(sorted(shape.kinds)),  # the kinds the engine's step runs
        "products": json.dumps(lins),
        "facts": json.dumps(facts.__dict__),
        "links": json.dumps(checkpoint.links),
        "linked_files": json.dumps(checkpoint.sizes()),
    }
    try:
        return quant_cache.write(cache, name_for(key), tensors, about=meta)
    finally:
        checkpoint.close()


def _same(mapped: mmap.mmap, start: int, view: Any) -> bool:
    import numpy as np

    size = len(view)
    if start + size > len(mapped):
        return False
    theirs = np.frombuffer(mapped, dtype=np.uint8, count=size, offset=start)
    try:
        return bool(np.array_equal(theirs, np.frombuffer(view, dtype=np.uint8)))
    finally:
        del theirs  # the map closes later only without views of it


def _widens_to(mapped: mmap.mmap, start: int, view: Any) -> bool:
    """Whether the bf16 values at `start` widen to the fp32 values of `view`, bit for bit."""
    import numpy as np

    count = len(view) // 4
    if start + 2 * count > len(mapped):
        return False
    theirs = np.frombuffer(mapped, dtype=np.uint16, count=count, offset=start)
    try:
        ours = np.frombuffer(view, dtype=np.uint32)
        step = 1 << 22  # a chunk at a time: no whole widened copy
        return all(np.array_equal(theirs[i : i + step].astype(np.uint32) << 16, ours[i : i + step])
                   for i in range(0, count, step))
    finally:
        del theirs


def checkpoint_tensors(files: list[Path], dtypes: tuple[str, ...]) -> dict[str, tuple[Path, int, int, str]]:
    """The tensors of `dtypes` in safetensors `files`: name -> (file, start, end, dtype), offsets in
    the file. A file that cannot be read adds none (its tensors are copied, not linked)."""
    where: dict[str, tuple[Path, int, int, str]] = {}
    for file in files:
        try:
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, info in header.items():
                if name != "__metadata__" and info["dtype"] in dtypes:
                    start, end = (int(v) for v in info["data_offsets"])
                    where[name] = (file, 8 + size + start, 8 + size + end, info["dtype"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue
    return where


class _Checkpoint:
    """The model's checkpoint files, for linking: a tensor of the image whose bytes are a tensor
    of the checkpoint that `model` holds at the same address (loaded as a view of the file) and
    that equals the file's bytes now."""

    def __init__(self, model: Any, files: list[Path]) -> None:
        self.links: dict[str, list[Any]] = {}  # image name -> [file name, start, end] (file offsets)
        self._owners: dict[int, list[str]] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            self._owners.setdefault(tensor.data_ptr(), []).append(name)
        for name, module in model.named_modules():  # the bf16 rows an fp32 layer was widened from
            narrow = getattr(module, "hs_bf16_weight", None)
            if narrow is not None:
                self._owners.setdefault(narrow.data_ptr(), []).append(f"{name}.weight")
        self._where = checkpoint_tensors(files, ("F32", "BF16"))  # checkpoint name -> file, start, end, dtype
        self._maps: dict[Path, mmap.mmap] = {}

    def link(self, image_name: str, address: int, view: Any, *, widened: bool = False) -> bool:
        """Link `view` (the bytes the step reads, at `address`) to the checkpoint tensor they are,
        or with `widened`, to the bf16 one an fp32 tensor was widened from; False: none is."""
        for owner in self._owners.get(address, []):
            names = (owner, "lm_head.weight") if owner == "model.embed_tokens.weight" else (owner,)
            for name in names:  # a tied table may be stored under the head's name
                where = self._where.get(name)
                if where is None or (widened and where[3] != "BF16"):
                    continue
                file, start, end, _ = where
                if (end - start) * (2 if widened else 1) != len(view):
                    continue
                try:  # the bytes now: a file changed since it was loaded is not linked
                    if not (_widens_to if widened else _same)(self._map(file), start, view):
                        continue
                except (OSError, ValueError):
                    continue
                self.links[image_name] = [file.name, start, end]
                return True
        return False

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as fh:
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def sizes(self) -> dict[str, int]:
        """The size of each linked file now: a file of another size is not the one linked."""
        return {file.name: len(mapped) for file, mapped in self._maps.items()
                if any(link[0] == file.name for link in self.links.values())}

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()


def intact(path: Path) -> bool:
    """Whether `path` holds a whole image of this format (its header read, its length checked)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            return header["__metadata__"].get("image") == str(FORMAT) and os.fstat(fh.fileno()).st_size == 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return False


class ImageModel:
    """A mapped image: the library's structures over its bytes. `sequence(capacity)` runs it."""

    def __init__(self, lib: Any, path: Path, threads: int, folder: Path) -> None:
        import numpy as np

        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        size = int.from_bytes(self._map[:8], "little")
        header = json.loads(self._map[8 : 8 + size])
        meta = header.pop("__metadata__")
        end = max(int(info["data_offsets"][1]) for info in header.values())
        if meta.get("image") != str(FORMAT) or len(self._map) != 8 + size + end:
            raise ValueError(f"not a whole image of format {FORMAT}")
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        base, start = self._bytes.ctypes.data, 8 + size
        self._at = {name: base + start + int(info["data_offsets"][0]) for name, info in header.items()}
        self._linked: list[Any] = []  # the checkpoint files' maps (numpy views), kept open
        sizes = json.loads(meta.get("linked_files", "{}"))
        bases: dict[str, int] = {}
        for name, (file, first, last) in json.loads(meta.get("links", "{}")).items():
            if file not in bases:
                if "/" in file or file in ("", ".", ".."):
                    raise ValueError(f"a link outside the model's folder: {file!r}")
                with open(folder / file, "rb") as fh:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                if len(mapped) != int(sizes[file]):  # not the file the image was made from
                    raise ValueError(f"{file} is not the linked file")
                view = np.frombuffer(mapped, dtype=np.uint8)
                self._linked.append(view)
                bases[file] = view.ctypes.data
            if not 0 <= int(first) <= int(last) <= int(sizes[file]):
                raise ValueError(f"a link past the end of {file}")
            self._at[name] = bases[file] + int(first)
        shape = json.loads(meta["shape"])
        eps, scale = json.loads(meta["eps_scale"])
        facts = json.loads(meta["facts"])
        self.facts = Facts(dtype=facts["dtype"], window=int(facts["window"]),
                           eos_ids=tuple(int(i) for i in facts["eos_ids"]), quantize=facts["quantize"])
        products = json.loads(meta["products"])
        self.lib = lib
        self.layers = (Layer * shape["layers"])()
        for i in range(shape["layers"]):
            layer = self.layers[i]
            for field in LINEARS:
                setattr(layer, field, self._lin(f"L{i}.{field}", products))
            layer.ln1, layer.ln2 = self._at[f"L{i}.ln1"], self._at[f"L{i}.ln2"]
        self.spec = Spec(**shape, capacity=0, threads=max(1, threads), eps=eps, scale=scale,
                         embed=self._at["embed"], norm=self._at["norm"], inv_freq=self._at["inv_freq"],
                         head=self._lin("head", products), layer=None, scratch=None)
        self.widest = max(self.spec.dim, self.spec.heads * self.spec.head_dim, self.spec.ffn)
        kinds = frozenset(kind for kind, _, _ in products.values())
        # the kinds the engine's step runs (an fp32 model's rows may be read from bf16 ones)
        self.kinds = frozenset(int(k) for k in json.loads(meta.get("runs", "null")) or kinds)
        if not self.kinds <= DEFAULT_KINDS or not kinds <= self.kinds | {BF16} or self.spec.bf16:
            raise ValueError(f"weight kinds {sorted(kinds)}")

    def _lin(self, name: str, products: dict[str, list[int]]) -> Lin:
        kind, out, inputs = products[name]
        return Lin(kind, out, inputs, self._at[f"{name}.w"], self._at.get(f"{name}.s"), self._at.get(f"{name}.b"))

    @classmethod
    def open(cls, lib: Any, path: Path, threads: int, folder: Path) -> "ImageModel | None":
        """The image at `path` of the model in `folder`; None where it is missing or unreadable (the
        engine writes it anew) or a checkpoint file it links is not the one it was made from."""
        try:
            model = cls(lib, path, threads, folder)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            return None
        quant_cache.touch(path)
        return model

    def use_threads(self, n: int) -> None:
        self.spec.threads = max(1, n)

    def sequence(self, capacity: int) -> "ImageSequence":
        return ImageSequence(self, capacity)


class ImageSequence:
    """One sequence through an image: its own KV cache of `capacity` positions."""

    def __init__(self, model: ImageModel, capacity: int) -> None:
        import numpy as np

        self.model, self.np = model, np
        count, s = len(model.layers), model.spec
        self.spec, self.layers = for_sequence(s, model.layers)
        self.spec.capacity = capacity
        self.kv = [np.empty((s.kv_heads, capacity, s.head_dim), dtype=np.float32) for _ in range(2 * count)]
        for i in range(count):
            self.layers[i].kc, self.layers[i].vc = self.kv[2 * i].ctypes.data, self.kv[2 * i + 1].ctypes.data
        self.scratch = np.empty(scratch_floats(self.spec, model.widest), dtype=np.float32)
        self.spec.scratch = self.scratch.ctypes.data
        self.length = 0

    def prefill(self, tokens: "list[int] | np.ndarray") -> "np.ndarray":
        """The logits [V] after `tokens`, run from the cache's length on."""
        np = self.np
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        work = np.empty(int(self.model.lib.hs_prefill_floats(ctypes.byref(self.spec))), dtype=np.float32)
        logits = np.empty(self.spec.vocab, dtype=np.float32)
        if self.model.lib.hs_prefill(ctypes.byref(self.spec), ids.ctypes.data, len(ids), self.length,
                                     logits.ctypes.data, work.ctypes.data) != 0:
            raise ValueError(f"{len(ids)} tokens from position {self.length}: out of range")
        self.length += len(ids)
        return logits

    def step(self, token: int, position: int) -> "np.ndarray":
        """The logits [V] after `token` at `position` (the cache's length)."""
        if position != self.length:
            raise ValueError(f"position {position} is not the cache's length {self.length}")
        logits = self.np.empty(self.spec.vocab, dtype=self.np.float32)
        if self.model.lib.hs_step(ctypes.byref(self.spec), token, position, logits.ctypes.data) != 0:
            raise ValueError(f"token {token} at position {position} is out of range")
        self.length += 1
        return logits


__all__ = ["FORMAT", "Facts", "ImageModel", "ImageSequence", "checkpoint_tensors", "name_for", "path_for", "save", "scheme"]
