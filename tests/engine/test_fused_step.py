"""The fused decode step (engine/tuned/step.py and step.c, issue 15): a whole decode step in one C
call for the engine's own classes with int8/int4 weights (its prompts: test_fused_prefill.py).

What it must compute: with fp32 weights, what the torch step computes (to fp32 rounding); with
int8/int4 weights, the model whose weights are the dequantized ones, in fp32 (torch's int8/int4
kernels round activations to bf16, the fused step does not). The KV cache it writes is the
`NativeCache` torch's step reads, so the two can take turns on one sequence.
"""

from __future__ import annotations

import pytest
import torch

from hyprstream_tui.engine import native
from hyprstream_tui.engine.generate import decode_one_token, generate_tokens, new_cache, prefill
from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
from hyprstream_tui.engine.native.model import NativeForCausalLM
from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.tuned import step
from hyprstream_tui.engine.tuned.quantize import Int8WeightOnlyLinear
from hyprstream_tui.engine.tuned.quantize_int4 import Int4WeightOnlyLinear, dequantize

needs_step = pytest.mark.skipif(step.library() is None,
                                reason=f"the fused step cannot run on this machine: {step.status()}")
ALL_KINDS = step.EVERY
PROMPT = "The quick brown fox jumps over the lazy dog."


def load(tiny_models, arch, **options):
    lm = load_model(ModelSource(name=arch, path=tiny_models[arch]), LoadOptions(**options))
    assert isinstance(lm.model, NativeForCausalLM)
    return lm


def prefilled(lm, ids):
    cache = new_cache(lm.model)
    n = ids.shape[1]
    with torch.inference_mode():
        logits = prefill(lm.model, ids, torch.arange(n).unsqueeze(0), cache)
    return cache, logits


def close(ours, theirs, tol=1e-4):
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= tol * scale, (ours - theirs).abs().max()


def run_pair(model_fused, model_ref, ids, steps, tol=1e-4):
    """`steps` decode steps of the fused step on `model_fused` against torch's on `model_ref`, fed
    the same tokens; returns the fused step's cache."""
    lm_f, lm_r = model_fused, model_ref
    cache_f, logits_f = prefilled(lm_f, ids)
    cache_r, logits_r = prefilled(lm_r, ids)
    fused = step.FusedStep.build(lm_f.model, cache_f, kinds=ALL_KINDS)
    assert fused is not None
    pos = ids.shape[1]
    token = int(logits_r.argmax())
    with torch.inference_mode():
        for _ in range(steps):
            ours = fused.step(token, pos)
            theirs = decode_one_token(lm_r.model, torch.tensor([[token]]), torch.tensor([[pos]]), cache_r)
            close(ours, theirs, tol)
            token, pos = int(theirs.argmax()), pos + 1
    assert cache_f.length == cache_r.length == pos
    return cache_f, cache_r, token


@needs_step
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fp32_steps_equal_torchs_and_the_cache_grows(tiny_models, arch, monkeypatch):
    monkeypatch.setattr(native.model, "FIRST_CAPACITY", 4)  # the prompt fills it: steps must grow it
    lm = load(tiny_models, arch, dtype="float32")
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    cache_f, cache_r, token = run_pair(lm, lm, ids, steps=3 * ids.shape[1])
    assert cache_f.keys[0].shape[2] > ids.shape[1]  # grown past the prompt's capacity
    # torch's step continues the fused step's cache as it continues its own
    pos = cache_r.length
    with torch.inference_mode():
        after_fused = decode_one_token(lm.model, torch.tensor([[token]]), torch.tensor([[pos]]), cache_f)
        after_torch = decode_one_token(lm.model, torch.tensor([[token]]), torch.tensor([[pos]]), cache_r)
    close(after_fused, after_torch)


def dequantized_reference(tiny_models, arch, quantized):
    """The fp32 native model whose weights are `quantized`'s dequantized (and whose embedding is
    its bf16 table): what the fused step must compute for `quantized`."""
    ref = load(tiny_models, arch, dtype="float32").model

    def weight(module):
        if isinstance(module, Int8WeightOnlyLinear):
            return module.weight_int8.float() * module.scales.float()[:, None]
        assert isinstance(module, Int4WeightOnlyLinear)
        return dequantize(module.nibbles, module.scales_zeros)

    def fill(targets, module):
        w = weight(module)
        start = 0
        for lin in targets:
            lin.weight = torch.nn.Parameter(w[start : start + lin.out_features].clone(), requires_grad=False)
            if lin.bias is not None:
                lin.bias = torch.nn.Parameter(module.bias[start : start + lin.out_features].float().clone(),
                                              requires_grad=False)
            start += lin.out_features

    for mine, theirs in zip(ref.model.stack, quantized.model.stack):
        a, qa = mine.self_attn, theirs.self_attn
        fill([a.q_proj, a.k_proj, a.v_proj], qa.q_proj.fused.linear)
        fill([a.o_proj], qa.o_proj)
        fill([mine.mlp.gate_proj, mine.mlp.up_proj], theirs.mlp.gate_proj.fused.linear)
        fill([mine.mlp.down_proj], theirs.mlp.down_proj)
    ref.model.embed_tokens.weight = torch.nn.Parameter(quantized.model.embed_tokens.weight.float(),
                                                       requires_grad=False)
    ref.lm_head = torch.nn.Linear(ref.config.hidden_size, ref.config.vocab_size, bias=False)
    ref.lm_head.weight = torch.nn.Parameter(weight(quantized.lm_head), requires_grad=False)
    return ref


@needs_step
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_steps_compute_the_dequantized_model(tiny_models, arch, scheme):
    lm = load(tiny_models, arch, quantize=scheme)
    kinds = step.described(lm.model).kinds
    assert kinds == ({step.INT8} if scheme == "int8" else {step.INT4, step.INT8})  # int4: int8 head
    ref = load(tiny_models, arch, dtype="float32")
    ref.model = dequantized_reference(tiny_models, arch, lm.model)
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    # the prefills differ (torch's int8/int4 kernels round activations to bf16): start the fused
    # side from the reference's own prefill by running the reference's prompt through both caches
    cache_f, _ = prefilled(ref, ids)
    cache_r, logits = prefilled(ref, ids)
    fused = step.FusedStep.build(lm.model, cache_f)
    assert fused is not None
    token, pos = int(logits.argmax()), ids.shape[1]
    with torch.inference_mode():
        for _ in range(12):
            ours = fused.step(token, pos)
            theirs = decode_one_token(ref.model, torch.tensor([[token]]), torch.tensor([[pos]]), cache_r)
            close(ours, theirs)
            token, pos = int(theirs.argmax()), pos + 1


def exact_here() -> bool:
    """Whether bf16 models run fused by default here: exactly, as torch runs them (test_exact_step.py)."""
    return step.exact_refusal() == ""


@needs_step
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_decode_runs_quantized_and_fp32_models_fused_and_bf16_only_where_exact(tiny_models, scheme):
    for options, fused in (({"quantize": scheme}, True), ({"dtype": "float32"}, True),
                           ({"dtype": "bfloat16"}, exact_here())):
        lm = load(tiny_models, "llama", **options)
        cache, _ = prefilled(lm, torch.tensor([lm.tokenizer.encode(PROMPT)]))
        assert (step.FusedStep.build(lm.model, cache) is not None) == fused, options


@needs_step
@pytest.mark.parametrize("switch, fused", [("quantized", (True, False, False)),
                                           ("all", (True, True, True)),
                                           ("1", (True, True, None))])
def test_the_switch_picks_the_kinds_that_run_fused(tiny_models, monkeypatch, switch, fused):
    """`quantized` keeps torch's step (generate's bits) for fp32 and bf16; the default runs bf16
    fused where it is exact (None: whether it is, here); `all` runs bf16 fused anyway."""
    monkeypatch.setenv(step.ENV_SWITCH, switch)
    fused = tuple(exact_here() if f is None else f for f in fused)
    for options, expected in zip(({"quantize": "int8"}, {"dtype": "float32"}, {"dtype": "bfloat16"}), fused):
        lm = load(tiny_models, "llama", **options)
        cache, _ = prefilled(lm, torch.tensor([lm.tokenizer.encode(PROMPT)]))
        assert (step.FusedStep.build(lm.model, cache) is not None) == expected, (switch, options)


@needs_step
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_steps_round_where_torch_rounds(tiny_models, arch, monkeypatch):
    """Where bf16 cannot run exactly (held off here), the `all` switch's bf16 step keeps bf16
    values and a bf16 KV cache: torch's step and the fused one differ only where a sum taken in
    another order rounds the other way (a bf16 step or two)."""
    monkeypatch.setitem(step._state, "exact", "held off by the test")
    lm = load(tiny_models, arch, dtype="bfloat16")
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    cache_f, _ = prefilled(lm, ids)
    cache_r, logits = prefilled(lm, ids)
    assert cache_f.keys[0].dtype == torch.bfloat16
    fused = step.FusedStep.build(lm.model, cache_f, kinds=ALL_KINDS)
    assert fused is not None and fused.spec.bf16 == 1 and not fused.exact
    token, pos = int(logits.argmax()), ids.shape[1]
    with torch.inference_mode():
        for _ in range(8):
            ours = fused.step(token, pos)
            theirs = decode_one_token(lm.model, torch.tensor([[token]]), torch.tensor([[pos]]), cache_r).float()
            assert torch.equal(ours, ours.bfloat16().float())  # bf16 values
            close(ours, theirs, tol=0.03)
            # the same token, or one torch rates within that rounding of its best
            best = int(ours.argmax())
            assert best == int(theirs.argmax()) or float(theirs.max() - theirs[best]) <= 0.03 * float(theirs.abs().max())
            token, pos = int(theirs.argmax()), pos + 1


class Recording(SequenceState):
    """A SequenceState that keeps the logits of every step it picks from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []

    def pick(self, logits: torch.Tensor) -> int:
        self.logits.append(logits.float().clone())
        return super().pick(logits)


def near_tie(logits: torch.Tensor, margin: float) -> bool:
    top = logits.topk(2).values
    return float(top[0] - top[1]) <= margin


@needs_step
def test_greedy_tokens_with_the_step_on_and_off_agree_where_logits_are_clear(tiny_models):
    """Through the engine's loop (int8): the same greedy tokens as torch's quantized step until
    the first step whose two best logits lie within the bf16 rounding of torch's kernel."""
    lm = load(tiny_models, "qwen2", quantize="int8")
    ids = lm.tokenizer.encode(PROMPT)

    def run(on):
        step.set_enabled(on)
        try:
            seq = Recording(list(ids), SamplingParams(temperature=0, max_tokens=16), eos_ids=frozenset(),
                            generator=None)
            return list(generate_tokens(lm.model, seq)), seq.logits
        finally:
            step.set_enabled(True)

    (fused, _), (plain, logits) = run(True), run(False)
    assert len(fused) == len(plain) == 16
    for a, b, row in zip(fused, plain, logits):
        if a != b:
            assert near_tie(row, 0.02 * float(row.abs().max()))
            break


@needs_step
def test_lora_layers_keep_torchs_step(tiny_models, tiny_adapters):
    from hyprstream_tui.engine.loader import AdapterSource

    lm = load(tiny_models, "llama", dtype="float32")
    cache, _ = prefilled(lm, torch.tensor([lm.tokenizer.encode(PROMPT)]))
    assert step.FusedStep.build(lm.model, cache, kinds=ALL_KINDS) is not None
    lm.use_adapter(AdapterSource(name="lora", path=tiny_adapters["llama"], commit="c0ffee"))
    assert step.FusedStep.build(lm.model, cache, kinds=ALL_KINDS) is None


@needs_step
def test_a_token_or_position_out_of_range_raises_and_writes_nothing(tiny_models):
    lm = load(tiny_models, "llama", quantize="int8")
    ids = torch.tensor([lm.tokenizer.encode(PROMPT)])
    cache, _ = prefilled(lm, ids)
    fused = step.FusedStep.build(lm.model, cache)
    assert fused is not None
    before = [k.clone() for k in cache.keys]
    with pytest.raises(ValueError, match="out of range"):
        fused.step(lm.model.config.vocab_size, ids.shape[1])
    with pytest.raises(ValueError, match="cache's length"):
        fused.step(1, ids.shape[1] + 5)
    assert cache.length == ids.shape[1]
    # Bytes, not values: the cache's spare capacity is uninitialised memory, which may hold NaN
    # bit patterns that never compare equal as floats.
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(before, cache.keys))


def test_the_switch_and_turning_it_off_are_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv(step.ENV_SWITCH, "0")
    assert step._load() == (None, f"{step.ENV_SWITCH}=0")
    step.set_enabled(False)
    try:
        assert step.library() is None
        assert step.status() == "fused decode step: off (turned off in this process)"
    finally:
        step.set_enabled(True)


@needs_step
def test_the_self_check_refuses_a_library_whose_products_are_wrong():
    lib = step.library()
    assert step.self_check(lib) == ""

    def off_by_a_little(lin, x):
        y = step.rows(lib, lin, x)
        return y * (1 + 1e-3)

    assert "relative error" in step.self_check(lib, product=off_by_a_little)


@needs_step
def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    path = step.compile_library()
    assert path.parent == tmp_path / "cache" / "kernels"
    path.write_bytes(b"not a shared library")
    lib, why = step._load()
    assert lib is not None and why == ""
    assert path.read_bytes()[:4] == b"\x7fELF"


def test_no_compiler_is_a_reason_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPRSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    lib, why = step._load()
    assert lib is None
    assert why.startswith(("no C compiler", "not Linux", "the CPU lacks")) and "\n" not in why


@needs_step
@pytest.mark.parametrize("left", [1, 3, 9])
def test_a_prompt_or_its_rest_after_a_prefix_runs_fused(tiny_models, monkeypatch, left):
    """After a reused prefix (or from an empty cache) the prompt's tokens left to run go through
    the fused prompt (`FusedStep.prefill`), not torch's prefill: the same greedy tokens as torch's."""
    from hyprstream_tui.engine import generate

    monkeypatch.setenv(step.ENV_SWITCH, "all")  # fp32: compared with torch's fp32 to rounding
    lm = load(tiny_models, "llama", dtype="float32")
    ids = lm.tokenizer.encode(PROMPT)
    calls = []
    real_prefill = generate.prefill
    monkeypatch.setattr(generate, "prefill", lambda *a, **k: calls.append(1) or real_prefill(*a, **k))

    def run(on, prompt, prefix):
        step.set_enabled(on)
        try:
            cache = new_cache(lm.model)
            if prefix:
                with torch.inference_mode():
                    real_prefill(lm.model, torch.tensor([prompt[:prefix]]), torch.arange(prefix).unsqueeze(0), cache)
            seq = SequenceState(list(prompt), SamplingParams(temperature=0, max_tokens=8),
                                eos_ids=frozenset(), generator=None)
            return list(generate_tokens(lm.model, seq, cache=cache))
        finally:
            step.set_enabled(True)

    for prompt, prefix in ((ids, len(ids) - left), (ids[:left], 0)):
        calls.clear()
        fused = run(True, prompt, prefix)
        assert calls == []  # no torch prefill: the fused prompt ran the rest
        assert fused == run(False, prompt, prefix) and calls == [1]


@needs_step
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_fp32_model_from_a_bf16_checkpoint_reads_its_bf16_rows_to_the_same_bits(tiny_models, arch, tmp_path):
    """Loaded in fp32 from a bf16 checkpoint, each layer keeps the checkpoint's bf16 rows beside its
    widened weights, and the step reads those (half the bytes): its prompt, steps and cache are
    those of the step over the fp32 weights bit for bit, and its greedy tokens `generate`'s on the
    model as transformers loads it in fp32."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path / arch
    shutil.copytree(tiny_models[arch], folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in weights.items()}, folder / "model.safetensors")
    narrow = load({arch: folder}, arch, dtype="float32")
    wide = load({arch: folder}, arch, dtype="float32")
    for module in wide.model.modules():
        if hasattr(module, "hs_bf16_weight"):
            del module.hs_bf16_weight
    shape = step.described(narrow.model)
    assert shape.kinds == {step.FP32} and shape.spec.bf16 == 0 and shape.spec.embed_f32 == 0
    assert {lin.kind for layer in shape.layers for lin in (layer.q, layer.down)} | {shape.spec.head.kind} == {step.BF16}
    assert step.described(wide.model).spec.embed_f32 == 1
    ids = torch.tensor([narrow.tokenizer.encode(PROMPT)])
    runs = []
    for lm in (narrow, wide):
        cache = new_cache(lm.model)
        fused = step.FusedStep.build(lm.model, cache)
        assert fused is not None
        with torch.inference_mode():
            logits = [fused.prefill(ids[0], 0)]
            token = int(logits[0].argmax())
            for pos in range(ids.shape[1], ids.shape[1] + 6):
                logits.append(fused.step(token, pos))
                token = int(logits[-1].argmax())
        runs.append((logits, cache))
    (a, cache_a), (b, cache_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    n = ids.shape[1] + 6
    assert all(torch.equal(x[:, :, :n], y[:, :, :n]) for x, y in zip(cache_a.keys + cache_a.values,
                                                                  cache_b.keys + cache_b.values))
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = list(generate_tokens(narrow.model, SequenceState(ids[0].tolist(), SamplingParams(temperature=0, max_tokens=24),
                                                           eos_ids=frozenset(), generator=None)))
    assert got == want
