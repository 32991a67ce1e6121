"""LoRA adapters on a loaded base model: load once, switch in about a millisecond.

Loads with transformers' PEFT integration (`load_adapter`, which injects LoRA layers into the
model in place) and switches with PEFT's tuner layers directly (transformers' own `set_adapter`
wants a newer PEFT), so the model object stays the same and the base weights are never
reloaded. Callers hold the model's lock: the active adapter is state shared by every generation
on that model.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from hyprstream_tui.engine.loader import AdapterSource, LoadedModel, LoadOptions

MAX_ADAPTERS = 8  # adapters kept attached to one base model; the least recently used goes


def switch(lm: "LoadedModel", adapter: "AdapterSource | None") -> None:
    """Make `adapter` (or the base model, for None) the one that answers."""
    if adapter is None:
        if lm.active is not None:
            _activate(lm.model, None)
            lm.active = None
        return
    if adapter.key not in lm.adapters:
        _attach(lm, adapter)
    else:  # most recently used last
        lm.adapters[adapter.key] = lm.adapters.pop(adapter.key)
    if lm.active != adapter.key:
        _activate(lm.model, adapter.key)
        lm.active = adapter.key


def _tuner_layers(model: "torch.nn.Module") -> list["BaseTunerLayer"]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _activate(model: "torch.nn.Module", key: str | None) -> None:
    """Route every LoRA layer through adapter `key`, or around all adapters for None."""
    for layer in _tuner_layers(model):
        if key is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(key)
            # every tuner layer is an nn.Module; peft's BaseTunerLayer mixin does not declare it
            layer.requires_grad_(False)  # type: ignore[attr-defined]


def _detach(model: "torch.nn.Module", key: str) -> None:
    for layer in _tuner_layers(model):
        layer.delete_adapter(key)
    getattr(model, "peft_config", {}).pop(key, None)


def check_adapter(options: "LoadOptions", adapter: "AdapterSource") -> None:
    """What attaching `adapter` under `options` would refuse, found before its base model loads (a
    refused request leaves nothing behind: no load, no cache entry a load writes)."""
    from hyprstream_tui.store.inspect import check_weights

    if options.quantize:
        raise InvalidInput(
            f"Adapters do not combine with `quantize` {options.quantize} yet: leave `quantize` out to use an adapter."
        )
    if not check_weights(adapter.path, allow_pickle=False, what="adapter"):  # pragma: no cover
        raise InvalidInput("Adapters load from safetensors only.")
    _check_config(adapter)


def _attach(lm: "LoadedModel", adapter: "AdapterSource") -> None:
    check_adapter(lm.options, adapter)
    while len(lm.adapters) >= MAX_ADAPTERS:
        oldest = next(iter(lm.adapters))
        if oldest == lm.active:
            _activate(lm.model, None)
            lm.active = None
        _detach(lm.model, oldest)
        del lm.adapters[oldest]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm.model.load_adapter(str(adapter.path), adapter_name=adapter.key)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise InvalidInput(
            f"The adapter {adapter.name!r} does not fit this model: {str(exc).splitlines()[0]}"
        ) from None
    except Exception as exc:  # a malformed adapter_config.json breaks PEFT anywhere (TypeError...)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise InvalidInput(f"The adapter {adapter.name!r} has malformed files: {type(exc).__name__}: {text}") from None
    lm.adapters[adapter.key] = adapter
    lm.model.eval().requires_grad_(False)
    _activate(lm.model, lm.active)  # loading made the new adapter active: restore


def _check_config(adapter: "AdapterSource") -> None:
    path = adapter.path / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise InvalidInput(
            f"The adapter {adapter.name!r} has no readable adapter_config.json in "
            f"{str(adapter.path)!r}."
        ) from None
    if not isinstance(config, dict):
        raise InvalidInput(f"The adapter {adapter.name!r} has an adapter_config.json that is not a JSON object.")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidInput(f"The adapter {adapter.name!r} is {config.get('peft_type')}, not LoRA.")
