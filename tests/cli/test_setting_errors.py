"""An error about a setting names the setting (`batch_size`), never a front end's way to give it;
the CLI says it as its flag (`--batch-size`). (The TUI's side: tests/tui/test_errors.py.)"""

from __future__ import annotations

import pickle

import pytest

from hyprstream_tui import cli
from hyprstream_tui.cli.common import flag
from hyprstream_tui.engine.forkserver import rebuild_error
from hyprstream_tui.engine.train.config import TrainConfig
from hyprstream_tui.errors import Conflict, HyprError, InvalidInput


def test_the_settings_an_error_names_are_read_from_its_message():
    exc = InvalidInput("The loss became nan: lower `learning_rate`, or set `new_run` (see `hyprstream lora log qa`).")
    assert exc.settings == ("learning_rate", "new_run") and exc.setting == "learning_rate"
    assert HyprError("No setting here: see `hyprstream lora list`.").setting is None  # a command is no setting
    assert exc.worded(flag) == ("The loss became nan: lower --learning-rate, or set --new-run "
                                "(see `hyprstream lora log qa`).")
    assert exc.worded(str.upper) == "The loss became nan: lower LEARNING_RATE, or set NEW_RUN (see `hyprstream lora log qa`)."


def test_the_setting_survives_the_way_to_another_process():
    """A training child sends its error as (class name, message); a pickle keeps it too."""
    with pytest.raises(InvalidInput) as info:
        TrainConfig(batch_size=0)
    rebuilt = rebuild_error(type(info.value).__name__, info.value.message)
    assert isinstance(rebuilt, InvalidInput) and rebuilt.setting == "batch_size"
    assert pickle.loads(pickle.dumps(info.value)).settings == ("batch_size",)


def test_the_cli_names_the_flag(tiny_store, home, capsys):
    """Through the real entry point: an engine error (TrainConfig) and a store error (create_adapter)."""
    tiny_store.create_adapter("tiny", "qa")
    assert cli.main(["--home", str(home), "lora", "train", "start", "qa", "--batch-size", "0"]) == InvalidInput.exit_code
    assert capsys.readouterr().err == "error: --batch-size must be at least 1, got 0.\n"
    assert cli.main(["--home", str(home), "lora", "create", "--name", "qa", "--base-model", "tiny"]) == Conflict.exit_code
    assert capsys.readouterr().err == "error: Model 'tiny' has an adapter named 'qa' already: choose another --name.\n"
    assert cli.main(["--home", str(home), "lora", "create", "--name", "q2", "--base-model", "tiny",
                     "--target-modules", " , "]) == InvalidInput.exit_code
    err = capsys.readouterr().err
    assert err == "error: --target-modules must be module names such as q_proj,v_proj.\n" and "`" not in err
