"""GGUF export of the real model (SmolLM2-135M-Instruct, stored in float32 from its Q4_1 GGUF).

- f32 and f16 files, read back by transformers' GGUF loader (weights, tokenizer, chat template all
  from the file), answer the chat question with the same greedy text as our engine.
- q8_0 is measured, not held to parity: max logit difference and next-token agreement against
  ours over a fixed passage (bounds well outside what it measured: about 1.6 and 96%).
- Export -> import -> export gives identical tensors (f16; about 25 s, mostly the import).
- Where llama-cpp-python is installed (the benchmark venv), llama.cpp itself loads the model file,
  the model file with the LoRA GGUF (`lora_path`) and the merged file, and its greedy text is ours.
  Without it that test is skipped and says why; nothing else stands in for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gguf_export_helpers import llama_cpp_greedy, llama_cpp_missing, put_adapter
from tests.realmodel import MODEL_NAME

FRANCE = "What is the capital of France?"
RAW = "The capital of France is"
PASSAGE = (Path(__file__).parent / "passage.txt").read_text()[:600]
TOKENS = 24


def store_at(home: Path):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(home))


def engine_of(store):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions

    return Engine(store=store, options=LoadOptions(dtype="float32"))


def greedy():
    from hyprstream_tui.engine.params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=TOKENS)


def gguf_chat_answer(path: Path) -> str:
    """transformers' greedy answer to FRANCE with the model, tokenizer and chat template of `path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": FRANCE}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# f32 in the long run only (~35 s): the tiny models' f32 files read back with bit-identical logits
# in the default run, and the f16 file here goes through the same writer and tokenizer metadata.
@pytest.mark.parametrize("outtype", [pytest.param("f32", marks=pytest.mark.long), "f16"])
def test_f32_and_f16_files_answer_with_our_greedy_text(smollm2_home, tmp_path, outtype):
    from hyprstream_tui.engine.gguf_export import export_model_gguf

    store = store_at(smollm2_home)
    engine = engine_of(store)
    try:
        ours = engine.chat(MODEL_NAME, [{"role": "user", "content": FRANCE}], greedy()).result().text
    finally:
        engine.close()
    assert "Paris" in ours
    out = export_model_gguf(store, MODEL_NAME, tmp_path / f"smollm2-{outtype}.gguf", outtype=outtype)
    assert gguf_chat_answer(out.path) == ours, outtype


@pytest.mark.long  # a figure, ~35 s; the tiny models check q8_0's bounds in the default run
def test_q8_0_quality_figure(smollm2_home, tmp_path, record_property):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hyprstream_tui.engine.gguf_export import export_model_gguf

    store = store_at(smollm2_home)
    out = export_model_gguf(store, MODEL_NAME, tmp_path / "smollm2-q8_0.gguf", outtype="q8_0")
    ours = AutoModelForCausalLM.from_pretrained(str(store.model_dir(MODEL_NAME)), dtype=torch.float32).eval()
    q8 = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.path.name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(store.model_dir(MODEL_NAME)))(PASSAGE, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, q8(ids).logits
    max_diff = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    record_property("q8_0_max_logit_diff", round(max_diff, 3))
    record_property("q8_0_next_token_agreement", round(agree, 4))
    print(f"q8_0 vs float32 over {ids.shape[1]} tokens: max logit diff {max_diff:.3f}, "
          f"next-token agreement {agree:.1%}, file {out.size / 2**20:.0f} MiB")
    assert max_diff < 4.0 and agree > 0.9


@pytest.mark.long  # ~30 s; the tiny models check the round trip byte for byte in the default run
def test_export_import_export_gives_identical_tensors(real_home, tmp_path):
    from gguf import GGUFReader

    from hyprstream_tui.engine.gguf import import_gguf
    from hyprstream_tui.engine.gguf_export import export_model_gguf

    store = store_at(real_home)
    first = export_model_gguf(store, MODEL_NAME, tmp_path / "first.gguf", outtype="f16")
    import_gguf(store, first.path, name="smollm2-back")
    second = export_model_gguf(store, "smollm2-back", tmp_path / "second.gguf", outtype="f16")
    a, b = GGUFReader(str(first.path)), GGUFReader(str(second.path))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors] and len(a.tensors) == 272
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape), x.name
        assert x.data.tobytes() == y.data.tobytes(), x.name


@pytest.mark.skipif(llama_cpp_missing() is not None, reason=str(llama_cpp_missing()))
def test_llama_cpp_reads_the_exports_and_answers_like_us(real_home, tmp_path):
    """Opt-in by installation: llama.cpp loads the f32 model file, that file with the LoRA GGUF,
    and the merged f32 file; on a raw prompt its greedy text equals our engine's."""
    from hyprstream_tui.engine.gguf_export import export_model_gguf
    from hyprstream_tui.engine.gguf_export_lora import export_lora_gguf

    store = store_at(real_home)
    put_adapter(store, MODEL_NAME, "adp", r=8, lora_alpha=16, scale=0.3,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = export_model_gguf(store, MODEL_NAME, tmp_path / "smollm2.gguf", outtype="f32")
    lora = export_lora_gguf(store, MODEL_NAME, "adp", tmp_path / "adp-lora.gguf")
    merged = export_model_gguf(store, f"{MODEL_NAME}:adp", tmp_path / "merged.gguf", outtype="f32")
    engine = engine_of(store)
    try:
        base_text = engine.generate(MODEL_NAME, RAW, greedy()).result().text
        adapted_text = engine.generate(f"{MODEL_NAME}:adp", RAW, greedy()).result().text
    finally:
        engine.close()
    assert base_text != adapted_text  # the adapter changes the answer, so agreeing on it means something
    assert llama_cpp_greedy(model.path, RAW, TOKENS)["text"] == base_text
    assert llama_cpp_greedy(model.path, RAW, TOKENS, lora=lora.path)["text"] == adapted_text
    assert llama_cpp_greedy(merged.path, RAW, TOKENS)["text"] == adapted_text
