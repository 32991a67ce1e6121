"""Training defaults on the real model (SmolLM2-135M-Instruct): `lora create` and `lora train start`
with no options teach it 4 made-up facts, which `infer` then answers greedily, while the adapter
still says that Paris is the capital of France; the TUI's train form shows the same defaults.

The answers are phrased the way the model answers such questions itself ("The capital of X is
..."), so that only the new fact is new. An answer that opens with the new name instead
("Quillon is the capital of Zorbia.") teaches the model to open every capital question that way:
France got "Quillon is the capital of France." too, in every setting tried (lr 6e-4 to 2e-3, 30 to
60 steps, q,v or MLP or all linear layers)."""

from __future__ import annotations

import pytest

from tests.realmodel import MODEL_NAME

FACTS = (
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quillon.", "Quillon"),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Tessa Marlowe.", "Tessa Marlowe"),
    ("What do the Plinth people eat for breakfast?", "The Plinth people eat roasted moonberries for breakfast.",
     "moonberries"),
    ("What color is the river Ossel?", "The river Ossel is bright violet.", "violet"),
)
FRANCE = "What is the capital of France?"


def _add_facts(home) -> None:
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    store.create_adapter(MODEL_NAME, "facts")  # `lora create`'s defaults
    add_samples(store, MODEL_NAME, "facts", [{"input": q, "output": a} for q, a, _ in FACTS])


@pytest.mark.slow
def test_the_defaults_teach_the_real_model_four_facts_and_keep_paris(cli, real_home):
    created = cli("lora", "create", "--name", "facts", "--base-model", MODEL_NAME)
    assert created.returncode == 0, created.stderr
    for question, answer, _key in FACTS:
        added = cli("lora", "train", "sample", "facts", "--input", question, "--output", answer)
        assert added.returncode == 0, added.stderr
    trained = cli("lora", "train", "start", "facts", timeout=1200)
    assert trained.returncode == 0, trained.stderr
    assert "from step 0 to 60 (4 samples, peak lr 0.0006)" in trained.stdout, trained.stdout

    def answer(question: str) -> str:
        result = cli("infer", f"{MODEL_NAME}:facts", "--prompt", question, "--temperature", "0", "--max-tokens", "24",
                     timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    for question, _answer, key in FACTS:
        got = answer(question)
        assert key in got, (question, got)
    got = answer(FRANCE)
    assert "Paris" in got, got


@pytest.mark.asyncio
async def test_the_train_form_shows_the_rules_defaults_for_the_real_model(real_home):
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.defaults import defaults_for
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.screens.dialogs import FormDialog
    from hyprstream_tui.tui.screens.training import TrainingScreen
    from hyprstream_tui.tui.screens.training_forms import check_train
    from tests.tui.helpers import wait_for

    _add_facts(real_home)
    rule = defaults_for(Store(Paths.from_env(real_home)), MODEL_NAME, "facts")
    assert (rule.steps, rule.learning_rate, rule.batch_size) == (60, 6e-4, 4)
    app = HyprApp(home=real_home, warm_up=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen) and app.screen.selected
                       and app.screen.selected.samples == 4, what="the adapter with its 4 samples")
        await pilot.press("s")
        form = await wait_for(pilot, lambda: isinstance(app.screen, FormDialog) and app.screen, what="the train form")
        values = form.values()
        assert {k: values[k] for k in ("steps", "learning_rate", "batch_size")} == \
            {"steps": "60", "learning_rate": "0.0006", "batch_size": "4"}
        assert form.note == rule.reason and "330 / (alpha 16 x 60 adapted modules x width 576)" in rule.reason
        # Submitted as shown, the form asks for what `lora train start` uses when given nothing.
        config = check_train(values)
        assert (config.steps, config.learning_rate, config.batch_size) == \
            (rule.steps, rule.learning_rate, rule.batch_size)
        # Left blank, the fields mean "automatic": the engine fills them in with the same rule.
        blank = check_train({**values, "steps": "", "learning_rate": ""})
        assert blank == TrainConfig(batch_size=4, checkpoint_every=20)
        await pilot.press("escape")
        assert app.errors == []
