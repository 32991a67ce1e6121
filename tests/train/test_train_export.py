"""Export and merge: the single file loads into plain PEFT and answers like the adapter; the PEFT
folder loads with PeftModel.from_pretrained; a merge is a new model repository that records where
it came from and answers the same."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from hyprstream_tui.engine.train.export import export_adapter, merge_adapter
from hyprstream_tui.errors import Conflict, InvalidInput
from tests.train.helpers import ANSWERS, adapter_answers, greedy_answers, load_base


def test_single_file_loads_into_plain_peft_and_answers_the_same(trained, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    out = export_adapter(trained, "tiny", "qa", tmp_path / "qa.safetensors")
    adapter = trained.resolve_adapter("tiny", "qa")
    with safe_open(str(out.path), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["base_model"] == "tiny" and meta["adapter_commit"] == adapter.tip == out.commit
    assert meta["base_commit"] == trained.head("tiny")
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
    # Plain PEFT, nothing of ours: the config from the metadata, the weights from the file.
    base, tok = load_base(trained.model_dir("tiny"))
    model = get_peft_model(base, LoraConfig(**{k: v for k, v in json.loads(meta["peft_config"]).items()
                                                if k not in ("peft_type",)}))
    result = set_peft_model_state_dict(model, load_file(str(out.path)))
    assert not result.unexpected_keys
    assert greedy_answers(model, tok) == list(ANSWERS)


def test_peft_folder_loads_with_from_pretrained(trained, tmp_path):
    out = export_adapter(trained, "tiny", "qa", tmp_path / "qa-peft", fmt="peft")
    assert sorted(p.name for p in out.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter_answers(trained.model_dir("tiny"), out.path) == list(ANSWERS)


def test_export_of_an_earlier_checkpoint(trained, tmp_path):
    out = export_adapter(trained, "tiny", "qa", tmp_path / "s20.safetensors", rev="step:20")
    assert out.commit == next(c.sha for c in trained.log("tiny", "qa") if c.step == 20)


def test_export_refuses_bad_outputs_and_changes_nothing(trained, tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"keep")
    cases = [
        (tmp_path / "taken.safetensors", Conflict, "exists already"),
        (tmp_path / "qa.bin", InvalidInput, ".safetensors"),
        (tmp_path / "missing" / "qa.safetensors", InvalidInput, "does not exist"),
        (trained.paths.home / "models" / "x.safetensors", InvalidInput, "outside the store"),
    ]
    for path, error, needle in cases:
        with pytest.raises(error, match=needle):
            export_adapter(trained, "tiny", "qa", path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Conflict, match="holds no adapter"):
        export_adapter(trained, "tiny", "qa", tmp_path / "mine", fmt="peft", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "taken.safetensors").read_bytes() == b"keep"
    assert not (tmp_path / "qa.bin").exists()
    trained.create_adapter("tiny", "untrained")
    with pytest.raises(InvalidInput, match="no trained weights"):
        export_adapter(trained, "tiny", "untrained", tmp_path / "u.safetensors")


def test_merge_is_a_new_model_that_records_its_origin(trained):
    adapter = trained.resolve_adapter("tiny", "qa")
    summary = merge_adapter(trained, "tiny", "qa", "tiny-qa")
    info = trained.model_info("tiny-qa")
    first = info.commits[-1]
    assert len(info.commits) == 1 and first.kind == "merge"
    assert first.metrics["base-commit"] == trained.head("tiny") and first.metrics["adapter-commit"] == adapter.tip
    assert summary.source == "merge:tiny:qa"
    model, tok = load_base(trained.model_dir("tiny-qa"))
    assert greedy_answers(model, tok) == list(ANSWERS)
    with pytest.raises(Conflict):
        merge_adapter(trained, "tiny", "qa", "tiny-qa")
