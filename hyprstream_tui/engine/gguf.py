"""GGUF in: a llama.cpp / Ollama / LM Studio model file imported as an ordinary model repository.

The steps, each its own function:
1. `read_gguf_header` (store.gguf) checks the whole header with bounded reads, so nothing hostile
   reaches a library; the architecture must be one transformers' GGUF loader reads.
2. transformers' own GGUF loading (`from_pretrained(dir, gguf_file=...)`, through the gguf package)
   dequantizes the weights and builds the config, tokenizer and chat template.
3. `stored_dtype` picks the smallest dtype that holds every dequantized value exactly: nothing is
   lost against the file. F16 and BF16 weights stay as they are; F32 stays F32 unless its values
   all fit the half type exactly (the F32 norms of an F16 export do); quantized blocks (scale x
   small integer + offset) need more bits than a half type has, so they become float32.
4. `save_pretrained` writes safetensors into a folder under the home's cache, which
   `Store.import_model` stores (hard links, one commit) with the source's name, size, sha256,
   architecture and tensor types as trailers. The folder is removed afterwards, or by the next
   GGUF import if this process was killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from hyprstream_tui.errors import Conflict, HyprError, InvalidInput, NotFound, disk_full, is_disk_full
from hyprstream_tui.store.gguf import GGUFHeader, read_gguf_header
from hyprstream_tui.store.types import Progress

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import torch

    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store.store import Store
    from hyprstream_tui.store.types import ModelSummary

NOT_ARCHITECTURES = {"general", "tokenizer"}  # keys of transformers' table that name no model
HALF_TYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Converted:
    folder: Path
    dtype: str
    dtype_reason: str


def supported_architectures() -> tuple[str, ...]:
    """The GGUF architectures transformers' loader reads (llama, mistral, qwen2, ...)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return tuple(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in NOT_ARCHITECTURES)


def is_gguf(path: Path) -> bool:
    """A path meant as a GGUF file: named .gguf, or a file that starts with GGUF's magic."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf(path: Path) -> GGUFHeader:
    """The header of a readable GGUF model file, or one InvalidInput/NotFound line."""
    if not path.exists():
        raise NotFound(f"No file {path}: give the path of a .gguf file.")
    if not path.is_file():
        raise InvalidInput(f"{path} is not a file: give the path of a .gguf file.")
    header = read_gguf_header(path)
    arch = header.architecture
    supported = supported_architectures()
    if arch not in supported:
        raise InvalidInput(f"{path.name} is a {arch!r} model, which transformers' GGUF loader cannot read: "
                           f"it reads {', '.join(sorted(supported))}.")
    if not header.tensors:
        raise InvalidInput(f"{path.name} holds no tensors: it is not a model file.")
    return header


def sha256_file(path: Path, progress: Callable[[Progress], None] | None = None) -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
            done += len(block)
            if progress:
                progress(Progress(f"{path.name}: sha256", done, total))
    return digest.hexdigest()


def stored_dtype(tensors: Mapping[str, torch.Tensor], source_types: Mapping[str, int]) -> tuple[str, str]:
    """(dtype name, why): the smallest dtype holding every value of `tensors` (float32) exactly."""
    import torch

    order = HALF_TYPES[::-1] if "BF16" in source_types and "F16" not in source_types else HALF_TYPES
    types = ", ".join(sorted(source_types))
    for name in order:
        dt = getattr(torch, name)
        if all(torch.equal(t.to(dt).to(t.dtype), t) for t in tensors.values()):
            return name, f"every value of the file's {types} tensors is exact in {name}"
    lossy = [t for t in sorted(source_types) if t not in ("F32", "F16", "BF16")] or ["F32"]
    return "float32", (f"{', '.join(lossy)} values need more bits than float16 or bfloat16 hold; "
                       "float32 holds them exactly")


def convert(path: Path, dest: Path, header: GGUFHeader) -> Converted:
    """Dequantize `path` with transformers and write it to `dest` as a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyprstream_tui.engine.loader import quiet_transformers

    quiet_transformers()
    # transformers reads the file from a folder of its own, so nothing else beside the file
    # (a config.json of another model, say) is mistaken for part of it.
    view = dest.parent / (dest.name + ".src")
    view.mkdir()
    (view / "model.gguf").symlink_to(path.resolve())
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(view), gguf_file="model.gguf")
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar ignores disable_progress_bar()
            model = AutoModelForCausalLM.from_pretrained(str(view), gguf_file="model.gguf", dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"transformers could not read {path.name} ({type(exc).__name__}: {text}): "
                           "check that the file is complete, or convert it with a current llama.cpp.") from None
    finally:
        shutil.rmtree(view, ignore_errors=True)
    # The weights are plain tensors now; what is left of the GGUF "quantizer" only stops save_pretrained.
    # torch types Module.__setattr__'s value as Tensor | Module; any value is accepted
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dtype, reason = stored_dtype(dict(model.state_dict()), header.quant_types())
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    dest.mkdir()
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return Converted(dest, dtype, reason)


def default_name(path: Path) -> str:
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem


def _sweep(cache: Path) -> None:
    """Conversion folders of processes that were killed."""
    if not cache.is_dir():
        return
    for entry in cache.glob("gguf-*.incomplete*"):
        try:
            pid = int(entry.name.split("-")[1])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def import_gguf(store: "Store", path: Path | str, *, name: str | None = None,
                progress: Callable[[Progress], None] | None = None) -> "ModelSummary":
    """Import the GGUF file `path` as model `name` (default: the file's name without .gguf)."""
    from hyprstream_tui import names

    path = Path(path).expanduser().absolute()
    name = names.model_name(name if name is not None else default_name(path))
    if (store.paths.models / name).exists():
        raise Conflict(f"A model named {name!r} exists already: choose another `name` or remove it first.")
    header = check_gguf(path)
    digest = sha256_file(path, progress)
    cache = store.paths.cache
    cache.mkdir(parents=True, exist_ok=True)
    _sweep(cache)
    work = cache / f"gguf-{os.getpid()}-{uuid.uuid4().hex[:8]}.incomplete"
    try:
        if progress:
            progress(Progress(f"{path.name}: dequantizing", 0, 0))
        try:
            converted = convert(path, work, header)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(f"converting {path.name}") from None
            raise
        types = header.quant_types()
        trailers = {
            "source": f"gguf:{path}",
            "gguf-file": path.name,
            "gguf-size": header.file_size,
            "gguf-sha256": digest,
            "gguf-architecture": header.architecture,
            "gguf-types": ", ".join(f"{t} x{n}" for t, n in sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
            "dtype": converted.dtype,
            "dtype-reason": converted.dtype_reason,
        }
        return store.import_model(converted.folder, name=name, link=True, progress=progress,
                                  summary=f"Import {path.name}", trailers=trailers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work.parent / (work.name + ".src"), ignore_errors=True)


def import_in_child(paths: "Paths", path: Path | str, *, name: str | None,
                    progress: Callable[[Progress], None] | None = None) -> "ModelSummary":
    """`import_gguf` in a child of the forkserver (torch is never imported by the TUI's process);
    progress events cross back as they happen, an error as its own HyprError class."""
    from hyprstream_tui.engine.forkserver import context, rebuild_error

    ctx = context()
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs, paths, str(path), name), name="hyprstream-gguf-import")
    proc.start()
    theirs.close()
    outcome: tuple | None = None
    try:
        while outcome is None:
            try:
                message = ours.recv()
            except (EOFError, OSError):
                break
            if message[0] == "progress":
                if progress:
                    progress(message[1])
            else:
                outcome = message
    finally:
        proc.join()
        ours.close()
    if outcome is not None and outcome[0] == "done":
        return outcome[1]
    if outcome is not None:
        raise rebuild_error(outcome[1], outcome[2]) or HyprError(outcome[2])
    raise HyprError(f"The import of {Path(path).name} ended without a result (exit code {proc.exitcode}): "
                    "see logs/engine.log; nothing was added.")


def _child(conn: "Connection", paths: "Paths", path: str, name: str | None) -> None:
    from hyprstream_tui.engine.forkserver import log_to
    from hyprstream_tui.store import Store

    log_to(paths.home / "logs" / "engine.log")
    try:
        summary = import_gguf(Store(paths), path, name=name, progress=lambda p: conn.send(("progress", p)))
        conn.send(("done", summary))
    except HyprError as exc:
        conn.send(("error", type(exc).__name__, exc.message))
    except BaseException as exc:  # noqa: BLE001 - a bug: reported as one line
        conn.send(("error", "HyprError", f"The import failed: {type(exc).__name__}: {exc}"))
