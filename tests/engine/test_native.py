"""engine.native: our decoder, checkpoint reader and tokenizer against transformers' own, on the
tiny models of every architecture (the real model's tokens are in tests/real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.native import Unsupported, read_safetensors
from hyprstream_tui.engine.native.model import FIRST_CAPACITY, NativeConfig
from hyprstream_tui.engine.native.tokenizer import NativeTokenizer
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState
from tests.helpers import REPO_ROOT

NATIVE = ("qwen2", "llama", "mistral")
TEXTS = ["Hello, world!", "  leading spaces and   runs", "Ünïcödé — emoji 🦙🦙 and 中文", "a\nb\n\nc\t",
         "<|im_start|>user\nhi<|im_end|>", ""]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 🦙"}, {"role": "user", "content": "Again:\n  indented"}],
]


@pytest.mark.parametrize("arch", NATIVE)
def test_the_checkpoint_reader_gives_safetensors_own_tensors(tiny_models, arch):
    from safetensors.torch import load_file

    path = Path(tiny_models[arch]) / "model.safetensors"
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("arch", NATIVE)
def test_logits_equal_transformers_bit_for_bit(tiny_models, arch):
    """The whole-prompt forward of our classes against transformers' (fp32, SDPA)."""
    from transformers import AutoModelForCausalLM

    ours = load_model(ModelSource(name=arch, path=tiny_models[arch]),
                      LoadOptions(dtype="float32", tuned=False)).model
    theirs = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation="sdpa").eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 1000, 12]])
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("arch", NATIVE)
def test_tokenizer_equals_transformers(tiny_models, arch):
    from transformers import AutoTokenizer

    folder = Path(tiny_models[arch])
    ours, theirs = NativeTokenizer.read(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == theirs.eos_token_id
    assert bool(ours.chat_template) == bool(theirs.chat_template)
    if theirs.chat_template:
        for messages in CONVERSATIONS:
            for prompt in (True, False):
                assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) \
                    == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_a_chat_template_runs_sandboxed(tmp_path, tiny_models):
    """Templates are untrusted: no reaching into Python from one, as in transformers."""
    import jinja2

    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((Path(tiny_models["llama"]) / name).read_bytes())
    (folder / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        NativeTokenizer.read(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_greedy_past_the_first_cache_capacity_equals_transformers_classes(tiny_models):
    """The cache doubles in place past FIRST_CAPACITY positions; the tokens do not notice."""
    source = ModelSource(name="llama", path=tiny_models["llama"])
    params = SamplingParams(temperature=0, max_tokens=FIRST_CAPACITY + 40)
    ids = list(range(5, 30))

    def run(native: bool) -> list[int]:
        lm = load_model(source, LoadOptions(dtype="float32", native=native))
        seq = SequenceState(ids, params, eos_ids=frozenset(), generator=None)
        from hyprstream_tui.engine.generate import generate_tokens

        return list(generate_tokens(lm.model, seq))

    ours = run(True)
    assert len(ours) == params.max_tokens and ours == run(False)


@pytest.mark.parametrize("change,why", [
    ({"model_type": "gemma"}, "model_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rotary"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 16, "use_sliding_window": True}, "sliding window"),
])
def test_what_the_native_decoder_does_not_cover_loads_through_transformers(tiny_models, tmp_path, change, why):
    folder = tmp_path / "m"
    folder.mkdir()
    for path in Path(tiny_models["llama"]).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(Unsupported, match=why):
        NativeConfig.read(folder)


def test_the_native_path_never_imports_transformers(tiny_models):
    """Load, chat-template, prefill and decode: not one transformers (or peft) module."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model\n"
        "from hyprstream_tui.engine.chat import render\n"
        "from hyprstream_tui.engine.generate import stream_text\n"
        "from hyprstream_tui.engine.params import SamplingParams\n"
        "from hyprstream_tui.engine.sequence import SequenceState\n"
        f"lm = load_model(ModelSource(name='m', path=Path({str(tiny_models['llama'])!r})), LoadOptions(dtype='bfloat16'))\n"
        "ids = render(lm.tokenizer, [{'role': 'user', 'content': 'Hi'}])\n"
        "seq = SequenceState(ids, SamplingParams(temperature=0, max_tokens=8), eos_ids=lm.eos_ids,\n"
        "                    generator=None, tokenizer=lm.tokenizer)\n"
        "text = ''.join(stream_text(lm.model, seq))\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'accelerate'})\n"
        "assert getattr(lm.model, 'native', False) and seq.token_ids and not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("arch", NATIVE)
def test_generation_from_a_prefilled_prefix_equals_a_whole_run(tiny_models, arch):
    """A prompt continuing cached positions takes the masked attention path; same tokens."""
    from hyprstream_tui.engine.generate import generate_tokens, new_cache, prefill

    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(dtype="float32"))
    ids = list(range(5, 40))
    params = SamplingParams(temperature=0, max_tokens=24)

    def run(cache=None) -> list[int]:
        seq = SequenceState(ids, params, eos_ids=frozenset(), generator=None)
        return list(generate_tokens(lm.model, seq, cache=cache))

    whole = run()
    cache = new_cache(lm.model)
    with torch.inference_mode():
        prefill(lm.model, torch.tensor([ids[:-7]]), torch.arange(len(ids) - 7).unsqueeze(0), cache)
    assert run(cache) == whole


def test_a_tied_table_saved_under_the_output_layers_name_loads_natively(tiny_models, tmp_path):
    """safetensors' `save_model` keeps one name of a shared tensor; a tied checkpoint holding only
    `lm_head.weight` (as decode.py's Qwen-shaped model did) loads through our classes too."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "m"
    folder.mkdir()
    for path in Path(tiny_models["qwen2"]).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")  # the table, one name
    save_file(tensors, str(folder / "model.safetensors"))
    lm = load_model(ModelSource(name="m", path=folder), LoadOptions(dtype="float32", tuned=False))
    assert type(lm.model).__name__ == "NativeForCausalLM"
    theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    assert torch.equal(theirs.model.embed_tokens.weight, tensors["lm_head.weight"])
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 1000, 12]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, theirs(ids).logits)
