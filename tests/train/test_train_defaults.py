"""The training defaults rule (engine/train/defaults.py): a run's length from the samples, the
learning rate from the model's width and depth and the adapter's alpha and targets, never from a
name. A run started without values uses them, a resumed run keeps its own, given values win, and
the defaults teach the demo model."""

from __future__ import annotations

import json

import pytest

from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.engine.train.defaults import (MAX_LR, MIN_STEPS, ModelShape, TrainDefaults, default_learning_rate,
                                                  default_steps, defaults_for, learning_rate_for, train_defaults)
from hyprstream_tui.engine.train.job import TrainJob, TrainStarted, TrainStep
from hyprstream_tui.errors import InvalidInput
from tests.train.helpers import adapter_answers, qa_rows

SMOLLM2 = ModelShape(hidden_size=576, num_layers=30)  # SmolLM2-135M-Instruct
DEMO = ModelShape(hidden_size=128, num_layers=4)  # engine/tiny.py build_demo_model
QV = ["q_proj", "v_proj"]


def _adapter(alpha: float = 16.0, rank: int = 8, targets=QV) -> dict:
    return {"lora_alpha": alpha, "r": rank, "target_modules": targets}


# ---- the rule itself -------------------------------------------------------------------------
def test_short_sample_sets_get_at_least_min_steps_and_long_ones_three_epochs():
    assert MIN_STEPS == 60
    assert default_steps(1) == 60 and default_steps(20) == 60  # 4 samples at batch 4: 60 epochs
    assert default_steps(21) == 63 and default_steps(250) == 750  # 1000 samples at batch 4: 3 epochs
    assert default_steps(0) == 60


def test_config_without_a_length_takes_the_rule_and_given_lengths_win():
    assert TrainConfig().run_steps(steps_per_epoch=1) == 60
    assert TrainConfig().run_steps(steps_per_epoch=30) == 90
    assert TrainConfig(steps=7).run_steps(steps_per_epoch=1) == 7
    assert TrainConfig(epochs=2).run_steps(steps_per_epoch=3) == 6  # --epochs has no floor
    assert TrainConfig().learning_rate is None and TrainConfig(learning_rate=1e-3).learning_rate == 1e-3


def test_learning_rate_of_the_real_model_and_of_the_demo():
    assert default_learning_rate(SMOLLM2, alpha=16, targets_per_layer=2) == 6e-4  # 330 / (16 * 60 * 576)
    assert default_learning_rate(DEMO, alpha=16, targets_per_layer=2) == 2e-2  # 330 / (16 * 8 * 128)
    tests_tiny = ModelShape(hidden_size=64, num_layers=2)  # tests/conftest.py tiny_model_src
    assert default_learning_rate(tests_tiny, alpha=16, targets_per_layer=2) == MAX_LR == 3e-2


def test_learning_rate_falls_with_alpha_targets_width_and_depth_and_ignores_rank():
    base = learning_rate_for(SMOLLM2, _adapter())
    assert learning_rate_for(SMOLLM2, _adapter(alpha=32)) == pytest.approx(base / 2, rel=0.05)
    assert learning_rate_for(SMOLLM2, _adapter(rank=16)) == base  # B starts at 0: the update scales with alpha
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert learning_rate_for(SMOLLM2, _adapter(targets=every)) == pytest.approx(base * 2 / 7, rel=0.05)
    assert learning_rate_for(SMOLLM2, _adapter(targets="all-linear")) == \
        learning_rate_for(SMOLLM2, _adapter(targets=every))
    wider = ModelShape(hidden_size=896, num_layers=24)  # Qwen2.5-0.5B
    big = ModelShape(hidden_size=4096, num_layers=32)  # a 7B Llama
    lrs = [learning_rate_for(shape, _adapter()) for shape in (DEMO, SMOLLM2, wider, big)]
    assert lrs == sorted(lrs, reverse=True) and 5e-5 <= lrs[-1] <= 2e-4


def test_learning_rate_stays_within_its_bounds():
    assert default_learning_rate(ModelShape(hidden_size=8, num_layers=1), alpha=1, targets_per_layer=1) == MAX_LR
    huge = ModelShape(hidden_size=1 << 16, num_layers=1000)
    assert default_learning_rate(huge, alpha=256, targets_per_layer=7) == 1e-5


def test_model_shape_comes_from_config_json_also_nested_and_refuses_none():
    assert ModelShape.from_config({"hidden_size": 576, "num_hidden_layers": 30, "_name_or_path": "tiny-x"}) == SMOLLM2
    assert ModelShape.from_config({"text_config": {"hidden_size": 576, "num_hidden_layers": 30}}) == SMOLLM2
    assert ModelShape.from_config({"n_embd": 576, "n_layer": 30}) == SMOLLM2
    with pytest.raises(InvalidInput, match="`learning_rate` yourself"):
        ModelShape.from_config({"vocab_size": 10})
    with pytest.raises(InvalidInput, match="lora_alpha"):
        learning_rate_for(SMOLLM2, {"target_modules": QV})
    with pytest.raises(InvalidInput, match="target_modules"):
        learning_rate_for(SMOLLM2, {"lora_alpha": 16, "target_modules": []})


def test_train_defaults_say_how_they_were_found():
    d = train_defaults(SMOLLM2, _adapter(), samples=4)
    assert d == TrainDefaults(learning_rate=6e-4, steps=60, batch_size=4, reason=d.reason)
    assert "330 / (alpha 16 x 60 adapted modules x width 576)" in d.reason and "4 samples" in d.reason


def test_a_models_name_is_not_an_input(tiny_store, tiny_model_src):
    """The same weights under a `tiny` name and under a real model's name get the same defaults."""
    tiny_store.import_model(tiny_model_src, name="smollm2")
    for model in ("tiny", "smollm2"):
        tiny_store.create_adapter(model, "qa", rank=8, alpha=16.0)
    got = {m: defaults_for(tiny_store, m, "qa") for m in ("tiny", "smollm2")}
    assert got["tiny"] == got["smollm2"]
    config = json.loads((tiny_store.model_dir("tiny") / "config.json").read_text())
    shape = ModelShape.from_config(config)
    assert got["tiny"].learning_rate == default_learning_rate(shape, alpha=16, targets_per_layer=2)


# ---- runs ----------------------------------------------------------------------------------------
def _lrs(events) -> list[float]:
    return [e.lr for e in events if isinstance(e, TrainStep)]


def test_a_run_without_values_uses_the_rule_and_given_values_win(qa_store):
    want = defaults_for(qa_store, "tiny", "qa")
    events = []
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=10), on_event=events.append).run()
    assert events[0].learning_rate == want.learning_rate and max(_lrs(events)) == pytest.approx(want.learning_rate)
    events = []
    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=4, learning_rate=1e-3), on_event=events.append).run()
    assert events[0].learning_rate == 1e-3 and max(_lrs(events)) == pytest.approx(1e-3)


def test_a_resumed_run_keeps_its_own_learning_rate_and_length(qa_store):
    import threading

    cancel = threading.Event()

    def stop_at_3(event):
        if isinstance(event, TrainStep) and event.step == 3:
            cancel.set()

    TrainJob(qa_store, "tiny", "qa", TrainConfig(steps=8, learning_rate=1e-3), explicit={"steps", "learning_rate"},
             on_event=stop_at_3, cancel=cancel).run()
    events = []
    result = TrainJob(qa_store, "tiny", "qa", TrainConfig(), on_event=events.append).run()  # nothing given
    start = events[0]
    assert isinstance(start, TrainStarted) and start.resumed and start.target == 8 and start.learning_rate == 1e-3
    assert result.step == 8 and max(_lrs(events)) <= 1e-3


def test_the_defaults_teach_the_demo_model(store, tmp_path):
    """The demo model (random weights, 128 wide, 4 layers) and an adapter made with `lora create`'s
    defaults learn 4 question/answer pairs from `TrainConfig()`: 60 steps at 2e-2."""
    from hyprstream_tui.engine.tiny import build_demo_model
    from hyprstream_tui.engine.train.samples import add_samples

    store.import_model(build_demo_model(tmp_path / "demo"), name="tiny-demo")
    store.create_adapter("tiny-demo", "qa")
    add_samples(store, "tiny-demo", "qa", qa_rows())
    events = []
    TrainJob(store, "tiny-demo", "qa", TrainConfig(), on_event=events.append).run()
    assert events[0].target == 60 and events[0].learning_rate == 2e-2
    answers = adapter_answers(store.model_dir("tiny-demo"), store.worktree("tiny-demo", "qa") / "adapter")
    assert answers == [row["output"] for row in qa_rows()]
