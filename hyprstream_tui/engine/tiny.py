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
from typing import TYPE_CHECKING, Any

from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

ARCHS = ("qwen2", "llama", "gemma", "mistral")
ARCH_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM",
                "mistral": "MistralForCausalLM"}
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


def tiny_config_dict(
    arch: str,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    initializer_range: float = 0.2,
    max_position_embeddings: int = 512,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The `config.json` of a tiny `arch`: 4 heads of 16, 2 kv heads, MLP 4x.

    Written by hand rather than by `config.save_pretrained`: that stamps `transformers_version`
    and every default of the installed release into the file, so a patch release of transformers
    changed the demo model's bytes and with them every commit id it shows. These keys are the
    whole file; `from_pretrained` fills the rest from the class defaults as it does for any
    hub checkpoint."""
    if arch not in ARCHS:
        raise InvalidInput(f"Unknown tiny architecture {arch!r}: use one of {', '.join(ARCHS)}.")
    special = _special_ids()
    config = {
        "architectures": [ARCH_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": _vocab_size(),
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": special["<|im_end|>"],
        "pad_token_id": special["<|endoftext|>"],
        "tie_word_embeddings": arch == "gemma",
        "dtype": dtype,
    }
    if arch == "mistral":
        config["sliding_window"] = None
    return config


def tiny_config(arch: str, **kwargs: Any) -> "PretrainedConfig":
    """The transformers config of `tiny_config_dict(arch, **kwargs)`."""
    return _config_of(tiny_config_dict(arch, **kwargs))


def _config_of(config: dict[str, Any]) -> "PretrainedConfig":
    from transformers import AutoConfig

    return AutoConfig.for_model(config["model_type"],
                                **{k: v for k, v in config.items() if k not in ("model_type", "dtype")})


def generation_config_dict() -> dict[str, Any]:
    """`generation_config.json`: greedy by default, stopping at either end token (by hand, for
    the reason `tiny_config_dict` gives)."""
    special = _special_ids()
    return {"bos_token_id": None, "do_sample": False, "pad_token_id": special["<|endoftext|>"],
            "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]]}


def _seeded_init(model: "torch.nn.Module", arch: str, *, seed: int, std: float) -> None:
    """Every weight from one seeded stream in a fixed order: matrices N(0, std), biases 0, norms
    1 (0 for Gemma, whose norm scales by 1 + weight). transformers' own `_init_weights` differs
    between releases; this depends on torch's CPU generator alone."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):  # tied weights appear once
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator).mul_(std))
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.fill_(0.0 if arch == "gemma" else 1.0)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    """Write a random-weight model of `arch` to `dest` (created) and return the folder. The files
    depend on the arguments and torch's generator only, not on the transformers release."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidInput(f"Unknown dtype {dtype!r}: use float32, bfloat16 or float16.")
    written = tiny_config_dict(arch, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                               initializer_range=initializer_range, max_position_embeddings=max_position_embeddings,
                               dtype=dtype)
    config = _config_of(written)
    # from_config runs transformers' own init on the global RNG first: fork it so building a
    # model never disturbs the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _seeded_init(model, arch, seed=seed, std=initializer_range)
    model.to(getattr(torch, dtype))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # safetensors' save_model drops tied duplicates the way save_pretrained does, without its
    # progress bar; from_pretrained ties them again.
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dest / "config.json", written)
    _write_json(dest / "generation_config.json", generation_config_dict())
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
