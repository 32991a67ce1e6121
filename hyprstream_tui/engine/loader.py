"""Loading models and adapters safely: safetensors only, no remote code, a sensible dtype.

A `ModelSource` says where the weights are (a store model or a plain folder) and which commit
they come from; `load_model` turns it into a `LoadedModel` (model + tokenizer + facts).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hyprstream_tui.engine.cpu import cpu_has_bf16, usable_cores
from hyprstream_tui.errors import InvalidInput, NotFound
from hyprstream_tui.store.inspect import check_weights

if TYPE_CHECKING:  # transformers loads on first use: `hyprstream --help` must not pay for it
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from typing import TypeAlias

    from hyprstream_tui.engine.native.model import NativeConfig, NativeForCausalLM
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer

    # What the engine decodes with: transformers' classes, or ours (`engine.native`)
    Model: TypeAlias = PreTrainedModel | NativeForCausalLM
    Tokenizer: TypeAlias = PreTrainedTokenizerBase | NativeTokenizer

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZE = (None, "int8", "int4")


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How to load: dtype/device "auto" pick what runs fastest here; quantize None, "int8" or "int4"."""

    dtype: str = "auto"
    device: str = "auto"
    quantize: str | None = None
    allow_pickle: bool = False
    # bf16 prompts through fp32 BLAS (None: where the CPU lacks native bf16). About 4x faster
    # prefill there; results differ from the bf16 kernel by bf16 rounding.
    prefill_fp32: bool | None = None
    # The machine-tuned code of `engine.tuned` (shape-picked kernels, the native bf16 kernel, the
    # lean decode step). False: torch's and transformers' own paths, for comparisons.
    tuned: bool = True
    # Our own decoder classes and tokenizer (`engine.native`) where they cover the model, on the
    # CPU: no transformers import on the way to the first token. False: transformers' classes.
    native: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInput(f"Unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}.")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise InvalidInput(f"Unknown device {self.device!r}: use auto, cpu, cuda or cuda:N.")
        if self.quantize not in QUANTIZE:
            raise InvalidInput(f"Unknown quantization {self.quantize!r}: use int8, int4 or leave it out.")


@dataclass(frozen=True, kw_only=True)
class AdapterSource:
    name: str
    path: Path  # a folder with adapter_config.json + adapter_model.safetensors
    commit: str | None = None

    @property
    def key(self) -> str:
        """The PEFT adapter name: unique per name and commit, safe as a module attribute."""
        tag = (self.commit or str(abs(hash(str(self.path)))))[:12]
        return "a_" + "".join(c if c.isalnum() else "_" for c in f"{self.name}_{tag}")


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    name: str
    path: Path  # the model folder: config.json, tokenizer files, *.safetensors
    commit: str | None = None
    adapter: AdapterSource | None = None
    cache: Path | None = None  # the home's cache folder (quantized weights); None: nothing cached


@dataclass(kw_only=True, eq=False)
class LoadedModel:
    """A model in memory. Hold `lock` while generating or switching adapters."""

    source: ModelSource
    options: LoadOptions
    model: Model  # eval mode, no grad; LoRA layers injected in place by `use_adapter`
    tokenizer: Tokenizer
    dtype: str
    device: str
    window: int
    eos_ids: frozenset[int]
    load_s: float
    quant_cache: str | None = None  # "hit", "made" (written for the next load), or None: not cached
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, AdapterSource] = field(default_factory=dict)  # PEFT key -> source
    active: str | None = None  # PEFT key of the adapter in use, None for the base model
    # work for after the model's first reply (its exact image: `_save_exact_image`), which the
    # engine starts then: a request refused after the load leaves nothing behind
    after_first_reply: Callable[[], object] | None = None
    # an int8 copy of its weights that guesses tokens for it to check (engine/speculate.py)
    draft: Any = None

    def use_adapter(self, adapter: AdapterSource | None) -> None:
        """Switch to `adapter` (loading it once) or back to the base model. Call under `lock`."""
        from hyprstream_tui.engine import adapters

        adapters.switch(self, adapter)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("CUDA was asked for but no GPU is available: set `device` to cpu.")
    return device


def pick_dtype(dtype: str, device: str, quantize: str | None) -> str:
    """The dtype a load runs in (torch imported only to ask a CUDA device)."""
    if quantize:  # fp32 activations unless bf16/fp16 are asked for
        return dtype if dtype in ("bfloat16", "float16") else "float32"
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def prefill_fp32(options: LoadOptions) -> bool:
    return options.prefill_fp32 if options.prefill_fp32 is not None else not cpu_has_bf16()


def quiet_transformers() -> None:
    """No progress bars or warnings on stderr: the TUI owns the terminal."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        # Files that load but break every encode (model_max_length: [], ...) fail here, not mid-chat.
        tokenizer.decode(tokenizer.encode("Hello, world!", add_special_tokens=False))
        return tokenizer
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"Cannot load the tokenizer in {str(path)!r}: {exc}") from None
    except Exception as exc:  # malformed tokenizer files break transformers anywhere (AttributeError, TypeError...)
        raise InvalidInput(f"Cannot load the tokenizer in {str(path)!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def load_model(source: ModelSource, options: LoadOptions = LoadOptions(), *, images: bool = True) -> LoadedModel:
    """Read the weights, tokenizer and facts of `source` (its adapter is attached later).
    images: write what a later command without torch reads (a step image; not for a draft)."""
    started = time.perf_counter()
    use_safetensors = check_weights(source.path, allow_pickle=options.allow_pickle)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device, options.quantize)
    if options.quantize and device != "cpu":
        raise InvalidInput(
            f"`quantize` {options.quantize} runs on the CPU only: leave `quantize` out or set `device` to cpu."
        )
    model: Model | None = None
    tokenizer: Tokenizer | None = None
    quant_cache: str | None = None
    if options.native and device == "cpu" and use_safetensors:
        # Quantizing: the checkpoint's own dtype, mapped, so that weights the cache holds are never read.
        model, tokenizer = _load_native(source, dtype=None if options.quantize else dtype)
    if model is None:
        model = _load_transformers(source, options, dtype, use_safetensors)
    model.eval().requires_grad_(False)
    cache_key: str | None = None
    if options.quantize:
        quant_cache, cache_key = _quantize(model, source, dtype, options.quantize)
    elif not options.tuned or device != "cpu":
        pass  # torch's own kernels
    elif dtype == "bfloat16" and prefill_fp32(options):
        from hyprstream_tui.engine.tuned.kernels import upcast_prefill

        upcast_prefill(model)
    elif dtype == "bfloat16":
        from hyprstream_tui.engine.tuned.kernels import native_gemv

        native_gemv(model)
    elif dtype == "float32":
        from hyprstream_tui.engine.tuned.kernels import rows_first

        rows_first(model)
    model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) types `self` as the first argument
    if tokenizer is None:
        tokenizer = load_tokenizer(source.path)
    lm = LoadedModel(
        source=source,
        options=options,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        window=context_window(model.config, tokenizer),
        eos_ids=eos_token_ids(model, tokenizer),
        load_s=time.perf_counter() - started,
        quant_cache=quant_cache,
    )
    if images and options.tuned and device == "cpu" and (cache_key is not None or dtype == "float32"):
        _save_image(lm, cache_key)
    if options.tuned and device == "cpu" and dtype == "bfloat16":
        _name_pack_cache(lm)
        if options.quantize is None and not prefill_fp32(options):  # else the replies are not torch's bf16 forward
            _save_exact_image(lm)
    return lm


def _name_pack_cache(lm: LoadedModel) -> None:
    """Where the fused step's exact bf16 mode keeps this model's packed rows (`tuned.exact`): an
    entry of the home's weight cache per model commit, made by the first load that packs them."""
    from hyprstream_tui.engine import native
    from hyprstream_tui.engine.tuned import exact, quant_cache

    source = lm.source
    if source.cache is None or source.commit is None or not getattr(lm.model, "native", False):
        return
    try:
        name = quant_cache.key(source.path, source.commit, exact.SCHEME, native.checkpoint_files(source.path))
    except (OSError, native.Unsupported):
        return
    setattr(lm.model, "hs_pack_cache", (source.cache, name))  # a plain attribute, as hs_bf16_weight
    setattr(lm.model, "hs_pack_about", {"model": source.name, "commit": source.commit})  # for `cache list`


def _save_image(lm: LoadedModel, key: str | None) -> None:
    """What a later command without torch needs to give this model's replies (`engine.light`):
    its step image, under the quantized cache's `key` or, for an fp32 model, the same kind of key
    for scheme float32. Nothing for a model outside the store or one the fused step does not run."""
    from hyprstream_tui.engine import native
    from hyprstream_tui.engine.tuned import quant_cache, step_image

    source, quantize = lm.source, lm.options.quantize
    if source.cache is None or source.commit is None or not getattr(lm.model, "native", False):
        return
    try:
        files = native.checkpoint_files(source.path)
        if key is None:
            key = quant_cache.key(source.path, source.commit, step_image.scheme(quantize), files)
    except (OSError, native.Unsupported):
        return
    step_image.save(lm.model, source.cache, key, step_image.Facts(
        dtype=lm.dtype, window=lm.window, eos_ids=tuple(sorted(lm.eos_ids)), quantize=quantize),
        about={"model": source.name, "commit": source.commit}, files=files)


def _save_exact_image(lm: LoadedModel) -> None:
    """What a later command without torch needs to give this bf16 model's replies (`engine.light`,
    `tuned.exact_image`), once per model commit, written in the background after its first reply;
    nothing for a model outside the store."""
    from hyprstream_tui.engine import native
    from hyprstream_tui.engine.tuned import exact_image, quant_cache

    source = lm.source
    if source.cache is None or source.commit is None or not getattr(lm.model, "native", False):
        return
    try:
        files = native.checkpoint_files(source.path)
        key = quant_cache.key(source.path, source.commit, exact_image.SCHEME, files)
    except (OSError, native.Unsupported):
        return
    packed = getattr(lm.model, "hs_pack_cache", (None, None))[1]  # the exact step's packed rows (`_name_pack_cache`)
    lm.after_first_reply = functools.partial(
        exact_image.save_soon, lm.model, source.cache, key,
        exact_image.Facts(dtype=lm.dtype, window=lm.window, eos_ids=tuple(sorted(lm.eos_ids))),
        {"model": source.name, "commit": source.commit}, files, packed)


def _quantize(model: Model, source: ModelSource, dtype: str, quantize: str) -> tuple[str | None, str | None]:
    """Quantize `model` in place to `quantize` (int8 or int4), through the home's cache of
    quantized weights where `source` is a store model (a commit): "hit", "made" or None (not
    cached), and the cache entry's name (None: not cached)."""
    from hyprstream_tui.engine import native
    from hyprstream_tui.engine.tuned import quant_cache
    from hyprstream_tui.engine.tuned.quantize import Packs, quantize_int8

    scheme = quantize
    if quantize == "int4":
        from hyprstream_tui.engine.tuned import quantize_int4

        scheme = quantize_int4.scheme()  # the group size in the key: another size, other weights
    name = None
    if source.cache is not None and source.commit is not None:
        try:
            name = quant_cache.key(source.path, source.commit, scheme, native.checkpoint_files(source.path))
        except (OSError, native.Unsupported):
            name = None
    packs = Packs(quant_cache.read(source.cache, name) if source.cache is not None and name else None)
    if quantize == "int4":
        quantize_int4.quantize_int4(model, dtype=dtype, packs=packs)
    else:
        quantize_int8(model, dtype=dtype, packs=packs)
    if source.cache is None or name is None:
        return None, None
    if not packs.made:
        return "hit", name
    quant_cache.write(source.cache, name, packs.tensors(),
                      about={"model": source.name, "commit": source.commit or "", "scheme": scheme})
    return "made", name


def _load_native(source: ModelSource, *, dtype: str | None
                 ) -> tuple[NativeForCausalLM | None, NativeTokenizer | None]:
    """Our decoder and tokenizer for `source` (weights in `dtype`, None: as stored), or
    (None, None) where transformers must load it."""
    import torch

    from hyprstream_tui.engine import native

    try:
        return native.load(source.path, None if dtype is None else getattr(torch, dtype))
    except native.Unsupported as exc:
        log.info("%s loads through transformers: %s", source.name, exc)
        return None, None


def _load_transformers(source: ModelSource, options: LoadOptions, dtype: str,
                       use_safetensors: bool) -> PreTrainedModel:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(
                str(source.path),
                config=config,
                dtype=getattr(torch, "bfloat16" if options.quantize else dtype),
                use_safetensors=use_safetensors,
                trust_remote_code=False,
                local_files_only=True,
            )
    except ValueError as exc:
        raise InvalidInput(f"Cannot load {source.name!r}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise NotFound(f"Cannot read {source.name!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # a malformed config.json breaks transformers anywhere (TypeError, KeyError...)
        raise InvalidInput(f"Cannot load {source.name!r}, its files are malformed: {_first_line(exc)}") from None


def context_window(config: PretrainedConfig | NativeConfig, tokenizer: Tokenizer) -> int:
    window = getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
    return int(window)


def eos_token_ids(model: Model, tokenizer: Tokenizer) -> frozenset[int]:
    """Every id that ends a reply: generation_config's eos ids plus the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def set_threads(n: int | None) -> None:
    """Use `n` CPU threads for torch (default: the cores this process may use)."""
    import torch

    if n is None:
        n = usable_cores()
    torch.set_num_threads(max(1, n))
