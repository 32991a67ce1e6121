"""Fixtures for the training tests: a tiny qwen2 (initializer_range 0.2, so LoRA r=8 on q,v
memorises 4 pairs in about 50 steps at lr 3e-2, the defaults' rate for it), an adapter with the 4
Q&A samples, and greedy answers with transformers' own `generate` as the reference reader.

Torch runs on one thread here (and in the subprocesses): the tiny model's ops are too small to gain
from two, and two threads on a busy 2-core machine slow every step by an order of magnitude.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.train.helpers import FAST, make_store, qa_rows  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def qa_store(tiny_store):
    """The per-test store (HYPRSTREAM_HOME) with adapter `qa` and the 4 samples."""
    from hyprstream_tui.engine.train.samples import add_samples

    tiny_store.create_adapter("tiny", "qa", rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    add_samples(tiny_store, "tiny", "qa", qa_rows())
    return tiny_store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_src):
    """A store whose adapter `qa` was trained with the defaults, 60 steps (shared by a module's
    tests: read only)."""
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.job import TrainJob

    store = make_store(tmp_path_factory.mktemp("trained") / "home", tiny_model_src)
    TrainJob(store, "tiny", "qa", TrainConfig(**FAST)).run()
    return store
