"""A GGUF file's header, read and checked before any library sees the file.

GGUF (llama.cpp's format) starts with a header: magic `GGUF`, a version, the counts of tensors and
metadata entries, the metadata (typed key/value pairs, arrays included), then one entry per tensor
(name, shape, quantization type, offset into the data section). Every count and length in it is
untrusted: the reader here bounds each one by the bytes the file still has, caps nesting and
dimensions, and checks that every tensor's bytes lie inside the data section without overlap. So a
truncated, hostile or huge-header file costs one pass over its header and gives one InvalidInput,
and a file that passes is safe to hand to transformers' GGUF loader (gguf-py's reader).

Pure Python; the quantization block sizes come from the gguf package's own table.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hyprstream_tui.errors import InvalidInput

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp itself no longer reads it
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_STRING = 64 << 20  # a chat template or a token: far below this
MAX_DEPTH = 3  # arrays of arrays: the spec allows it, no model needs more than one level
MAX_KEEP = 256  # array items kept in `metadata` (longer arrays: only their length)
DEFAULT_ALIGNMENT = 32
# Value types of the metadata: struct format (little-endian) per scalar type.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    type_name: str  # F32, F16, BF16, Q4_1, Q8_0, ...
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # long arrays are replaced by their length: {"tokenizer.ggml.tokens": 49152}
    tensors: tuple[GGUFTensor, ...]
    data_offset: int
    file_size: int
    array_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"

    def quant_types(self) -> Counter[str]:
        """How many tensors of each type: Counter({'Q4_1': 210, 'F32': 61, 'Q8_0': 1})."""
        return Counter(t.type_name for t in self.tensors)


class _Reader:
    """Bounded little-endian reads from a file of known size."""

    def __init__(self, fh: BinaryIO, size: int, bad: str) -> None:
        self.fh, self.size, self.bad, self.pos = fh, size, bad, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise InvalidInput(f"{self.bad} ({what} runs past the end of the file): the file is truncated or corrupt.")
        data = self.fh.read(n)
        if len(data) != n:
            raise InvalidInput(f"{self.bad} (truncated in {what}): re-download or re-export it.")
        self.pos += n
        return data

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        if length > MAX_STRING:
            raise InvalidInput(f"{self.bad} ({what} claims {length} bytes): the file is corrupt.")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{self.bad} ({what} is not UTF-8): the file is corrupt.") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> tuple[Any, int | None]:
        """(value, array length or None); arrays longer than MAX_KEEP keep only their length."""
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], what), None
        if vtype == STRING:
            return self.string(what), None
        if vtype != ARRAY:
            raise InvalidInput(f"{self.bad} ({what} has unknown value type {vtype}): the file is corrupt.")
        if depth >= MAX_DEPTH:
            raise InvalidInput(f"{self.bad} ({what} nests arrays more than {MAX_DEPTH} deep): the file is corrupt.")
        item_type = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        smallest = struct.calcsize(SCALARS[item_type]) if item_type in SCALARS else 8
        if count * smallest > self.left():
            raise InvalidInput(f"{self.bad} ({what} claims {count} items, more than the file holds): "
                               "the file is truncated or corrupt.")
        items = []
        for _ in range(count):  # read every item (to check it); keep a short array's
            item = self.value(item_type, what, depth + 1)[0]
            if count <= MAX_KEEP:
                items.append(item)
        return (items if count <= MAX_KEEP else count), count


def _type_sizes() -> dict[int, tuple[str, int, int]]:
    """GGML type id -> (name, elements per block, bytes per block), from gguf-py's table."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        raise InvalidInput("Reading GGUF files needs the gguf package: pip install gguf") from None
    return {int(t): (t.name, block, size) for t, (block, size) in GGML_QUANT_SIZES.items()}


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and check a GGUF header; raise InvalidInput (one line) on anything malformed."""
    bad = f"{path.name} is not a valid GGUF file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            r = _Reader(fh, size, bad)
            if r.left() < 4 or fh.read(4) != MAGIC:
                raise InvalidInput(f"{bad} (it does not start with 'GGUF'): give a .gguf model file.")
            r.pos = 4
            version = r.unpack("<I", "the version")
            if version not in VERSIONS:
                raise InvalidInput(f"{bad} (GGUF version {version}; versions 2 and 3 are read): "
                                   "convert it again with a current llama.cpp.")
            n_tensors, n_kv = r.unpack("<Q", "the tensor count"), r.unpack("<Q", "the metadata count")
            if n_kv * 13 > r.left() or n_tensors * 24 > r.left():  # the smallest entry of each
                raise InvalidInput(f"{bad} (it claims {n_tensors} tensors and {n_kv} metadata entries, "
                                   "more than the file holds): the file is truncated or corrupt.")
            metadata, lengths = _read_metadata(r, n_kv)
            infos = [_read_tensor_info(r, i) for i in range(n_tensors)]
            header_end = r.pos
    except OSError as exc:
        raise InvalidInput(f"Cannot read {path.name}: {exc.strerror}.") from exc
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 16 \
            or alignment & (alignment - 1):
        raise InvalidInput(f"{bad} (general.alignment {alignment!r} is not a power of two): the file is corrupt.")
    data_offset = -(-header_end // alignment) * alignment
    tensors = _check_tensors(infos, size - data_offset, alignment, bad)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset,
                      file_size=size, array_lengths=lengths)


def _read_metadata(r: _Reader, count: int) -> tuple[dict[str, Any], dict[str, int]]:
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for i in range(count):
        key = r.string(f"metadata key {i}")
        vtype = r.unpack("<I", f"the type of {key!r}")
        value, length = r.value(vtype, repr(key))
        if key in metadata:
            raise InvalidInput(f"{r.bad} (metadata key {key!r} appears twice): the file is corrupt.")
        metadata[key] = value
        if length is not None:
            lengths[key] = length
    return metadata, lengths


def _read_tensor_info(r: _Reader, i: int) -> tuple[str, tuple[int, ...], int, int]:
    name = r.string(f"the name of tensor {i}")
    n_dims = r.unpack("<I", f"the shape of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise InvalidInput(f"{r.bad} (tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS}): the file is corrupt.")
    shape = tuple(r.unpack("<Q", f"the shape of {name!r}") for _ in range(n_dims))
    return name, shape, r.unpack("<I", f"the type of {name!r}"), r.unpack("<Q", f"the offset of {name!r}")


def _check_tensors(infos: list[tuple[str, tuple[int, ...], int, int]], data_len: int, alignment: int,
                   bad: str) -> tuple[GGUFTensor, ...]:
    sizes = _type_sizes()
    tensors: list[GGUFTensor] = []
    seen: set[str] = set()
    for name, shape, type_id, offset in infos:
        if name in seen:
            raise InvalidInput(f"{bad} (tensor {name!r} appears twice): the file is corrupt.")
        seen.add(name)
        if type_id not in sizes:
            raise InvalidInput(f"{bad} (tensor {name!r} has unknown type {type_id}): "
                               "a newer llama.cpp may have written it; re-export it in a common type.")
        type_name, block, block_bytes = sizes[type_id]
        elements = 1
        for dim in shape:
            if not 0 < dim <= data_len * 8:  # no element is smaller than 1/8 byte
                raise InvalidInput(f"{bad} (tensor {name!r} has shape {list(shape)}): the file is corrupt.")
            elements *= dim
        if shape[0] % block or elements > data_len * 8:
            raise InvalidInput(f"{bad} (tensor {name!r} of shape {list(shape)} does not fit type {type_name}): "
                               "the file is corrupt.")
        nbytes = elements // block * block_bytes
        if offset % alignment or offset + nbytes > data_len:
            raise InvalidInput(f"{bad} (tensor {name!r} lies outside the file's data): the file is truncated or corrupt.")
        tensors.append(GGUFTensor(name, shape, type_name, offset, nbytes))
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_s, end, first), (start, _e, second) in zip(spans, spans[1:]):
        if start < end:
            raise InvalidInput(f"{bad} (tensors {first!r} and {second!r} overlap): the file is corrupt.")
    return tuple(tensors)
