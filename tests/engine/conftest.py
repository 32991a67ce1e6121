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
