"""Tiny random-weight models for tests and the demo: real architectures, a few hundred thousand
parameters, built in about a second, identical for the same seed.

The folder written is what a hub checkpoint looks like (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja), so it loads with
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and imports into the store
like any other model. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hyprstream_tui.errors import InvalidInput

ARCHS = ("qwen2", "llama", "gemma", "mistral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
DEMO_NAME = "tiny-demo"


def assets_dir() -> Path:
    """The assets: `hyprstream_tui/_assets` in an installed wheel, `assets/` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_assets", package.parent / "assets"):
        if (candidate / "tokenizer" / "tokenizer.json").is_file():
            return candidate
    raise FileNotFoundError("hyprstream's assets are missing: reinstall the package.")


def tokenizer_dir() -> Path:
    return assets_dir() / "tokenizer"


def _special_ids() -> dict[str, int]:
    vocab = json.loads((tokenizer_dir() / "tokenizer.json").read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in vocab}


def _vocab_size() -> int:
    data = json.loads((tokenizer_dir() / "tokenizer.json").read_text())
    return len(data["model"]["vocab"])


def tiny_config(
    arch: str,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    initializer_range: float = 0.2,
    max_position_embeddings: int = 512,
):
    """A transformers config of `arch` shaped tiny: 4 heads of 16, 2 kv heads, MLP 4x."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise InvalidInput(f"Unknown tiny architecture {arch!r}: use one of {', '.join(ARCHS)}.")
    special = _special_ids()
    kwargs = dict(
        vocab_size=_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        tie_word_embeddings=arch == "gemma",
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(arch, **kwargs)


def build_tiny_model(
    dest: str | Path,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    initializer_range: float = 0.2,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
) -> Path:
    """Write a random-weight model of `arch` to `dest` (created) and return the folder."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidInput(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16.")
    config = tiny_config(
        arch,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        initializer_range=initializer_range,
        max_position_embeddings=max_position_embeddings,
    )
    special = _special_ids()
    # Seed a private RNG stream so building a model never disturbs the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
        pad_token_id=special["<|endoftext|>"],
        bos_token_id=None,
        do_sample=False,
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # safetensors' save_model drops tied duplicates the way save_pretrained does, without its
    # progress bar; from_pretrained ties them again.
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, dest / name)
    return dest


def build_demo_model(dest: str | Path) -> Path:
    """The model the TUI offers on a fresh machine: a qwen2 tiny, a little larger, 2048 window."""
    return build_tiny_model(
        dest,
        arch="qwen2",
        seed=0,
        hidden_size=128,
        num_hidden_layers=4,
        max_position_embeddings=2048,
    )
