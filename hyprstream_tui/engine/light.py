"""Replies without torch, for a cold `hyprstream infer` (issue 21): an `Engine` whose models are
step images (`tuned.step_image`), run by the fused step's C library through numpy.

`import torch` alone takes longer than issue 21's whole cold target (2x llama.cpp's cold answer).
A model the engine has loaded once (quantized through the home's cache, or fp32) has left an
image of what its fused step reads (an fp32 model's image links its checkpoint's weights); a later
command that finds it answers here: the store resolves the name,
`engine.native.tokenizer` (tokenizers and jinja2) renders the prompt, the library runs the prompt
and each token exactly as the engine's `FusedStep` does, and `SequenceState` picks, detokenises
and stops as it does there. So the reply, its events, its provenance and seed are the engine's.

`engine_for` returns a LightEngine only where all of that holds, None everywhere else (the caller
loads torch's engine): `--quantize int8`/`int4` with fp32 activations, or an fp32 model (`--dtype
float32`, or auto where the CPU lacks native bf16), on the CPU (no CUDA device present), the fused
step running that kind by default (`HYPRSTREAM_FUSED_STEP`), a store model at a commit, no adapter,
tokenizer files the native tokenizer reads, the library built and checked on this CPU by an earlier
torch process (`step_abi.checked_library`), the image written, and `HYPRSTREAM_LIGHT` not 0.

Imports neither torch nor transformers; numpy when it answers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

from hyprstream_tui.engine.cpu import usable_cores
from hyprstream_tui.engine.engine import Engine
from hyprstream_tui.engine.loader import LoadedModel, LoadOptions, ModelSource, pick_dtype, prefill_fp32

if TYPE_CHECKING:
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer
    from hyprstream_tui.engine.sequence import SequenceState
    from hyprstream_tui.engine.tuned.exact_image import ExactImage
    from hyprstream_tui.engine.tuned.step_image import ImageModel
    from hyprstream_tui.store import Store

ENV = "HYPRSTREAM_LIGHT"
CUDA_MARKS = ("/proc/driver/nvidia/version", "/dev/nvidia0")  # "auto" would pick CUDA there


class LightEngine(Engine):
    """An Engine over one prepared step image (`engine_for`); requests for other models or
    options are refused with the reason, as loading errors are."""

    def __init__(self, *, store: "Store", options: LoadOptions, threads: int | None, source: ModelSource,
                 image: "ImageModel | ExactImage", tokenizer: "NativeTokenizer", prepared_s: float) -> None:
        super().__init__(store=store, options=options, threads=threads, max_models=1)
        self._source, self._image, self._tokenizer, self._prepared_s = source, image, tokenizer, prepared_s
        self.last_ids: list[int] = []  # the tokens of the last sequence it ran (prompt and reply)

    def _load(self, source: ModelSource, options: LoadOptions) -> LoadedModel:
        from hyprstream_tui.errors import InvalidInput

        if (source.path, source.commit, options) != (self._source.path, self._source.commit, self.options):
            raise InvalidInput(f"{source.name!r} with these options is not this command's model.")
        started = time.perf_counter()
        facts = self._image.facts
        lm = LoadedModel(source=source, options=options, model=cast(Any, self._image),
                         tokenizer=cast(Any, self._tokenizer), dtype=facts.dtype, device="cpu",
                         window=facts.window, eos_ids=frozenset(facts.eos_ids), load_s=0.0,
                         quant_cache="hit")
        lm.load_s = self._prepared_s + time.perf_counter() - started
        return lm

    def _use_threads(self, threads: int | None) -> None:
        self._image.use_threads(threads if threads is not None else usable_cores())

    def _texts(self, lm: LoadedModel, seq: "SequenceState", cancel: threading.Event) -> Iterator[str]:
        from hyprstream_tui.engine import loop

        image = cast("ImageModel | ExactImage", lm.model)
        run = image.sequence(min(seq.n_prompt + seq.params.max_tokens, lm.window))
        yield from loop.run(seq, lambda: run.prefill(seq.prompt_ids), run.step, cancel=cancel)
        self.last_ids = [int(i) for i in seq.seen[: seq.n_prompt + len(seq.token_ids)]]


def engine_for(spec: str, *, home: str | Path | None, options: LoadOptions,
               threads: int | None) -> LightEngine | None:
    """A LightEngine for `spec` under `options`, or None where the torch engine must answer."""
    if os.environ.get(ENV, "1") == "0" or not _options_fit(options):
        return None
    if options.device == "auto" and any(os.path.exists(mark) for mark in CUDA_MARKS):
        return None
    started = time.perf_counter()
    bf16 = pick_dtype(options.dtype, "cpu", options.quantize) == "bfloat16"
    from hyprstream_tui.engine.tuned import step_abi

    lib = step_abi.checked_library()
    if lib is None:
        return None
    from hyprstream_tui.engine import native
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer
    from hyprstream_tui.engine.sources import parse_spec, resolve_source
    from hyprstream_tui.engine.tuned import quant_cache, step_image
    from hyprstream_tui.errors import HyprError
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    threads = threads if threads is not None else usable_cores()
    try:
        parsed = parse_spec(spec)
        if parsed.adapter is not None:
            return None
        store = Store(Paths.from_env(home))
        source = resolve_source(parsed, store)
        if source.commit is None or source.cache is None:
            return None
        files = native.checkpoint_files(source.path)
        image: ImageModel | ExactImage | None
        if bf16:
            from hyprstream_tui.engine.tuned import exact_image

            key = quant_cache.key(source.path, source.commit, exact_image.SCHEME, files)
            image = exact_image.ExactImage.open(exact_image.path_for(source.cache, key), source.path, lib, threads)
        else:
            key = quant_cache.key(source.path, source.commit, step_image.scheme(options.quantize), files)
            image = step_image.ImageModel.open(lib, step_image.path_for(source.cache, key), threads, source.path)
            if image is not None and (image.facts.dtype != "float32" or not image.kinds <= step_abi.fused_kinds()):
                return None  # the engine runs this kind through torch's step
        if image is None or image.facts.quantize != options.quantize:
            return None
        tokenizer = NativeTokenizer.read(source.path)
    except (HyprError, native.Unsupported, OSError):
        return None  # the engine's path reports what is wrong, as it always has
    return LightEngine(store=store, options=options, threads=threads, source=source, image=image,
                       tokenizer=tokenizer, prepared_s=time.perf_counter() - started)


def _options_fit(options: LoadOptions) -> bool:
    """Options under which the engine loads an fp32 or fp32-activation model on the CPU, or a bf16
    one whose replies are torch's forward (an exact image's)."""
    if options.device not in ("auto", "cpu") or not options.tuned or not options.native:
        return False
    if options.quantize not in (None, "int8", "int4"):
        return False
    dtype = pick_dtype(options.dtype, "cpu", options.quantize)
    from hyprstream_tui.engine.tuned.step_abi import ENV_SWITCH

    if dtype == "bfloat16":  # not the inexact fused bf16 step, nor a prompt upcast to fp32
        return (options.quantize is None and not prefill_fp32(options)
                and os.environ.get(ENV_SWITCH, "1") != "all")
    return dtype == "float32"


__all__ = ["ENV", "LightEngine", "engine_for"]
