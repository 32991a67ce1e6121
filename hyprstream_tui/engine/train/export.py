"""Taking an adapter out of the store: one .safetensors file, a PEFT folder, or a merged model.

- `export_adapter(..., fmt="safetensors")`: the adapter's weights with PEFT key names in one file;
  its metadata names the base model, the base commit, the adapter commit and the LoRA config
  (`peft_config`, the JSON of adapter_config.json), so the file alone is enough to load it.
- `export_adapter(..., fmt="peft")`: a folder `PeftModel.from_pretrained(base, DIR)` loads.
- `merge_adapter`: base + adapter merged into a new model repository whose first commit records
  the base commit and the adapter commit it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hyprstream_tui import names
from hyprstream_tui.errors import Conflict, InvalidInput, disk_full, is_disk_full
from hyprstream_tui.store.atomic import disk_error, write_bytes
from hyprstream_tui.store.locks import is_locked, locked

if TYPE_CHECKING:
    from hyprstream_tui.store import Store
    from hyprstream_tui.store.types import AdapterInfo, ModelSummary

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# Files of a base model folder that a merged model gets from save_pretrained instead.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")
_REGENERATED = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class Exported:
    path: Path
    commit: str
    size: int


def _adapter_files(store: Store, model: str, ref: str, rev: str | None) -> tuple[AdapterInfo, Path]:
    adapter = store.resolve_adapter(model, ref, rev)
    folder = store.snapshot(model, adapter.tip, "adapter")
    if not (folder / WEIGHTS).is_file():
        raise InvalidInput(f"Adapter {adapter.name!r} has no trained weights at {adapter.tip[:7]}: train it first "
                           f"(`hyprstream lora train start {adapter.name}`).")
    return adapter, folder


def _metadata(adapter: AdapterInfo, folder: Path) -> dict[str, str]:
    return {"format": "pt", "base_model": adapter.model, "base_commit": adapter.base_commit or "",
            "adapter": adapter.name, "adapter_commit": adapter.tip,
            "peft_config": json.dumps(json.loads((folder / CONFIG).read_text()), sort_keys=True)}


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The same safetensors file with its `__metadata__` replaced (tensor bytes untouched)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:]


def _check_output(store: Store, output: Path, *, force: bool, is_dir: bool) -> Path:
    text = str(output)
    if not text or "\x00" in text or any(ord(ch) < 32 for ch in text):
        raise InvalidInput("The `output` path is empty or has control characters.")
    output = Path(os.path.abspath(Path(text).expanduser()))
    home = store.paths.home.resolve()
    if output.resolve() == home or home in output.resolve().parents:
        raise InvalidInput(f"Export outside the store ({home}): its folders are managed by hyprstream.")
    if not output.parent.is_dir():
        raise InvalidInput(f"The folder {output.parent} does not exist: create it first.")
    if not is_dir and output.suffix != ".safetensors":
        raise InvalidInput(f"The output {output.name!r} must end in .safetensors (or set `format` to peft and `output` to a folder).")
    if output.exists() and not force:
        raise Conflict(f"{output} exists already: choose another `output` or set `force`.")
    if output.exists() and (output.is_dir() != is_dir):
        raise Conflict(f"{output} exists and is a {'folder' if output.is_dir() else 'file'}: choose another `output`.")
    if is_dir and output.is_dir() and any(output.iterdir()) and not (output / CONFIG).is_file():
        raise Conflict(f"{output} is a folder that holds no adapter: `force` replaces only an earlier export.")
    return output


def export_adapter(store: Store, model: str, ref: str, output: Path | str, *, fmt: str = "safetensors",
                   rev: str | None = None, force: bool = False) -> Exported:
    if fmt not in ("safetensors", "peft"):
        raise InvalidInput(f"Unknown export format {fmt!r}: use safetensors or peft.")
    output = _check_output(store, Path(output), force=force, is_dir=fmt == "peft")
    adapter, folder = _adapter_files(store, model, ref, rev)
    data = with_metadata((folder / WEIGHTS).read_bytes(), _metadata(adapter, folder))
    if fmt == "safetensors":
        write_bytes(output, data)
        return Exported(output, adapter.tip, len(data))
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.incomplete")
    old = None
    try:
        write_bytes(tmp / WEIGHTS, data)
        write_bytes(tmp / CONFIG, (folder / CONFIG).read_bytes())
        if output.exists():  # moved aside, not removed in place: `output` is never half an export
            old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.old")
            os.rename(output, old)
        try:
            os.rename(tmp, output)
        except BaseException:
            if old is not None:
                os.rename(old, output)
                old = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return Exported(output, adapter.tip, len(data) + (folder / CONFIG).stat().st_size)


def merge_adapter(store: Store, model: str, ref: str, new_name: str, *, rev: str | None = None,
                  dtype: str = "auto") -> ModelSummary:
    """Merge the adapter into its base and import the result as model `new_name`."""
    from hyprstream_tui.engine.train.loop import load_base_model, peft_model

    new_name = names.model_name(new_name)
    if (store.paths.models / new_name).exists():
        raise Conflict(f"A model named {new_name!r} exists already: choose another `name`.")
    # Held while cache/merge-<name>-<id> exists; the folders of killed merges (lock free) are swept.
    with locked(store.paths.locks / f"merge-{new_name}.lock", f"A merge into {new_name!r}", wait=0):
        _sweep_merge_leftovers(store, new_name)
        adapter, folder = _adapter_files(store, model, ref, rev)
        base_dir = store.model_dir(model)
        base_commit = store.head(model)
        merged = peft_model(load_base_model(base_dir, dtype=dtype), folder, seed=0, trainable=False).merge_and_unload()
        tmp = store.paths.cache / f"merge-{new_name}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                merged.save_pretrained(str(tmp))
                for src in sorted(base_dir.iterdir()):
                    if src.is_file() and not src.name.startswith(".") and not src.name.endswith(_NOT_COPIED) \
                            and src.name not in _REGENERATED:
                        shutil.copyfile(src, tmp / src.name)
            except Exception as exc:  # OSError, or safetensors' SafetensorError "File too large (os error 27)"
                if is_disk_full(exc):
                    raise disk_full(f"writing the merged model {new_name}") from exc
                if isinstance(exc, OSError):
                    raise disk_error(exc, f"writing the merged model {new_name}") from exc
                raise
            trailers = {"source": f"merge:{model}:{adapter.name}", "base-model": model, "base-commit": base_commit,
                        "adapter": adapter.name, "adapter-commit": adapter.tip}
            return store.import_model(tmp, name=new_name, link=True, summary=f"Merge adapter {adapter.name} into {model}",
                                      trailers=trailers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _sweep_merge_leftovers(store: Store, own: str) -> None:
    """Remove `cache/merge-<name>-<id>` folders that killed merges left (their merge lock is free,
    or it is `own`, held by the caller): each can be a whole model's size."""
    for entry in store.paths.cache.glob("merge-*"):
        name = entry.name[len("merge-"):].rsplit("-", 1)[0]
        if entry.is_dir() and (name == own or not is_locked(store.paths.locks / f"merge-{name}.lock")):
            shutil.rmtree(entry, ignore_errors=True)
