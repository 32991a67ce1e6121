"""The fused step's exact bf16 mode (engine/tuned/exact.py, step.c `hs_exact_*`,
issue 15): a bf16 model's decode step computed as torch computes it, bit for bit, on a CPU whose
oneDNN runs bf16 products with AVX512-BF16, so bf16 keeps greedy parity with `generate` and runs
fused by default. Elsewhere it is refused with a reason and torch's step runs (tested there by
test_fused_step.py)."""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine import native
from hyprstream_tui.engine.generate import decode_one_token, generate_tokens, new_cache, prefill
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.native.model import NativeForCausalLM
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.tuned import aoti, exact, step

needs_exact = pytest.mark.skipif(step.library() is None or step.exact_refusal() != "",
                                 reason=f"bf16 cannot run exactly on this machine: "
                                        f"{step.status() if step.library() is None else step.exact_refusal()}")
PROMPT = "Once upon a time there was a small village by the sea."


def load(tiny_models, arch):
    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(dtype="bfloat16"))
    assert isinstance(lm.model, NativeForCausalLM)
    return lm


def same_cache(a, b, n):
    assert a.length == b.length == n
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)):
        assert torch.equal(x[:, :, :n].view(torch.int16), y[:, :, :n].view(torch.int16))


@needs_exact
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("attention", ["in C", "from Python"])
def test_exact_steps_equal_torchs_bit_for_bit_as_the_cache_and_rotary_tables_grow(tiny_models, arch,
                                                                                  monkeypatch, attention):
    # torch's attention: called from step.c through libtorch_cpu's C shim (one call a step), or,
    # where that torch lacks it, from Python between the step's C parts
    assert aoti.hand_to(step.library())
    if attention == "from Python":
        monkeypatch.setitem(aoti._handed, id(step.library()), False)
    monkeypatch.setattr(native.model, "FIRST_CAPACITY", 8)  # the prompt fills it: steps grow it
    monkeypatch.setattr(step, "FIRST_CAPACITY", 8)  # and the rotary tables with it
    lm = load(tiny_models, arch)
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    n = ids.shape[1]
    ours, theirs = new_cache(lm.model), new_cache(lm.model)
    with torch.inference_mode():
        prefill(lm.model, ids, torch.arange(n).unsqueeze(0), theirs)
        run = step.FusedStep.build(lm.model, ours)
        assert run is not None and run.exact
        first = run.prefill(ids[0], 0)  # an exact model's prompt: torch's own
        token, pos = int(first.argmax()), n
        for _ in range(3 * n):
            got = run.step(token, pos)
            want = decode_one_token(lm.model, torch.tensor([[token]]), torch.tensor([[pos]]), theirs).float()
            assert torch.equal(got, want), pos
            token, pos = int(want.argmax()), pos + 1
    assert ours.keys[0].shape[2] > n and run.shape.rope_positions >= pos
    same_cache(ours, theirs, pos)


@needs_exact
def test_an_exact_prompt_is_torchs_own_and_a_reused_prefix_continues_it(tiny_models):
    lm = load(tiny_models, "qwen2")
    ids = torch.tensor(lm.tokenizer.encode(PROMPT + " " + PROMPT))
    theirs = new_cache(lm.model)
    with torch.inference_mode():
        want = prefill(lm.model, ids[None], torch.arange(len(ids)).unsqueeze(0), theirs).float()
        ours = new_cache(lm.model)
        run = step.FusedStep.build(lm.model, ours)
        head = run.prefill(ids[:7], 0)
        assert torch.equal(head, prefill(lm.model, ids[None, :7], torch.arange(7).unsqueeze(0),
                                         new_cache(lm.model)).float())
        one = run.prefill(ids[7:8], 7)  # one token after a prefix: a step, with torch's prefill's bits
        got = run.prefill(ids[8:], 8)  # the rest: torch's prefill continues the cache
    reference = new_cache(lm.model)
    with torch.inference_mode():
        prefill(lm.model, ids[None, :7], torch.arange(7).unsqueeze(0), reference)
        assert torch.equal(one, prefill(lm.model, ids[None, 7:8], torch.tensor([[7]]), reference).float())
        rest = prefill(lm.model, ids[None, 8:], torch.arange(8, len(ids)).unsqueeze(0), reference).float()
    assert torch.equal(got, rest)
    same_cache(ours, reference, len(ids))
    assert want.argmax() == got.argmax()


@needs_exact
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_greedy_tokens_run_fused_by_default_and_equal_generates(tiny_models, arch):
    """Through the engine's loop, on by default: the same tokens as transformers' `generate` on
    the model exactly as transformers loads it in bf16."""
    from transformers import AutoModelForCausalLM

    lm = load(tiny_models, arch)
    assert step.FusedStep.build(lm.model, new_cache(lm.model)) is not None
    plain = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.bfloat16).eval()
    ids = lm.tokenizer.encode(PROMPT)
    ours = list(generate_tokens(lm.model, SequenceState(ids, SamplingParams(temperature=0, max_tokens=40),
                                                        eos_ids=frozenset(), generator=None)))
    with torch.inference_mode():
        out = plain.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


@needs_exact
def test_the_exact_check_refuses_sums_in_another_order(monkeypatch):
    """The check compares whole steps with torch's: a norm summed over 16 lanes instead of torch's
    8 (a CPU or torch build whose kernels differ) fails it, and bf16 then keeps torch's step."""
    lib = step.library()
    assert exact.check(lib, step.Described, step.FusedStep) == ""
    monkeypatch.setattr(exact, "SUM_LANES", 16)
    assert "differ" in exact.check(lib, step.Described, step.FusedStep)


@needs_exact
def test_a_lora_model_keeps_torchs_step_and_packs_nothing(tiny_models, tiny_adapters):
    lm = load(tiny_models, "qwen2")
    lm.model.load_adapter(str(tiny_adapters["qwen2"]), adapter_name="a")
    assert step.FusedStep.build(lm.model, new_cache(lm.model)) is None
    assert lm.model not in step._described


@pytest.mark.skipif(step.library() is None, reason=f"the fused step cannot run here: {step.status()}")
def test_rows_packed_in_c_equal_torchs_packing_in_step_cs_layout():
    w = torch.randn(208, 96).bfloat16()  # three blocks of 64 rows and one of 16
    packed = exact.pack_rows(w, step.library())
    assert torch.equal(packed, exact.pack_rows(w, None))  # the torch fallback
    # block b, pair p, row r: w[64 b + r, 2 p] then w[64 b + r, 2 p + 1]
    for b, rows in ((0, 64), (3, 16)):
        block = packed[64 * b * 96 : (64 * b + rows) * 96].view(48, rows, 2)
        for p, r in ((0, 0), (5, 7), (47, rows - 1)):
            assert torch.equal(block[p, r], w[64 * b + r, 2 * p : 2 * p + 2])


@needs_exact
def test_the_quantized_switch_keeps_torchs_bf16_step_and_makes_no_copy(tiny_models, monkeypatch):
    monkeypatch.setenv(step.ENV_SWITCH, "quantized")
    lm = load(tiny_models, "llama")
    assert step.FusedStep.build(lm.model, new_cache(lm.model)) is None
    assert not step.described(lm.model).exact  # no packed copy of the weights


@needs_exact
def test_a_reply_runs_through_torch_while_the_weights_pack_then_fused_with_the_same_tokens(tiny_models,
                                                                                            monkeypatch):
    """The engine does not wait for the packed copy (a cold `infer`): torch's steps run on the same
    cache until it is made, then the fused step takes over, and the reply is `generate`'s."""
    import threading
    import time

    from transformers import AutoModelForCausalLM

    lm = load(tiny_models, "mistral")
    released, real_pack = threading.Event(), exact.pack
    monkeypatch.setattr(exact, "pack", lambda *args: released.wait(30) and real_pack(*args))
    fused_at: list[int] = []
    real_step = step.FusedStep.step
    monkeypatch.setattr(step.FusedStep, "step", lambda self, t, p: fused_at.append(p) or real_step(self, t, p))
    ids = lm.tokenizer.encode(PROMPT)
    seq = SequenceState(ids, SamplingParams(temperature=0, max_tokens=24), eos_ids=frozenset(), generator=None)
    ours = []
    for token in generate_tokens(lm.model, seq):
        ours.append(token)
        if len(ours) == 4:
            assert step.packing(lm.model) and fused_at == []
            released.set()
            deadline = time.monotonic() + 30
            while step.packing(lm.model) and time.monotonic() < deadline:
                time.sleep(0.01)
    assert fused_at and min(fused_at) == len(ids) + 3  # the steps before it were torch's (the first token is the prompt's)
    plain = AutoModelForCausalLM.from_pretrained(tiny_models["mistral"], dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        out = plain.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


@needs_exact
def test_a_passed_check_is_remembered_beside_the_library_for_this_cpu_and_torch(tmp_path, monkeypatch):
    library = tmp_path / "step-0000.so"
    library.write_bytes(b"")
    lib = step.library()
    assert exact.check_once(lib, library, step.Described, step.FusedStep) == ""
    assert (tmp_path / "step-0000.so.exact").is_file()
    monkeypatch.setattr(exact, "check", lambda *args: "it would differ now")
    assert exact.check_once(lib, library, step.Described, step.FusedStep) == ""  # remembered
    monkeypatch.setattr(exact, "SUM_LANES", 16)  # another build of the sums: checked again
    assert exact.check_once(lib, library, step.Described, step.FusedStep) == "it would differ now"


@needs_exact
def test_a_store_models_packed_rows_go_to_the_homes_cache_and_the_next_load_maps_them(tiny_store,
                                                                                      monkeypatch):
    from hyprstream_tui.engine.sources import resolve_source

    def loaded():
        lm = load_model(resolve_source("tiny", tiny_store), LoadOptions(dtype="bfloat16"))
        assert lm.model.hs_pack_cache[0] == tiny_store.paths.cache  # the loader names the entry
        return lm

    first = loaded()
    step.described(first.model)
    folder, name = first.model.hs_pack_cache
    assert (folder / "quantized" / f"{name}.safetensors").is_file()
    from hyprstream_tui.engine.tuned import quant_cache

    about = quant_cache.describe(folder / "quantized" / f"{name}.safetensors")  # what `cache list` shows
    assert (about["model"], about["commit"], about["scheme"]) == ("tiny", tiny_store.head("tiny"), exact.SCHEME)
    packs = []
    real = exact.pack_rows
    monkeypatch.setattr(exact, "pack_rows", lambda *args: packs.append(1) or real(*args))
    again = loaded()
    shape = step.described(again.model)
    assert shape.exact and packs == []  # mapped, not packed
    ids = torch.tensor([again.tokenizer.encode(PROMPT)])
    n = ids.shape[1]
    ours, theirs = new_cache(again.model), new_cache(again.model)
    with torch.inference_mode():
        run = step.FusedStep.build(again.model, ours)
        token, pos = int(run.prefill(ids[0], 0).argmax()), n
        prefill(again.model, ids, torch.arange(n).unsqueeze(0), theirs)
        for _ in range(6):
            want = decode_one_token(again.model, torch.tensor([[token]]), torch.tensor([[pos]]), theirs).float()
            assert torch.equal(run.step(token, pos), want)
            token, pos = int(want.argmax()), pos + 1
