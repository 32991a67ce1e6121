"""Quantized weights cached per model commit and scheme (engine/tuned/quant_cache.py, issue 21):
made on the first `--quantize int8` load of a store model, mapped on later ones, and the same
model either way."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.sources import resolve_source
from hyprstream_tui.engine.tuned import quant_cache

INT8 = LoadOptions(quantize="int8")
PROMPT = "The quick brown fox jumps over the lazy dog."


def entries(store):
    """The cache's weight entries (`<key>.safetensors`; not the step images beside them,
    `<key>.stepN.safetensors`, which engine/light.py reads: tests/engine/test_light.py)."""
    where = quant_cache.folder(store.paths.cache)
    return sorted(p for p in where.glob("*.safetensors") if "." not in p.stem) if where.is_dir() else []


def logits(lm):
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    with torch.inference_mode():
        return lm.model(ids).logits[0]


def test_the_first_int8_load_makes_the_entry_and_the_next_maps_it_with_equal_logits(tiny_store):
    made = load_model(resolve_source("tiny", tiny_store), INT8)
    assert made.quant_cache == "made" and len(entries(tiny_store)) == 1
    hit = load_model(resolve_source("tiny", tiny_store), INT8)
    assert hit.quant_cache == "hit" and len(entries(tiny_store)) == 1
    assert torch.equal(logits(made), logits(hit))
    # the entry names what it holds, for `hyprstream cache list`
    about = quant_cache.describe(entries(tiny_store)[0])
    assert about["model"] == "tiny" and about["commit"] == tiny_store.head("tiny") and about["scheme"] == "int8"


def test_a_cached_load_quantizes_nothing(tiny_store, monkeypatch):
    load_model(resolve_source("tiny", tiny_store), INT8)
    from hyprstream_tui.engine.tuned import quantize

    def refuse(weight):
        raise AssertionError("quantized again despite the cache")

    monkeypatch.setattr(quantize, "quantize_rows", refuse)
    assert load_model(resolve_source("tiny", tiny_store), INT8).quant_cache == "hit"


def test_an_edited_weight_file_or_a_new_commit_gets_a_new_entry(tiny_store):
    load_model(resolve_source("tiny", tiny_store), INT8)
    weights = tiny_store.model_dir("tiny") / "model.safetensors"
    later = time.time() + 5
    os.utime(weights, (later, later))  # the worktree changed after its commit: never a stale entry
    assert load_model(resolve_source("tiny", tiny_store), INT8).quant_cache == "made"
    assert len(entries(tiny_store)) == 2
    source = resolve_source("tiny", tiny_store)
    other = ModelSource(name=source.name, path=source.path, commit="0" * 40, cache=source.cache)
    assert load_model(other, INT8).quant_cache == "made" and len(entries(tiny_store)) == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shapes"])
def test_a_damaged_entry_is_made_again_with_the_same_result(tiny_store, damage):
    good = logits(load_model(resolve_source("tiny", tiny_store), INT8))
    [entry] = entries(tiny_store)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\xff" * 64)
    else:  # a readable file whose tensors do not fit this model
        quant_cache.save(entry, {"model.layers.0.mlp.down_proj#q": torch.zeros(3, 3, dtype=torch.int8),
                                 "model.layers.0.mlp.down_proj#s": torch.ones(3)}, {})
    again = load_model(resolve_source("tiny", tiny_store), INT8)
    assert again.quant_cache == "made"
    assert torch.equal(logits(again), good)
    assert load_model(resolve_source("tiny", tiny_store), INT8).quant_cache == "hit"


def test_an_entry_whose_tensors_are_off_a_64_byte_boundary_is_made_again_aligned(tiny_store):
    """An entry of an earlier version (tensors packed without padding) would need a copy of every
    weight at every load: it is made again, aligned, once."""
    from safetensors.torch import save_file

    source = resolve_source("tiny", tiny_store)
    made = load_model(source, INT8)
    [entry] = entries(tiny_store)
    tensors = {k: v.contiguous() for k, v in quant_cache.read(tiny_store.paths.cache, entry.stem).items()}
    tensors["#odd"] = torch.zeros(3, dtype=torch.uint8)  # shifts the tensors after it off a boundary
    save_file(tensors, str(entry), metadata=quant_cache.describe(entry))
    assert quant_cache.read(tiny_store.paths.cache, entry.stem) is None
    again = load_model(source, INT8)
    assert again.quant_cache == "made" and torch.equal(logits(again), logits(made))
    mapped = quant_cache.read(tiny_store.paths.cache, entry.stem)
    assert mapped is not None and all(v.data_ptr() % quant_cache.ALIGN == 0 for v in mapped.values() if v.numel())
    assert load_model(source, INT8).quant_cache == "hit"


def test_folder_models_and_unquantized_loads_write_no_cache(tiny_store, tiny_model_src):
    assert load_model(ModelSource(name="tiny", path=tiny_model_src), INT8).quant_cache is None
    assert load_model(resolve_source("tiny", tiny_store)).quant_cache is None
    assert entries(tiny_store) == []


def test_the_writer_files_read_back_with_safetensors_itself_every_tensor_64_byte_aligned(tmp_path):
    """torch's int8 kernel crashed on a weight mapped at 8 mod 64: the writer pads every tensor
    to a 64-byte boundary with `#pad` byte tensors, since the format allows no holes."""
    from safetensors.torch import load_file

    tensors = {"a#q": torch.randint(-128, 127, (5, 7), dtype=torch.int8), "a#s": torch.rand(5),
               "b#q": torch.randint(-128, 127, (3, 3), dtype=torch.int8),
               "embed#bf16": torch.rand(3, 4).to(torch.bfloat16), "empty": torch.zeros(0)}
    path = _mkdir(quant_cache.folder(tmp_path)) / "x.safetensors"
    quant_cache.save(path, tensors, {"model": "m"})
    back = load_file(str(path))  # safetensors' own checks: no holes, no overlaps
    assert {k for k in back if not k.startswith("#pad")} == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert quant_cache.describe(path) == {"model": "m"}
    mapped = quant_cache.read(tmp_path, "x")
    assert mapped is not None and mapped.keys() == tensors.keys()
    assert all(t.data_ptr() % 64 == 0 for t in mapped.values() if t.numel())


def test_the_size_cap_evicts_the_least_recently_used_entry(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    for i, name in enumerate(["old", "mid", "new"]):
        quant_cache.save(_mkdir(quant_cache.folder(cache)) / f"{name}.safetensors",
                         {"w": torch.zeros(1000, dtype=torch.int8)}, {})
        os.utime(quant_cache.folder(cache) / f"{name}.safetensors", (1000 + i, 1000 + i))
    assert quant_cache.read(cache, "old") is not None  # a read is a use: "old" is now the newest
    monkeypatch.setenv(quant_cache.ENV_MAX, "2500")
    quant_cache.write(cache, "newest", {"w": torch.zeros(1000, dtype=torch.int8)})
    left = sorted(p.stem for p in quant_cache.folder(cache).glob("*.safetensors"))
    assert left == ["newest", "old"]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_cache_prune_and_list_from_the_cli(tiny_store, cli):
    load_model(resolve_source("tiny", tiny_store), INT8)
    stale = quant_cache.folder(tiny_store.paths.cache) / ".gone-1234.tmp"  # an interrupted write
    stale.write_bytes(b"x")
    os.utime(stale, (1000, 1000))
    listed = cli("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["entries"]  # the weights, and the step image beside them
    assert sorted(row["scheme"] for row in rows) == ["int8", "int8 step image"]
    assert all(row["model"] == "tiny" and row["bytes"] > 0 for row in rows)
    kept = cli("cache", "prune", "--keep", "1GB")
    assert kept.returncode == 0 and "2 kept" in kept.stdout and not stale.exists()
    bad = cli("cache", "prune", "--keep", "lots")
    assert bad.returncode != 0 and bad.stderr.strip() == "error: --keep takes a size such as 500MB or 2GB, got 'lots'."
    gone = cli("cache", "prune")
    assert gone.returncode == 0 and "Removed 2 cached file(s)" in gone.stdout and entries(tiny_store) == []
    assert not list(quant_cache.folder(tiny_store.paths.cache).glob("*.safetensors"))
