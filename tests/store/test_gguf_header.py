"""The GGUF header check (store/gguf.py): what a valid file gives, and one InvalidInput for every
kind of damage, against files written by gguf-py's own writer and headers built byte by byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.store.gguf import read_gguf_header
from tests.gguf_files import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensor_type="Q8_0")


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(value)


def header(*, version: int = 3, n_tensors: int = 1, kvs: bytes | None = None, n_kv: int = 1,
           tensors: bytes | None = None, data: bytes = b"\0" * 64) -> bytes:
    """A GGUF file by hand: one llama metadata entry and one 4x8 F32 tensor unless told otherwise."""
    kvs = kv_string("general.architecture", "llama") if kvs is None else kvs
    tensors = (s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<I", 0) + struct.pack("<Q", 0)) \
        if tensors is None else tensors
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensors
    return head + b"\0" * (-len(head) % 32) + data


def check(tmp_path: Path, data: bytes, *needles: str) -> InvalidInput:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(InvalidInput) as err:
        read_gguf_header(path)
    message = err.value.message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return err.value


def test_a_file_from_gguf_py_reads_as_written(tiny_gguf):
    import gguf

    h = read_gguf_header(tiny_gguf)
    reference = gguf.GGUFReader(str(tiny_gguf))
    assert h.version == 3 and h.architecture == "llama"
    assert h.quant_types() == {"Q8_0": 16, "F32": 5}  # norms stay F32, as llama.cpp writes them
    assert [t.name for t in h.tensors] == [t.name for t in reference.tensors]
    assert [t.type_name for t in h.tensors] == [t.tensor_type.name for t in reference.tensors]
    assert [t.shape for t in h.tensors] == [tuple(int(d) for d in t.shape) for t in reference.tensors]
    assert h.data_offset == reference.data_offset
    assert h.array_lengths["tokenizer.ggml.tokens"] == 1024
    assert isinstance(h.metadata["tokenizer.ggml.tokens"], int)  # a long array keeps its length only
    assert h.metadata["llama.block_count"] == 2


def test_the_hand_built_header_is_valid(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(header())
    h = read_gguf_header(path)
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in h.tensors] == [("t", (4, 4), "F32", 64)]


def test_every_truncation_is_refused(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    h = read_gguf_header(tiny_gguf)
    cuts = sorted({0, 3, 4, 7, 12, 23, 24, h.data_offset - 1, h.data_offset, len(data) - 1,
                   *range(25, h.data_offset, max(1, h.data_offset // 60))})
    for cut in cuts:
        check(tmp_path, data[:cut])


@pytest.mark.parametrize("data, needle", [
    (b"GGML" + b"\0" * 40, "does not start with 'GGUF'"),
    (header(version=1), "version 1"),
    (header(version=99), "version 99"),
    (header(n_tensors=2**60), "more than the file holds"),
    (header(n_kv=2**62), "more than the file holds"),
    (header(kvs=struct.pack("<Q", 2**40) + b"general"), "claims"),
    (header(kvs=s("general.architecture") + struct.pack("<I", 77)), "unknown value type 77"),
    (header(kvs=s("a") + struct.pack("<IIQ", 9, 8, 2**40)), "more than the file holds"),
    (header(kvs=s("a") + struct.pack("<II", 9, 9) + struct.pack("<QI", 1, 9) + struct.pack("<QI", 1, 9)
            + struct.pack("<QI", 1, 9) + struct.pack("<Q", 0), n_kv=1), "nests arrays"),
    (header(kvs=struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<II", 4, 1)), "not UTF-8"),
    (header(kvs=kv_string("general.architecture", "llama") * 2, n_kv=2), "appears twice"),
    (header(kvs=kv_string("general.architecture", "llama") + s("general.alignment") + struct.pack("<II", 4, 3), n_kv=2),
     "power of two"),
    (header(tensors=s("t") + struct.pack("<I", 9)), "dimensions"),
    (header(tensors=s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 99, 0)), "unknown type 99"),
    (header(tensors=s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 32)), "outside"),
    (header(tensors=s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<IQ", 0, 3)), "outside"),
    (header(tensors=s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 2**40, 2**40) + struct.pack("<IQ", 0, 0)), "shape"),
    (header(tensors=s("t") + struct.pack("<I", 1) + struct.pack("<Q", 0) + struct.pack("<IQ", 0, 0)), "shape"),
    (header(tensors=s("t") + struct.pack("<I", 2) + struct.pack("<QQ", 16, 1) + struct.pack("<IQ", 8, 0)), "does not fit"),
    (header(n_tensors=2, tensors=(s("a") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 0)) * 2),
     "appears twice"),
    (header(n_tensors=2, tensors=s("a") + struct.pack("<I", 1) + struct.pack("<Q", 16) + struct.pack("<IQ", 0, 0)
            + s("b") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 32)), "overlap"),
])
def test_damage_gives_one_line(tmp_path, data, needle):
    check(tmp_path, data, needle)


def test_a_sparse_file_with_a_huge_claimed_key_costs_nothing(tmp_path):
    """A 1 GiB sparse file whose first key claims 1 GiB, or whose header claims 2**40 tensors: refused
    without reading or allocating what it claims."""
    import tracemalloc

    path = tmp_path / "sparse.gguf"
    for head in (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 30),
                 b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0)):
        with open(path, "wb") as fh:
            fh.write(head)
            fh.truncate(1 << 30)
        tracemalloc.start()
        with pytest.raises(InvalidInput):
            read_gguf_header(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 1 << 20
