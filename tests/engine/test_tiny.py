"""The tiny-model builder: every architecture loads, runs, and tokenizes like the raw tokenizer."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import unicodedata

import pytest

from hyprstream_tui.engine.tiny import ARCHS, build_tiny_model, tokenizer_dir

TEXTS = [
    "Hello, world! The quick brown fox.",
    "Café naïve résumé Ångström e\u0301 ﬁ — “quotes” ‘single’",
    "😀👍🏽👨‍👩‍👧 emoji, 日本語のテキスト, 中文, 한국어, العربية",
    "line one\nline two\r\n\n\ttabbed   spaced  \n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "numbers 3.14159 1,000,000 $19.99 and code: def f(x): return x**2",
]


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_loads_and_runs(tiny_models, arch):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    assert model.config.model_type == arch
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    files = {p.name for p in tiny_models[arch].iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_tokenizer_matches_raw_tokenizer(tiny_models, arch):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tiny_models[arch])
    raw = Tokenizer.from_file(str(tiny_models[arch] / "tokenizer.json"))
    for text in TEXTS:
        ids = auto.encode(text)
        assert ids == raw.encode(text).ids, (arch, text)
        # Byte-level BPE round-trips every string, up to the NFC normalisation both apply.
        assert auto.decode(ids) == unicodedata.normalize("NFC", text)
    assert auto.convert_tokens_to_ids("<|im_end|>") == auto.eos_token_id
    assert auto.bos_token_id is None


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_is_chatml(tiny_models, arch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)


def test_tokenizer_asset_regenerates_identically(tmp_path):
    script = tokenizer_dir().parent / "build_tokenizer.py"
    if not script.is_file():
        pytest.skip("installed without the build script")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir() / name).read_bytes(), name


def test_importing_tiny_does_not_import_torch():
    code = "import sys, hyprstream_tui.engine.tiny; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_model_bytes_depend_on_nothing_installed(tmp_path):
    """The demo model's files hold no library version and no path, and two builds are identical:
    its commit ids are on the TUI snapshots, so a patch release of transformers must not move them
    (it did once: `config.save_pretrained` stamped `transformers_version` into config.json)."""
    from importlib.metadata import version

    from hyprstream_tui.engine.tiny import build_demo_model

    first, second = build_demo_model(tmp_path / "a"), build_demo_model(tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        data = (first / name).read_bytes()
        assert data == (second / name).read_bytes(), f"{name} differs between two builds"
        assert b"_version" not in data and str(tmp_path).encode() not in data, name
        for package in ("transformers", "torch", "tokenizers", "safetensors"):
            assert f'"{version(package)}"'.encode() not in data, f"{name} holds {package}'s version"
