"""Pure parts of training: config validation, the learning-rate schedule, sample rows, the chat
template with answer-only labels, epoch order, batches, the safetensors metadata rewrite."""

from __future__ import annotations

import json
import math

import pytest

from hyprstream_tui.engine.train.config import TrainConfig, lr_at
from hyprstream_tui.engine.train.data import (IGNORE_INDEX, check_row, collate, encode, epoch_order, parse_jsonl,
                                              to_messages)
from hyprstream_tui.errors import InvalidInput


@pytest.mark.parametrize("kwargs, setting", [
    (dict(learning_rate=0), "learning_rate"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(batch_size=0), "batch_size"),
    (dict(steps=0), "steps"),
    (dict(epochs=-1.0), "epochs"),
    (dict(steps=5, epochs=1.0), "steps"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(max_seq_len=2), "max_seq_len"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(dtype="float8"), "dtype"),
    (dict(device="tpu"), "device"),
    (dict(batch_size=True), "batch_size"),
])
def test_config_refuses_bad_values_with_one_line_naming_the_setting(kwargs, setting):
    """The error names the setting (no front end's flag or label): each front end words it."""
    with pytest.raises(InvalidInput) as info:
        TrainConfig(**kwargs)
    message = info.value.message
    assert info.value.setting == setting and f"`{setting}`" in message, message
    assert "\n" not in message and "--" not in message, message


def test_config_run_length_from_steps_or_epochs():
    assert TrainConfig(steps=7).run_steps(steps_per_epoch=3) == 7
    assert TrainConfig(epochs=2).run_steps(steps_per_epoch=3) == 6
    assert TrainConfig().run_steps(steps_per_epoch=3) == 60  # default: 3 epochs, at least 60 steps
    assert TrainConfig().run_steps(steps_per_epoch=30) == 90
    assert TrainConfig().warmup_for(50) == 5 and TrainConfig(warmup_steps=80).warmup_for(50) == 50


def test_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(learning_rate=1e-2, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(i, **kw) for i in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-3)
    assert all(math.isfinite(lr_at(i, learning_rate=1.0, total_steps=1, warmup_steps=0, min_lr_ratio=0)) for i in range(2))


def test_rows_input_output_and_chat_are_accepted_and_normalised():
    assert check_row({"input": "q", "output": "a", "extra": 1}, "x") == {"input": "q", "output": "a"}
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a", "name": "bot"}]}
    assert check_row(chat, "x")["messages"][2] == {"role": "assistant", "content": "a"}
    assert to_messages({"input": "q", "output": "a", "system": "s"})[0] == {"role": "system", "content": "s"}


@pytest.mark.parametrize("line", [
    "[1, 2]", '{"input": "q"}', '{"input": "q", "output": ""}', '{"input": 3, "output": "a"}',
    '{"messages": []}', '{"messages": [{"role": "user", "content": "q"}]}',
    '{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
    '{"prompt": "q", "completion": "a"}', '{"input": "q", "output": "a"', "\xff\xfe",
])
def test_a_bad_row_is_named_by_its_line_number(line):
    good = json.dumps({"input": "q", "output": "a"})
    data = (good + "\n\n" + good + "\n").encode() + line.encode("utf-8", "surrogateescape") + b"\n" + good.encode()
    with pytest.raises(InvalidInput) as info:
        parse_jsonl(data, "f.jsonl")
    assert info.value.message.startswith("f.jsonl line 4:")


def test_labels_cover_only_the_answers_and_the_end_of_turn(tiny_model_src):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_src))
    row = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."},
                        {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "Six, no: five."}]}
    enc = encode(tok, row, 512)
    learned = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert learned == "It is four.<|im_end|>\nSix, no: five.<|im_end|>\n"
    prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(list(enc.input_ids)).startswith(prompt)
    assert len(encode(tok, row, 12).input_ids) == 12


def test_epoch_order_depends_only_on_seed_epoch_and_size():
    assert epoch_order(10, seed=1, epoch=0) == epoch_order(10, seed=1, epoch=0)
    assert sorted(epoch_order(10, seed=1, epoch=3)) == list(range(10))
    assert epoch_order(10, seed=1, epoch=0) != epoch_order(10, seed=1, epoch=1)
    assert epoch_order(10, seed=1, epoch=0) != epoch_order(10, seed=2, epoch=0)


def test_collate_pads_right_and_ignores_padding():
    from hyprstream_tui.engine.train.data import Encoded

    batch = collate([Encoded((5, 6, 7), (IGNORE_INDEX, 6, 7)), Encoded((8,), (8,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_metadata_rewrite_keeps_tensors_and_alignment():
    import torch
    from safetensors.torch import load, save

    from hyprstream_tui.engine.train.export import with_metadata

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    data = with_metadata(save(tensors, metadata={"format": "pt"}), {"format": "pt", "base_model": "tiny", "x": "é"})
    back = load(data)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert int.from_bytes(data[:8], "little") % 8 == 0
