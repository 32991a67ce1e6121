"""Promise 4 of the reliability suite: malformed files give a typed error, never a crash, a hang or
a memory blow-up; pickle payloads never run.

- In this process (pure Python, no torch): Hypothesis over safetensors files (random bytes, huge
  header lengths, overlapping / out-of-range / non-integer offsets, truncation, unknown dtypes,
  non-JSON and non-object headers, JSON nested 50 000 deep), GGUF headers (byte flips, hostile
  counts, lengths, dimensions and offsets, truncation; what we accept, gguf-py's reader reads
  alike), config.json and data/samples.jsonl.
  Each case: a result or our own HyprError (one line), under a 5 s alarm, and tracemalloc's peak
  must stay within a few times the file's size (nothing is allocated from an untrusted length).
  A safetensors file our check accepts must also load with the reference implementation.
- Through the real store: malformed weights never leave a model, a temp folder or a lock behind.
- Through the real CLI: one line on stderr for a malformed header, config, samples file and pickle.
- In a subprocess capped by RLIMIT_AS (tests/reliability/fuzz_worker.py): config.json,
  tokenizer.json, tokenizer_config.json, adapter_config.json mutations through the loaders;
  hostile and random chat templates (errors, sandbox escapes, endless loops, doubling lists);
  pickle payloads (raw and torch-zip, .bin and .pt) through load_model and adapter loading, with and
  without allow_pickle: the marker file the payload would create never appears.

Default: derandomized (the same cases on every run). HYPRSTREAM_LONG_TESTS=1: 10x the examples,
random seeds (HYPRSTREAM_FUZZ_SEED to replay one).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from hyprstream_tui.engine.train.data import parse_jsonl
from hyprstream_tui.errors import HyprError, InvalidInput, UnsafeContent
from hyprstream_tui.store.inspect import DTYPE_BYTES, read_config, read_safetensors_header
from tests.helpers import REPO_ROOT, assert_one_line_error

LONG = os.environ.get("HYPRSTREAM_LONG_TESTS") == "1"
SEED = int(os.environ.get("HYPRSTREAM_FUZZ_SEED", str(random.randrange(1 << 30) if LONG else 0)))
SCALE = 10 if LONG else 1
COUNTS: Counter[str] = Counter()


def fuzz(examples: int):
    """Hypothesis settings: derandomized by default, random (but printed, replayable) when long."""
    chosen = settings(max_examples=examples * SCALE, derandomize=not LONG, database=None, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                             HealthCheck.filter_too_much, HealthCheck.data_too_large])
    return (lambda fn: chosen(fn)) if not LONG else (lambda fn: seed(SEED)(chosen(fn)))


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    mode = f"long, seed {SEED}" if LONG else "default, derandomized"
    print(f"\nfuzz cases run ({mode}): {sum(COUNTS.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))


class Alarm(Exception):
    pass


@contextmanager
def within(seconds: int):
    def ring(signum, frame):
        raise Alarm(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def typed(target: str, fn, *args, size: int = 0):
    """The result of fn(*args) or its HyprError; anything else fails the case. Also: under 5 s,
    and Python allocations peak under 4x the input plus 1 MiB."""
    COUNTS[target] += 1
    tracemalloc.start()
    try:
        with within(5):
            return fn(*args)
    except HyprError as exc:
        assert "\n" not in exc.message and exc.message, exc.message
        return exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 4 * size + (1 << 20), f"{target}: peak {peak} bytes for a {size}-byte input"


def read_header(tmp_path_factory, kind: str, reader, data: bytes):
    """`data` as a fuzz.<kind> file through `reader`: its result, or None after checking that the
    refusal was one InvalidInput line (`typed` checks time and memory)."""
    path = tmp_path_factory.getbasetemp() / f"fuzz.{kind}"
    path.write_bytes(data)
    result = typed(f"{kind} header", reader, path, size=len(data))
    if isinstance(result, HyprError):
        assert isinstance(result, InvalidInput), result
        return None
    COUNTS[f"{kind} accepted"] += 1
    return result


# ---- safetensors ---------------------------------------------------------------------------------
BAD_DTYPES = ["F33", "", "f32", "float32", "Q4_K", None, 4, ["F32"]]
ints = st.one_of(st.integers(-3, 70), st.integers(min_value=-(2**70), max_value=2**70),
                 st.sampled_from([2**32, 2**63 - 1, 2**64, 2**64 + 8]))
weird = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=4), ints)
tensor_meta = st.fixed_dictionaries(
    {"dtype": st.sampled_from(sorted(DTYPE_BYTES) + BAD_DTYPES),
     "shape": st.one_of(st.lists(st.integers(0, 6), max_size=3), st.lists(weird, max_size=3), weird),
     "data_offsets": st.one_of(st.lists(st.integers(0, 80), min_size=2, max_size=2), st.lists(ints, max_size=3), weird)},
    optional={"extra": weird})
header_doc = st.one_of(
    st.dictionaries(st.text(max_size=6), tensor_meta, max_size=4),
    st.dictionaries(st.text(max_size=6), tensor_meta, max_size=3).map(
        lambda d: {**d, "__metadata__": {"format": "pt"}}),
    st.dictionaries(st.text(max_size=6), weird, max_size=3).map(lambda d: {"__metadata__": d}),
    weird, st.lists(weird, max_size=3))


def _consistent(doc) -> dict:
    """Make offsets agree with shapes and dtypes where they are plausible (so valid files occur)."""
    if not isinstance(doc, dict):
        return doc
    at = 0
    for meta in doc.values():
        if isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and meta["dtype"] in DTYPE_BYTES and isinstance(meta.get("shape"), list) \
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 8 for d in meta["shape"]):
            n = math.prod(meta["shape"]) * DTYPE_BYTES[meta["dtype"]]
            meta["data_offsets"] = [at, at + n]
            at += n
    return doc


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "structured", "consistent", "consistent", "consistent", "deep", "not-json",
                                 "special"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "special":  # where Python's json and the reference's serde differ
        t = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
        raw = draw(st.sampled_from([f'{{"\\ud800":{t}}}', f'{{"a":{t},"__metadata__":{{"\\udfff":"x"}}}}',
                                    f'{{"a":{t},"a":{t}}}', f' {{"a":{t}}}  ', f'{{"a":{t},"__metadata__":null}}',
                                    f'{{"a":{t[:-1]},"dtype":"F64"}}}}', '{"a":' + t.replace("[1]", "[1.0]") + "}",
                                    '{"a":' + t.replace('"F32"', '["F32"]') + "}", '{"a":' + t.replace('"F32"', "{}") + "}"]))
        raw = raw.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "utf-32"])))
        return struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    if kind == "deep":
        raw = draw(st.sampled_from([b"[" * 50_000, b'{"a":' * 30_000, b"{" * 100_000]))
    elif kind == "not-json":
        raw = draw(st.binary(min_size=1, max_size=100))
    else:
        doc = draw(header_doc)
        raw = json.dumps(_consistent(doc) if kind == "consistent" else doc).encode()
    body = draw(st.binary(max_size=120))
    if kind == "consistent":  # mostly exactly the bytes the tensors cover
        covered = max([m["data_offsets"][1] for m in doc.values() if isinstance(m, dict)
                       and isinstance(m.get("data_offsets"), list) and len(m["data_offsets"]) == 2
                       and isinstance(m["data_offsets"][1], int)] + [0]) if isinstance(doc, dict) else 0
        body = b"\0" * max(0, min(covered + draw(st.sampled_from([0, 0, 0, 1, -1])), 1 << 16))
    length = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), st.integers(0, 2**64 - 1),
                            st.sampled_from([100 << 20, (100 << 20) + 1, 2**63, len(raw) + len(body) + 1])))
    data = struct.pack("<Q", length) + raw + body
    if draw(st.booleans()) and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    return data


@fuzz(250)
@given(data=safetensors_files())
def test_safetensors_headers_give_a_typed_error_or_a_file_that_loads(tmp_path_factory, data):
    from safetensors import deserialize  # the reference parser (Rust), any dtype

    result = read_header(tmp_path_factory, "safetensors", read_safetensors_header, data)
    if result is None:
        return
    loaded = dict(deserialize(data))  # what we accept, the reference implementation loads
    assert sorted(loaded) == sorted(t.name for t in result)
    for t in result:
        assert tuple(loaded[t.name]["shape"]) == t.shape and loaded[t.name]["dtype"].upper() == t.dtype


def test_a_sparse_file_claiming_a_huge_header_costs_nothing(tmp_path):
    """A 1 GiB sparse file whose header claims 99 MiB of JSON: refused after reading it once,
    and a header claiming more than the reference limit is not read at all."""
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 99 << 20) + b"[" * 4096)
        fh.truncate(1 << 30)
    assert isinstance(typed("safetensors header", read_safetensors_header, path, size=100 << 20), InvalidInput)
    with open(path, "r+b") as fh:
        fh.write(struct.pack("<Q", (1 << 30) - 8))
    assert isinstance(typed("safetensors header", read_safetensors_header, path, size=0), InvalidInput)


# ---- GGUF --------------------------------------------------------------------------------------------
def _gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _valid_gguf() -> bytes:
    """A small well-formed GGUF: a string, a u32, an array of strings, an F32 and a Q8_0 tensor."""
    kvs = (_gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")
           + _gguf_string(b"llama.block_count") + struct.pack("<II", 4, 1)
           + _gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3)
           + b"".join(_gguf_string(t) for t in (b"a", b"bc", b"<s>")))
    tensors = (_gguf_string(b"norm") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 0)
               + _gguf_string(b"w") + struct.pack("<I", 2) + struct.pack("<QQ", 32, 2) + struct.pack("<IQ", 8, 32))
    head = b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + kvs + tensors
    return head + b"\0" * (-len(head) % 32) + b"\0" * (32 + 68)


VALID_GGUF = _valid_gguf()
HOSTILE_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1]


@st.composite
def gguf_files(draw) -> bytes:
    data = bytearray(VALID_GGUF)
    kind = draw(st.sampled_from(["random", "flip", "flip", "u64", "u64", "truncate", "valid"]))
    if kind == "random":
        return b"GGUF" + draw(st.binary(max_size=300))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(4, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "u64":  # a count, length, dimension or offset replaced by a hostile value
        at = draw(st.integers(4, len(data) - 8))
        data[at:at + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64)))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return bytes(data)


@fuzz(250)
@given(data=gguf_files())
def test_gguf_headers_give_a_typed_error_or_a_file_gguf_py_reads(tmp_path_factory, data):
    import gguf

    from hyprstream_tui.store.gguf import read_gguf_header

    result = read_header(tmp_path_factory, "gguf", read_gguf_header, data)
    if result is None:
        return
    reference = gguf.GGUFReader(str(tmp_path_factory.getbasetemp() / "fuzz.gguf"))  # what we accept, llama.cpp's own Python reader reads alike
    assert [t.name for t in result.tensors] == [t.name for t in reference.tensors]
    assert [t.type_name for t in result.tensors] == [t.tensor_type.name for t in reference.tensors]
    assert [t.shape for t in result.tensors] == [tuple(int(d) for d in t.shape) for t in reference.tensors]
    assert result.data_offset == reference.data_offset


# ---- config.json and samples.jsonl --------------------------------------------------------------------
json_value = st.recursive(weird, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                          max_leaves=15)
raw_json_file = st.one_of(st.binary(max_size=200), json_value.map(lambda v: json.dumps(v).encode()),
                          st.sampled_from([b"[" * 50_000, b'{"a":' * 30_000, b"\xff\xfe{}", b"{}" * 3, b""]))


@fuzz(150)
@given(data=raw_json_file)
def test_config_json_gives_a_typed_error_or_a_dict(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "config.json"
    path.write_bytes(data)
    result = typed("config.json", read_config, path, size=len(data))
    assert isinstance(result, (dict, InvalidInput, UnsafeContent)), result
    if isinstance(result, dict):
        assert "auto_map" not in result


sample_row = st.one_of(
    json_value,
    st.fixed_dictionaries({"input": weird, "output": weird}, optional={"system": weird}),
    st.fixed_dictionaries({"messages": st.one_of(weird, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "", None]), "content": weird}), max_size=4))}))
jsonl_line = st.one_of(sample_row.map(lambda r: json.dumps(r).encode()), st.binary(max_size=60),
                       st.sampled_from([b"[" * 50_000, b"", b"   ", b'{"input": "a", "output": "b"', b"\xc3\x28"]))


@fuzz(250)
@given(lines=st.lists(jsonl_line, max_size=6))
def test_samples_jsonl_gives_a_typed_error_or_valid_rows(lines):
    data = b"\n".join(lines)
    result = typed("samples.jsonl", parse_jsonl, data, "data/samples.jsonl", size=len(data))
    if isinstance(result, HyprError):
        assert isinstance(result, InvalidInput) and "line" in result.message, result
        return
    for row in result:
        assert set(row) <= {"input", "output", "system", "messages"}
        assert all(isinstance(v, (str, list)) for v in row.values())


# ---- the real store: nothing left behind ---------------------------------------------------------------
def _bad_weights(draw_data: bytes, src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "model.safetensors").write_bytes(draw_data)
    return dest


@fuzz(12)
@given(data=safetensors_files())
def test_store_import_of_malformed_weights_leaves_nothing(tmp_path_factory, tiny_model_src, data):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    root = tmp_path_factory.mktemp("import")
    store = Store(Paths.from_env(root / "home"))
    src = _bad_weights(data, tiny_model_src, root / "bad")
    result = typed("store import", store.import_model, src, size=1 << 30)
    models = root / "home" / "models"
    left = sorted(p.name for p in models.iterdir()) if models.exists() else []
    if isinstance(result, HyprError):
        assert isinstance(result, InvalidInput), result
        assert left == [], left  # no model, no .import-* folder
    else:  # weights that happen to be valid: imported whole
        assert left == ["bad"], left


# ---- the real CLI: one line ------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_gives_one_line_for_malformed_files_and_never_unpickles(cli, home, tiny_model_src, tmp_path):
    marker = tmp_path / "PICKLE_RAN"
    deep = _bad_weights(struct.pack("<Q", 50_000) + b"[" * 50_000, tiny_model_src, tmp_path / "deep")
    assert_one_line_error(cli("model", "import", deep, "--name", "deep"), "safetensors")
    config = shutil.copytree(tiny_model_src, tmp_path / "config")
    (config / "config.json").write_bytes(b'{"a":' * 30_000)
    assert_one_line_error(cli("model", "import", config, "--name", "config"), "not valid json")
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"input": "a", "output": "b"}\n' + b"[" * 50_000 + b"\n")
    assert_one_line_error(cli("lora", "train", "sample", "x", "--file", rows), "line 2")

    pickled = shutil.copytree(tiny_model_src, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(marker)}))
    (pickled / "optimizer.pt").write_bytes(pickle.dumps(Payload(marker)))
    COUNTS["cli pickle"] += 4
    assert_one_line_error(cli("model", "import", pickled, "--name", "pickled"), "pickle", "--allow-pickle")
    assert not (home / "models" / "pickled").exists()
    result = cli("model", "import", pickled, "--name", "pickled", "--allow-pickle")  # stored, never unpickled
    assert result.returncode == 0, result.stderr
    result = cli("infer", "pickled", "--prompt", "hi", "--max-tokens", "2", "--allow-pickle")
    assert_one_line_error(result)  # transformers' weights_only unpickler refuses the payload
    assert not marker.exists(), "a pickle payload ran"
    COUNTS["cli malformed"] += 3


# ---- the loaders, tokenizer, adapter config, chat templates, pickle: in a capped subprocess ---------
def test_loaders_templates_and_pickle_in_a_capped_process(tiny_model_src, tmp_path):
    examples = 8 * SCALE
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz_worker.py")), str(tiny_model_src),
                           str(tmp_path / "work"), str(examples), "0" if LONG else "1", str(SEED)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300 * SCALE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for target, n in report["cases"].items():
        COUNTS[f"worker {target}"] += n
    assert report["failures"] == [], "\n\n".join(report["failures"])
    assert not (tmp_path / "work" / "PICKLE_RAN").exists()
    assert report["maxrss_mb"] < 4096, report
    assert set(report["cases"]) == {"config", "tokenizer", "adapter", "template", "pickle"}, report
