"""Tiny real models for the engine tests, built once per session (about a second each)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from hyprstream_tui.engine.tiny import ARCHS, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """{arch: folder} for every tiny architecture."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models):
    return tiny_models["qwen2"]


def build_lora_adapter(base, dest, *, seed: int = 1, r: int = 4):
    """A random LoRA adapter (nonzero B, so it changes the output) saved in PEFT's format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_adapters(tiny_models, tmp_path_factory) -> dict:
    """{arch: adapter folder} for every tiny architecture."""
    root = tmp_path_factory.mktemp("adapters")
    return {arch: build_lora_adapter(path, root / arch) for arch, path in tiny_models.items()}
