"""bf16 replies without torch (tuned/exact_image.py, tuned/aoti.py; issue 21's bf16 cold start): the
engine's bf16 load of a store model writes an image whose forward, torch's kernels through
libtorch_cpu's C interface and numpy's rounding, equals torch's forward bit for bit; the light engine
answers from it with the bf16 engine's replies, and a cold `infer` does so without importing torch.
Where it cannot be exact (another torch build, a prompt upcast to fp32, the inexact fused bf16 step)
it steps aside."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.light import LightEngine, engine_for
from hyprstream_tui.engine.loader import LoadOptions, load_model, prefill_fp32
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sources import resolve_source
from hyprstream_tui.engine.tuned import aoti, exact, exact_image, exact_run, quant_cache, step, step_abi
from tests.engine.test_light import PROMPT, reply, same_reply
from tests.helpers import bf16_copy

pytestmark = [
    pytest.mark.skipif(step.library() is None, reason=f"the fused step cannot run on this machine: {step.status()}"),
    pytest.mark.skipif(aoti.Kernels.load() is None, reason="this torch has no libtorch_cpu C shim"),
    pytest.mark.skipif(prefill_fp32(LoadOptions()), reason="a CPU without native bf16: the engine runs bf16 "
                       "prompts in fp32 there, so no image can equal its replies"),
]
BF16 = LoadOptions(dtype="bfloat16")


@pytest.fixture
def checked_library(home):
    """The library built in this test's home, marked as checked, and its exact step too where it
    passed here (the torch engine does both on its first load in a home; in this process that was
    an earlier test's home)."""
    path = step.compile_library()
    step_abi.mark_checked(path)
    if step.exact_refusal() == "":
        step_abi.exact_marker().write_text(exact.mark_text())
    return path


def images(store) -> list:
    exact_image.settle()
    return sorted((store.paths.cache / "quantized").glob("*.safetensors"),
                  key=lambda p: quant_cache.describe(p).get("scheme") != exact_image.SCHEME)


def the_image(store):
    exact_image.settle()  # written in the background after the load
    found = [p for p in images(store) if quant_cache.describe(p).get("scheme") == exact_image.SCHEME]
    assert len(found) == 1, found
    return found[0]


def loaded_and_imaged(store, name):
    """`name` loaded in bf16 and its image written, as the engine writes it after the first reply."""
    lm = load_model(resolve_source(name, store), BF16)
    assert lm.after_first_reply is not None
    lm.after_first_reply()
    exact_image.settle()
    return lm


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_a_bf16_load_writes_an_image_whose_forward_is_torchs_bit_for_bit(store, tiny_models, checked_library, arch):
    store.import_model(tiny_models[arch], name=arch)
    lm = loaded_and_imaged(store, arch)
    model = lm.model
    image = exact_image.ExactImage.open(the_image(store), store.paths.models / arch, step.library(), 2)
    assert image is not None and image.facts.dtype == "bfloat16" and image.facts.window == lm.window
    ids = [int(i) for i in torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))]
    run, cache = image.sequence(64), model.new_cache()
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids[:21]]), cache=cache, logits_to_keep=1).logits[0, -1].float().numpy()
        assert np.array_equal(run.prefill(ids[:21]), want)
        for pos in range(21, 40):  # steps, as the context and the rotary positions grow
            want = model(input_ids=torch.tensor([[ids[pos]]]), position_ids=torch.tensor([[pos]]),
                         cache=cache).logits[0, -1].float().numpy()
            assert np.array_equal(run.step(ids[pos], pos), want), pos
    for i in range(layers):
        assert np.array_equal(run.kv[2 * i][:, :40], bits(cache.keys[i][0, :, :40]))
        assert np.array_equal(run.kv[2 * i + 1][:, :40], bits(cache.values[i][0, :, :40]))


@pytest.mark.parametrize("steps", ["fused", "numpy"])
def test_the_light_engine_gives_the_bf16_engines_replies(tiny_store, checked_library, steps):
    """Decode steps through the fused step's exact mode where the weight cache holds the packed
    rows and its check passed here, else through numpy and torch's kernels: the same replies."""
    engine = Engine(store=tiny_store, options=BF16, threads=2, max_models=1)
    cases = [(SamplingParams(temperature=0, max_tokens=16), False),
             (SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=7), True),
             (SamplingParams(temperature=1.2, top_k=20, repetition_penalty=1.3, max_tokens=16, seed=11), False)]
    theirs = [reply(engine, p, chat=c) for p, c in cases]
    engine.close()
    lm = load_model(resolve_source("tiny", tiny_store), BF16)
    step.described(lm.model)  # packed now (the engine packs in the background), into the cache
    packed = [p for p in images(tiny_store) if quant_cache.describe(p).get("scheme") == exact.SCHEME]
    assert len(packed) == 1
    if steps == "numpy":
        packed[0].unlink()
    light = engine_for("tiny", home=tiny_store.paths.home, options=BF16, threads=2)
    assert isinstance(light, LightEngine)
    assert (light._image.fused is not None) == (steps == "fused" and step.exact_refusal() == "")
    for (params, chat), (want, want_stream) in zip(cases, theirs):
        got, stream = reply(light, params, chat=chat)
        same_reply(got, want, params.seed is not None)
        assert stream == got.text == want_stream
        assert got.provenance.dtype == "bfloat16" and got.provenance.quantize is None


def test_a_bf16_checkpoint_is_linked_not_copied(store, tiny_model_src, checked_library, tmp_path):
    folder = bf16_copy(tiny_model_src, tmp_path / "tiny16")
    store.import_model(folder, name="tiny16")
    loaded_and_imaged(store, "tiny16")
    path = the_image(store)
    about = quant_cache.describe(path)
    assert "model.layers.0.self_attn.q_proj.weight" in json.loads(about["links"])
    checkpoint = store.paths.models / "tiny16" / "model.safetensors"
    tables = exact_image.ExactImage.open(path, checkpoint.parent, step.library(), 2)
    assert tables is not None
    assert path.stat().st_size < checkpoint.stat().st_size  # the tables, no weight
    with open(checkpoint, "ab") as fh:  # another checkpoint: not the bytes it links
        fh.write(b"\0" * 64)
    assert exact_image.ExactImage.open(path, checkpoint.parent, step.library(), 2) is None


def test_it_steps_aside_where_it_cannot_be_exact(tiny_store, checked_library, monkeypatch):
    home = tiny_store.paths.home
    assert engine_for("tiny", home=home, options=BF16, threads=2) is None  # no image yet
    loaded_and_imaged(tiny_store, "tiny")
    assert engine_for("tiny", home=home, options=BF16, threads=2) is not None
    for other in (LoadOptions(dtype="bfloat16", prefill_fp32=True), LoadOptions(dtype="bfloat16", tuned=False),
                  LoadOptions(dtype="bfloat16", quantize="int8")):
        assert engine_for("tiny", home=home, options=other, threads=2) is None, other
    monkeypatch.setenv(step.ENV_SWITCH, "all")  # the engine's inexact fused bf16 step
    assert engine_for("tiny", home=home, options=BF16, threads=2) is None
    monkeypatch.delenv(step.ENV_SWITCH)
    path = the_image(tiny_store)
    meta = quant_cache.describe(path)
    assert meta["torch"] == aoti.build_id(aoti.library_path())
    monkeypatch.setattr(exact_image, "build_id", lambda path: "another torch build")
    assert engine_for("tiny", home=home, options=BF16, threads=2) is None


def test_an_image_whose_forward_is_not_torchs_is_not_written(tiny_store, checked_library, monkeypatch):
    """The self-check before writing: with bf16 rounding that truncates (a mutation of one
    operation), the forward parts from torch's and nothing is written."""
    def truncate(a):
        return (a.view(np.uint32) >> 16).astype(np.uint16)

    monkeypatch.setattr(exact_run, "narrow", truncate)
    loaded_and_imaged(tiny_store, "tiny")
    assert not [p for p in images(tiny_store) if quant_cache.describe(p).get("scheme") == exact_image.SCHEME]
    assert engine_for("tiny", home=tiny_store.paths.home, options=BF16, threads=2) is None


def test_the_image_is_written_after_the_first_reply_in_the_background(tiny_store, checked_library, monkeypatch):
    """The image (a self-check and a copy: some 0.7 s on SmolLM2) is written once the model has
    answered, in a thread of its own: neither the load (a model switch in the app) nor the reply
    waits for it, and a request refused after the load (an adapter that cannot attach) writes none."""
    import threading

    release, seen = threading.Event(), []
    real_save = exact_image.save

    def held_save(*args, **kwargs):
        seen.append(threading.current_thread().name)
        assert release.wait(60)
        return real_save(*args, **kwargs)

    def ours():
        return [p for p in (tiny_store.paths.cache / "quantized").glob("*.safetensors")
                if quant_cache.describe(p).get("scheme") == exact_image.SCHEME]

    monkeypatch.setattr(exact_image, "save", held_save)
    engine = Engine(store=tiny_store, options=BF16, threads=2, max_models=1)
    empty = tiny_store.paths.home / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(Exception, match="holds no weights"):
        engine.generate(f"tiny:{empty}", PROMPT, SamplingParams(max_tokens=2)).result()
    exact_image.settle()
    assert seen == [] and not ours()
    done = engine.generate("tiny", PROMPT, SamplingParams(temperature=0, max_tokens=4)).result()
    assert done.text  # answered while the image waits
    assert not ours()
    release.set()
    exact_image.settle()
    engine.close()
    assert seen == ["hyprstream-exact-image"]
    assert the_image(tiny_store).is_file()
