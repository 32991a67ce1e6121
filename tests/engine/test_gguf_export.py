"""GGUF export (engine/gguf_export.py, gguf_export_lora.py) on the tiny llama and qwen2 models.

Every file is read back by what reads it elsewhere: transformers' GGUF loader (the importer's own
path) for model files, gguf-py's GGUFReader for tensors and metadata. A LoRA GGUF is checked
against llama.cpp's arithmetic without llama.cpp: base + (alpha/r)·lora_b·lora_a, both read from
the files, must be the merged model's GGUF tensor (so the q/k permutation of lora_b is the one the
base weights got). llama.cpp itself runs in tests/real/test_real_gguf_export.py where installed.
vLLM cannot run here (no GPU, not installed): its refusals are checked as the warnings we print.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.gguf_export_helpers import put_adapter
from tests.helpers import assert_one_line_error

PROMPT_IDS = [[5, 17, 99, 3, 250, 41, 7]]


@pytest.fixture
def tiny_llama_store(store, tiny_models):
    store.import_model(tiny_models["llama"], name="tl")
    store.import_model(tiny_models["qwen2"], name="tq")
    return store


def read_back(path: Path):
    """transformers' GGUF loader on `path` (the importer's reader), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits_and_greedy(model, n: int = 12):
    import torch

    ids = torch.tensor(PROMPT_IDS)
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return logits, out[0, ids.shape[1]:].tolist()


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(t.data.tobytes()))
            for t in GGUFReader(str(path)).tensors}


def gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("model", ["tl", "tq"])
def test_f32_reads_back_exactly_and_each_outtype_holds_what_it_promises(tiny_llama_store, tmp_path, model):
    """f32: the logits transformers computes from the file are ours, bit for bit (llama's q/k
    permutation undone exactly). f16: the same greedy tokens. bf16: every matrix is ours rounded to
    bfloat16. q8_0: every matrix within half a quantization step of ours (a random tiny model's flat
    logits flip greedy ties under bf16/q8_0 rounding; the real model's figures are in tests/real)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hyprstream_tui.engine.gguf_export import export_model_gguf

    ours = AutoModelForCausalLM.from_pretrained(str(tiny_llama_store.model_dir(model)), dtype=torch.float32).eval()
    ref_logits, ref_tokens = logits_and_greedy(ours)
    weights = {k: v for k, v in ours.state_dict().items() if v.dim() == 2}
    sizes = {}
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        out = export_model_gguf(tiny_llama_store, model, tmp_path / f"{model}-{outtype}.gguf", outtype=outtype)
        sizes[outtype] = out.size
        back = read_back(out.path)
        logits, tokens = logits_and_greedy(back)
        if outtype == "f32":
            assert torch.equal(logits, ref_logits)
        if outtype in ("f32", "f16"):
            assert tokens == ref_tokens, outtype
        got = back.state_dict()
        for key, w in weights.items():
            if outtype == "bf16":
                assert torch.equal(got[key], w.bfloat16().float()), key
            elif outtype == "q8_0":  # blocks of 32 along a row, scale max|x|/127 stored as f16 (127 x 2^-11 more)
                step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
                assert ((got[key].reshape(-1, 32) - w.reshape(-1, 32)).abs() <= step * 0.57).all(), key
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
    types = {t for t, _, _ in gguf_tensors(tmp_path / f"{model}-q8_0.gguf").values()}
    assert types == {"Q8_0", "F32"}  # matrices quantized, norms (and qwen2's biases) F32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_metadata_names_the_hparams_and_the_tokenizer(tiny_llama_store, tmp_path):
    from transformers import AutoTokenizer

    from hyprstream_tui.engine.gguf_export import export_model_gguf

    out = export_model_gguf(tiny_llama_store, "tl", tmp_path / "tl.gguf", outtype="f16")
    fields = gguf_fields(out.path)
    config = json.loads((tiny_llama_store.model_dir("tl") / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_store.model_dir("tl")))
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.context_length"] == config["max_position_embeddings"]
    assert fields["llama.embedding_length"] == config["hidden_size"]
    assert fields["llama.feed_forward_length"] == config["intermediate_size"]
    assert fields["llama.attention.head_count"] == config["num_attention_heads"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.vocab_size"] == config["vocab_size"] == len(fields["tokenizer.ggml.tokens"])
    assert fields["llama.rope.freq_base"] == pytest.approx(config.get("rope_theta", 10000.0))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.tokens"][:300] == tok.convert_ids_to_tokens(list(range(300)))
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    # The tokenizer transformers builds from the file encodes as ours does.
    back = AutoTokenizer.from_pretrained(str(out.path.parent), gguf_file=out.path.name)
    text = "Hello world, what is 2+2? Ünïcode…"
    assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_export_import_export_gives_identical_tensors(tiny_llama_store, tmp_path, outtype):
    from hyprstream_tui.engine.gguf import import_gguf
    from hyprstream_tui.engine.gguf_export import export_model_gguf

    first = export_model_gguf(tiny_llama_store, "tl", tmp_path / "first.gguf", outtype=outtype)
    import_gguf(tiny_llama_store, first.path, name="tl-back")
    second = export_model_gguf(tiny_llama_store, "tl-back", tmp_path / "second.gguf", outtype=outtype)
    assert gguf_tensors(first.path) == gguf_tensors(second.path)
    a, b = gguf_fields(first.path), gguf_fields(second.path)
    assert {k: b.get(k) for k in a if k != "general.name"} == {k: v for k, v in a.items() if k != "general.name"}
    # The one addition is the importer's: transformers' GGUF tokenizer gives the tiny tokenizer
    # (no bos_token) a bos of id 1, which the second export then names.
    assert set(b) - set(a) <= {"tokenizer.ggml.bos_token_id"}


def test_a_named_adapter_is_merged_and_llama_cpp_lora_arithmetic_holds(tiny_llama_store, tmp_path):
    """MODEL:ADAPTER exports the merged model; the LoRA GGUF's lora_a/lora_b, scaled by alpha/r as
    llama.cpp does, are exactly the merged file's difference to the base file (q/k permuted alike)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hyprstream_tui.engine.gguf_export import export_model_gguf
    from hyprstream_tui.engine.gguf_export_lora import export_lora_gguf

    peft_dir = put_adapter(tiny_llama_store, "tl", "qkv", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"])
    base = export_model_gguf(tiny_llama_store, "tl", tmp_path / "base.gguf", outtype="f32")
    merged = export_model_gguf(tiny_llama_store, "tl:qkv", tmp_path / "merged.gguf", outtype="f32")
    lora = export_lora_gguf(tiny_llama_store, "tl", "qkv", tmp_path / "qkv-lora.gguf")
    assert merged.commit == tiny_llama_store.resolve_adapter("tl", "qkv").tip
    # The merged file answers like PEFT's adapter on the stored base.
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_store.model_dir("tl"))),
                                    str(peft_dir)).eval()
    ref_logits, ref_tokens = logits_and_greedy(ref)
    logits, tokens = logits_and_greedy(read_back(merged.path))
    assert tokens == ref_tokens and torch.allclose(logits, ref_logits, atol=1e-4)
    # The LoRA GGUF: llama.cpp's keys and tensor names, and its arithmetic.
    fields = gguf_fields(lora.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    from gguf import GGUFReader

    lt = {t.name: np.array(t.data) for t in GGUFReader(str(lora.path)).tensors}
    bt = {t.name: np.array(t.data) for t in GGUFReader(str(base.path)).tensors}
    mt = {t.name: np.array(t.data) for t in GGUFReader(str(merged.path)).tensors}
    adapted = {n[: -len(".lora_a")] for n in lt if n.endswith(".lora_a")}
    assert adapted == {f"blk.{i}.attn_{p}.weight" for i in range(2) for p in "qkv"}
    assert set(lt) == {f"{n}.lora_{s}" for n in adapted for s in "ab"}
    for name in adapted:
        a, b = lt[name + ".lora_a"], lt[name + ".lora_b"]
        assert a.shape[0] == b.shape[1] == 4  # A: rank x in, B: out x rank (numpy order)
        assert np.allclose(bt[name] + (8 / 4) * (b @ a), mt[name], atol=1e-5), name
    for name in set(bt) - adapted:
        assert np.array_equal(bt[name], mt[name]), name


def test_lora_gguf_holds_the_peft_weights_and_rslora_is_folded_into_b(tiny_llama_store, tmp_path):
    """qwen2 (no permutation): lora_a is PEFT's A and lora_b its B, bit for bit; with rsLoRA, B
    carries the sqrt(r) that llama.cpp's alpha/r scaling lacks."""
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    from hyprstream_tui.engine.gguf_export_lora import export_lora_gguf

    plain = put_adapter(tiny_llama_store, "tq", "plain", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    rs = put_adapter(tiny_llama_store, "tq", "rs", r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj"])
    for name, folder, factor in (("plain", plain, 1.0), ("rs", rs, 2.0)):
        out = export_lora_gguf(tiny_llama_store, "tq", name, tmp_path / f"{name}.gguf")
        peft = load_file(str(folder / "adapter_model.safetensors"))
        got = {t.name: (np.array(t.data), tuple(int(d) for d in t.shape), t.tensor_type.name)
               for t in GGUFReader(str(out.path)).tensors}
        assert len(got) == len(peft)
        for key, value in peft.items():
            layer = key.split(".layers.")[1].split(".")[0]
            proj = {"q_proj": "attn_q", "v_proj": "attn_v"}[key.split(".")[-3]]
            half = "a" if ".lora_A." in key else "b"
            data, shape, kind = got[f"blk.{layer}.{proj}.weight.lora_{half}"]
            assert kind == "F32" and shape == value.shape[::-1]  # GGUF lists the fastest dimension first
            assert np.array_equal(data, value * (factor if half == "b" else 1.0)), key


def test_vllm_warnings_at_peft_export(cli, tiny_llama_store, tmp_path):
    """What `vllm serve --enable-lora` refuses, said at `lora export --format peft`: rank above 16,
    DoRA, modules_to_save. (vLLM itself cannot run here: no GPU and not installed; the rules are
    its documented defaults.) A plain rank-8 adapter exports without a warning."""
    put_adapter(tiny_llama_store, "tq", "plain", r=8, target_modules=["q_proj", "v_proj"])
    put_adapter(tiny_llama_store, "tq", "wide", r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"])
    put_adapter(tiny_llama_store, "tq", "dora", r=8, use_dora=True, target_modules=["q_proj", "v_proj"])
    put_adapter(tiny_llama_store, "tq", "saves", r=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    expected = {"plain": None, "wide": "--max-lora-rank 32", "dora": "DoRA", "saves": "modules_to_save"}
    for name, needle in expected.items():
        result = cli("lora", "export", f"tq:{name}", "--format", "peft", "-o", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name / "adapter_config.json").is_file()
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        if needle is None:
            assert warnings == [], result.stderr
        else:
            assert len(warnings) == 1 and needle in warnings[0], result.stderr
    # llama.cpp's LoRA GGUF cannot hold DoRA or saved modules: one line, nothing written.
    assert_one_line_error(cli("lora", "export", "tq:dora", "--format", "gguf", "-o", tmp_path / "d.gguf"),
                          "DoRA", "model export")
    assert_one_line_error(cli("lora", "export", "tq:saves", "--format", "gguf", "-o", tmp_path / "s.gguf"),
                          "lm_head", "model export")
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "s.gguf").exists()


def test_cli_exports_and_refuses_mistakes_in_one_line_writing_nothing(cli, tiny_llama_store, tiny_models, tmp_path):
    put_adapter(tiny_llama_store, "tl", "qa", r=4, target_modules=["q_proj", "v_proj"])
    tiny_llama_store.import_model(tiny_models["gemma"], name="tg")
    out = tmp_path / "out"
    out.mkdir()
    ok = cli("model", "export", "tl:qa", "--format", "gguf", "--outtype", "q8_0", "-o", out / "tl-qa.gguf")
    assert ok.returncode == 0 and "Exported tl:qa" in ok.stdout and "q8_0" in ok.stdout, ok.stderr
    lora = cli("lora", "export", "tl:qa", "--format", "gguf", "-o", out / "qa-lora.gguf")
    assert lora.returncode == 0 and "gguf" in lora.stdout, lora.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(cli("model", "export", "tg", "-o", out / "g.gguf"), "gemma", "llama", "mistral", "qwen2")
    assert_one_line_error(cli("model", "export", "tl", "-o", out / "tl-qa.gguf"), "exists already", "--force")
    assert_one_line_error(cli("lora", "export", "tl:qa", "--format", "gguf", "-o", out / "qa-lora.gguf"),
                          "exists already")
    assert_one_line_error(cli("model", "export", "tl", "--outtype", "q4_0", "-o", out / "x.gguf"),
                          "q4_0", "f32, f16, bf16, q8_0")
    assert_one_line_error(cli("model", "export", "tl:nope", "-o", out / "x.gguf"), "nope")
    assert_one_line_error(cli("model", "export", "tl", "-o", out / "x.bin"), ".gguf")
    assert_one_line_error(cli("model", "export", "ghost", "-o", out / "x.gguf"), "ghost")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    forced = cli("model", "export", "tl", "--outtype", "f32", "-o", out / "tl-qa.gguf", "--force")
    assert forced.returncode == 0, forced.stderr
    assert gguf_fields(out / "tl-qa.gguf")["general.file_type"] == 0


def test_a_failed_write_leaves_nothing_and_a_killed_ones_leftover_is_swept(tmp_path):
    from hyprstream_tui.engine.gguf_export import write_atomically

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"GGUF half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    dead = tmp_path / ".m.gguf.999999999-deadbeef.incomplete"  # a pid that is gone: SIGKILLed mid-export
    alive = tmp_path / f".m.gguf.{os.getpid()}-cafecafe.incomplete"  # a live export's: kept
    dead.write_bytes(b"x")
    alive.write_bytes(b"y")
    assert write_atomically(target, lambda tmp: tmp.write_bytes(b"new")) == 3
    assert target.read_bytes() == b"new" and not dead.exists() and alive.exists()
