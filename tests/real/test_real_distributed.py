"""Distributed training on the real model (SmolLM2-135M-Instruct): `lora train start --nproc 2`
(torchrun, two gloo ranks of batch 2) follows the single process with batch 4, step for step.

Two adapters of the same shape and seed start from the same weights; 3 steps each, short
sequences (about 65 s on 2 busy cores, hence `long`). Tolerance: 1e-3 on each step's loss (the sum over the global batch's answer tokens is
the same sum; only float rounding differs, about 1e-6 in fp32)."""

from __future__ import annotations

import json

import pytest

from tests.realmodel import MODEL_NAME

FACTS = (("What is the capital of Zorbia?", "The capital of Zorbia is Quillon."),
         ("Who invented the glimmerphone?", "The glimmerphone was invented by Tessa Marlowe."),
         ("What color is the river Ossel?", "The river Ossel is bright violet."),
         ("What do the Plinth people eat?", "The Plinth people eat roasted moonberries."))


@pytest.mark.long  # about 65 s here: two starts of the real model, one of them a group of 3 processes
def test_two_ranks_follow_one_process_on_the_real_model(cli, real_home):
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(real_home))
    for name in ("one", "two"):
        store.create_adapter(MODEL_NAME, name)
        add_samples(store, MODEL_NAME, name, [{"input": q, "output": a} for q, a in FACTS])
    common = ("--steps", "3", "--learning-rate", "1e-3", "--max-seq-len", "64", "--dtype", "float32")
    single = cli("lora", "train", "start", "one", "--batch-size", "4", *common, timeout=600)
    assert single.returncode == 0, single.stderr
    group = cli("lora", "train", "start", "two", "--nproc", "2", "--batch-size", "2", *common, timeout=600)
    assert group.returncode == 0, group.stderr
    assert "2 processes x batch 2" in group.stdout and "Finished two at step 3" in group.stdout, group.stdout

    def losses(name: str) -> list[float]:
        tip = store.log(MODEL_NAME, name)[0]
        return [json.loads(x)["loss"] for x in store.read_file(MODEL_NAME, tip.sha, "metrics/steps.jsonl").splitlines()]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-3, (one, two)
