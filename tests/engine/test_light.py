"""Replies without torch (engine/light.py, tuned/step_image.py; issue 21's cold start): after the
engine has loaded a quantized or fp32 model once, a command finds its step image and answers without
importing torch, with the engine's reply: the same text, tokens, finish and provenance, greedy or
seeded. Everywhere it does not apply it steps aside (None), and the engine answers as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.events import GenerationDone, TokenDelta
from hyprstream_tui.engine.light import LightEngine, engine_for
from hyprstream_tui.engine.loader import LoadOptions, prefill_fp32
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.tuned import aoti, step, step_abi, step_image
from tests.helpers import REPO_ROOT, bf16_copy

pytestmark = pytest.mark.skipif(step.library() is None,
                                reason=f"the fused step cannot run on this machine: {step.status()}")
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def checked_library(home):
    """The library built in this test's home and marked as checked (the torch engine does both
    on its first load in a home; in this process it was loaded in an earlier test's home)."""
    path = step.compile_library()
    step_abi.mark_checked(path)
    return path


def options_for(quantize):
    """`--quantize int8`/`int4`, or (None) an fp32 model: the kinds the fused step runs by default."""
    return LoadOptions(quantize=quantize) if quantize else LoadOptions(dtype="float32")


def torch_engine(store, quantize):
    return Engine(store=store, options=options_for(quantize), threads=2, max_models=1)


def reply(engine, params, *, chat=False, model="tiny"):
    events = []
    if chat:
        job = engine.chat(model, [{"role": "user", "content": PROMPT}], params, on_event=events.append)
    else:
        job = engine.generate(model, PROMPT, params, on_event=events.append)
    done = job.result()
    assert isinstance(done, GenerationDone)
    return done, "".join(e.text for e in events if isinstance(e, TokenDelta))


def same_reply(a: GenerationDone, b: GenerationDone, seeded: bool) -> None:
    assert (a.text, a.finish_reason, a.timings.completion_tokens, a.timings.prompt_tokens) == \
           (b.text, b.finish_reason, b.timings.completion_tokens, b.timings.prompt_tokens)
    # without a seed each reply draws its own (greedy: it changes nothing)
    assert a.provenance == (b.provenance if seeded else dataclasses.replace(b.provenance, seed=a.provenance.seed))


@pytest.mark.parametrize("quantize", ["int8", "int4", None])
def test_after_one_load_the_light_engine_gives_the_engines_replies(tiny_store, checked_library, quantize):
    engine = torch_engine(tiny_store, quantize)
    cases = [(SamplingParams(temperature=0, max_tokens=12), False),
             (SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=7), True),
             (SamplingParams(temperature=1.2, top_k=20, repetition_penalty=1.3, max_tokens=12, seed=11), False)]
    theirs = [reply(engine, p, chat=c) for p, c in cases]
    engine.close()
    light = engine_for("tiny", home=tiny_store.paths.home, options=options_for(quantize), threads=2)
    assert isinstance(light, LightEngine)
    for (params, chat), (want, want_stream) in zip(cases, theirs):
        got, stream = reply(light, params, chat=chat)
        same_reply(got, want, params.seed is not None)
        assert stream == got.text == want_stream
        assert got.provenance.quantize == quantize and got.provenance.dtype == "float32"


def test_it_steps_aside_where_it_does_not_apply(tiny_store, checked_library, monkeypatch):
    home = tiny_store.paths.home
    options = LoadOptions(quantize="int8")
    assert engine_for("tiny", home=home, options=options, threads=2) is None  # no image yet
    torch_engine(tiny_store, "int8").load("tiny")  # writes it
    assert engine_for("tiny", home=home, options=options, threads=2) is not None
    for other in (LoadOptions(dtype="float32"), LoadOptions(dtype="bfloat16"), LoadOptions(quantize="int4"),
                  LoadOptions(quantize="int8", dtype="bfloat16"), LoadOptions(quantize="int8", tuned=False)):
        assert engine_for("tiny", home=home, options=other, threads=2) is None, other
    assert engine_for("tiny:some-adapter", home=home, options=options, threads=2) is None
    assert engine_for("no-such-model", home=home, options=options, threads=2) is None
    monkeypatch.setenv("HYPRSTREAM_LIGHT", "0")
    assert engine_for("tiny", home=home, options=options, threads=2) is None
    monkeypatch.delenv("HYPRSTREAM_LIGHT")
    monkeypatch.setenv(step.ENV_SWITCH, "0")  # the fused step switched off: the engine's path
    assert engine_for("tiny", home=home, options=options, threads=2) is None


def test_an_fp32_image_links_the_checkpoint_and_follows_the_switch(tiny_store, checked_library, monkeypatch):
    """An fp32 model's image copies no weight: it names the checkpoint's bytes, checked equal when
    written; a checkpoint of another size is not the one it links. With the switch at `quantized`
    the engine runs fp32 through torch's step, and so no command answers from the image."""
    home, options = tiny_store.paths.home, LoadOptions(dtype="float32")
    torch_engine(tiny_store, None).load("tiny")
    [path] = (tiny_store.paths.cache / "quantized").glob(f"*.step{step_image.FORMAT}.safetensors")
    from hyprstream_tui.engine.tuned import quant_cache

    about = quant_cache.describe(path)
    links = json.loads(about["links"])
    folder = tiny_store.paths.models / "tiny"
    checkpoint = folder / "model.safetensors"
    assert about["scheme"] == "float32 step image"
    assert {f"L0.{field}.w" for field in step_abi.LINEARS} | {"embed"} <= set(links)
    assert path.stat().st_size < checkpoint.stat().st_size / 20
    assert engine_for("tiny", home=home, options=options, threads=2) is not None
    monkeypatch.setenv(step.ENV_SWITCH, "quantized")
    assert engine_for("tiny", home=home, options=options, threads=2) is None
    monkeypatch.delenv(step.ENV_SWITCH)
    lib = step_abi.checked_library()
    assert step_image.ImageModel.open(lib, path, 2, folder) is not None
    with open(checkpoint, "ab") as fh:
        fh.write(b"\0" * 64)
    assert step_image.ImageModel.open(lib, path, 2, folder) is None


def test_an_fp32_model_from_a_bf16_checkpoint_reads_its_bf16_rows_to_the_engines_replies(
        tiny_store, tiny_model_src, checked_library, tmp_path):
    """Loaded in fp32 from a bf16 checkpoint, the model's weights are the bf16 values widened: the
    image links the bf16 tensors (half the bytes, nothing copied) and the step reads them as bf16
    rows, whose products equal its fp32 rows' bit for bit, so the replies are the engine's."""
    folder = bf16_copy(tiny_model_src, tmp_path / "tiny16")
    tiny_store.import_model(folder, name="tiny16")
    engine = torch_engine(tiny_store, None)
    cases = [(SamplingParams(temperature=0, max_tokens=16), False),
             (SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=5), True)]
    theirs = [reply(engine, p, chat=c, model="tiny16") for p, c in cases]
    engine.close()
    [path] = (tiny_store.paths.cache / "quantized").glob(f"*.step{step_image.FORMAT}.safetensors")
    from hyprstream_tui.engine.tuned import quant_cache

    about = quant_cache.describe(path)
    products = json.loads(about["products"])
    assert {kind for kind, _, _ in products.values()} == {step_abi.BF16}
    assert json.loads(about["runs"]) == [step_abi.FP32] and json.loads(about["shape"])["embed_f32"] == 0
    assert path.stat().st_size < (folder / "model.safetensors").stat().st_size / 10
    light = engine_for("tiny16", home=tiny_store.paths.home, options=LoadOptions(dtype="float32"), threads=2)
    assert isinstance(light, LightEngine)
    for (params, chat), (want, want_stream) in zip(cases, theirs):
        got, stream = reply(light, params, chat=chat, model="tiny16")
        same_reply(got, want, params.seed is not None)
        assert stream == got.text == want_stream


def test_a_library_not_checked_on_this_cpu_or_a_damaged_image_is_not_used(tiny_store, checked_library):
    home = tiny_store.paths.home
    options = LoadOptions(quantize="int8")
    torch_engine(tiny_store, "int8").load("tiny")
    marker = checked_library.with_name(checked_library.name + step_abi.CHECKED)
    marker.write_text("another cpu")
    assert engine_for("tiny", home=home, options=options, threads=2) is None
    step_abi.mark_checked(checked_library)
    [image] = (tiny_store.paths.cache / "quantized").glob(f"*.step{step_image.FORMAT}.safetensors")
    image.write_bytes(image.read_bytes()[:1000])  # cut short
    assert engine_for("tiny", home=home, options=options, threads=2) is None
    torch_engine(tiny_store, "int8").load("tiny")  # the engine writes it anew
    assert engine_for("tiny", home=home, options=options, threads=2) is not None


class Ran:
    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.returncode, self.stdout = proc.returncode, proc.stdout
        lines = proc.stderr.splitlines()
        imported = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
        self.torch = "torch" in imported
        self.stderr = "\n".join(line for line in lines if not line.startswith("import time:"))


def infer(home, *args, env=None) -> Ran:
    """`hyprstream infer` in a fresh process (keep-alive off unless `env` says otherwise); its
    imports listed by -X importtime tell whether it imported torch."""
    full = {**os.environ, "HYPRSTREAM_HOME": str(home), "HYPRSTREAM_KEEP_ALIVE": "0", **(env or {})}
    return Ran(subprocess.run([sys.executable, "-X", "importtime", "-m", "hyprstream_tui", "infer", *args],
                              capture_output=True, text=True, env=full, cwd=REPO_ROOT, timeout=120))


BF16_EXACT = pytest.mark.skipif(  # a bf16 model's exact image (tuned/exact_image.py)
    prefill_fp32(LoadOptions()) or aoti.Kernels.load() is None,
    reason="no exact image here: a CPU without native bf16 (the engine upcasts its prompts) or no C shim in torch")


@pytest.mark.parametrize("kind", [("--quantize", "int8"), ("--dtype", "float32"),
                                  pytest.param(("--dtype", "bfloat16"), marks=BF16_EXACT)])
def test_a_cold_infer_answers_without_torch_as_the_engine_does(tiny_store, checked_library, kind):
    home = tiny_store.paths.home
    args = ("tiny", *kind, "--prompt", PROMPT, "--max-tokens", "10", "--seed", "3", "--json")
    full = infer(home, *args, env={"HYPRSTREAM_LIGHT": "0"})  # the engine here: loads, writes the image
    assert full.returncode == 0, full.stderr
    assert full.torch
    light = infer(home, *args)
    assert light.returncode == 0, light.stderr
    assert not light.torch
    a, b = json.loads(light.stdout), json.loads(full.stdout)
    assert a["text"] and a["text"] == b["text"]
    assert a["provenance"] == b["provenance"] and a["finish_reason"] == b["finish_reason"]
    assert a["timings"]["load_s"] > 1e-3  # the image mapped and the tokenizer read, before the request
    streamed = infer(home, "tiny", *kind, "--prompt", PROMPT, "--max-tokens", "10", "--seed", "3")
    assert streamed.returncode == 0 and not streamed.torch
    assert streamed.stdout == a["text"] + "\n"


def test_with_keep_alive_it_answers_and_starts_the_engine_loading_the_model(tiny_store, checked_library, cli):
    """No engine listens: the command answers without torch, then starts the home's engine loading
    its model (not waiting for it); once that engine is ready, the next command is its warm reply."""
    import time

    home = tiny_store.paths.home
    args = ("tiny", "--quantize", "int8", "--prompt", PROMPT, "--max-tokens", "10", "--temperature", "0", "--json")
    assert infer(home, *args, env={"HYPRSTREAM_LIGHT": "0"}).returncode == 0  # the image
    keep = {"HYPRSTREAM_KEEP_ALIVE": "60"}
    try:
        first = infer(home, *args, env=keep)
        assert first.returncode == 0 and not first.torch, first.stderr
        deadline = time.monotonic() + 90
        while True:  # the engine it started: up, warming, then ready and holding the model it was told to load
            status = cli("engine", "status", "--json")
            info = json.loads(status.stdout) if status.returncode == 0 else {}
            models = info.get("models", [])
            if info.get("ready") and any(m.get("name") == "tiny" and m.get("quantize") == "int8" for m in models):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        second = infer(home, *args, env=keep)
        assert second.returncode == 0 and not second.torch, second.stderr
        a, b = json.loads(first.stdout), json.loads(second.stdout)
        assert a["text"] == b["text"]
        assert a["timings"]["load_s"] > 0 and b["timings"]["load_s"] == 0  # the engine had it loaded
    finally:
        cli("engine", "stop")
