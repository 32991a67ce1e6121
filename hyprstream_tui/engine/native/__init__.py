"""Inference without transformers' imports: our own decoder classes, the checkpoint memory-mapped,
the tokenizer through `tokenizers`. `engine.loader` uses it where it applies (`LoadOptions.native`,
CPU, safetensors, an architecture `model.NativeConfig` covers) and transformers everywhere else.

`load(folder, dtype)` returns (model, tokenizer), or raises `Unsupported` before any weight is read.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import TYPE_CHECKING

from hyprstream_tui.engine.native.unsupported import Unsupported

if TYPE_CHECKING:
    import torch

    from hyprstream_tui.engine.native.model import NativeForCausalLM
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I8": "int8", "U8": "uint8", "BOOL": "bool", "F64": "float64"}


def load(folder: Path, dtype: "torch.dtype | None") -> tuple["NativeForCausalLM", "NativeTokenizer"]:
    """The model in `folder` with its weights in `dtype` (None: as stored, nothing read until
    used), and its tokenizer."""
    from hyprstream_tui.engine.native.model import NativeConfig, build, load_weights
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer

    config = NativeConfig.read(folder)
    tokenizer = NativeTokenizer.read(folder)
    files = checkpoint_files(folder)
    generation_file = folder / "generation_config.json"
    try:
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    except (OSError, ValueError, RecursionError):
        generation = {}
    model = build(config, generation if isinstance(generation, dict) else {})
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_safetensors(file))
    load_weights(model, tensors, dtype)
    return model.eval().requires_grad_(False), tokenizer


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise Unsupported("model.safetensors.index.json is malformed") from None
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise Unsupported("no model.safetensors")


def read_safetensors(path: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of a safetensors file, as views of one private (copy-on-write) memory map:
    pages are read when first touched, and nothing is copied until written."""
    import torch

    with open(path, "rb") as fh:
        try:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError:  # an empty file
            raise Unsupported(f"{path.name} is empty") from None
    try:
        size = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        base = 8 + size
        out: dict[str, torch.Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = getattr(torch, DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            shape = [int(n) for n in info["shape"]]
            count = 1
            for n in shape:
                count *= n
            if count == 0:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + int(start))
            if flat.numel() * flat.element_size() != int(end) - int(start):
                raise ValueError(f"{name}: its offsets do not match its shape")
            out[name] = flat.view(shape)
        return out
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise Unsupported(f"{path.name}: {type(exc).__name__}: {exc}") from None


__all__ = ["Unsupported", "checkpoint_files", "load", "read_safetensors"]
