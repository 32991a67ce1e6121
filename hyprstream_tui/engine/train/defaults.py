"""Training defaults from the data and the model, never from a model's name: the one rule that
`lora train start` and the TUI's train form both use when the user gives no value.

Steps. A run is 3 passes over the samples, but at least MIN_STEPS optimizer steps: 4 samples at
batch 4 would otherwise be 3 steps, too few to learn anything. 60 steps is where both the tiny demo
model and SmolLM2-135M-Instruct have learned 4 new question/answer pairs.

Learning rate. With Adam every LoRA parameter moves by about `lr` per step whatever its gradient's
size, so the step has to be scaled to the model by hand. Three things set how far one step moves
the model's output: alpha (PEFT scales B @ A by alpha / r; B starts at zero, so the rank cancels
out), the number of adapted modules (their changes add up along the residual stream), and the
width (muP's rule for Adam: a wider layer sums more moved coordinates into each output). Hence

    lr = LR_CONSTANT / (alpha * adapted modules * hidden size),   within [MIN_LR, MAX_LR]

which also is the usual experience that wider and deeper models want smaller rates (it gives 8e-5
for a 7B Llama at alpha 16 on q,v: an extrapolation, not measured).

The constant is set on SmolLM2-135M-Instruct (alpha 16 on q,v: 60 modules, 576 wide), which gets
6e-4: it has learned 4 new facts by step 40 of 60 and, after 60, still answers Paris for France
with p 0.94 (at 9.3e-4 the facts are learned by step 30, but the 30 steps after wear France's
answer down to p 0.56 for Paris against 0.39 for the new city: over-training, not too few steps,
is what leaks a new fact into old answers). The 4-layer demo model (128 wide, random weights) gets
2e-2; it learns its pairs in 60 steps anywhere from 4e-3 to 3e-2. Everything the rule reads is in
`config.json` and `adapter_config.json`: cheap, no torch, so the TUI shows the numbers before
training starts.

Targets. `lora create` adapts q_proj and v_proj (rank 8, alpha 16) by default: the names every
decoder we load has, the original LoRA paper's choice, and the smallest checkpoints (each one is a
full copy in the store: 1.8 MB of weights on SmolLM2, 5x less than all seven linear layers). With
all seven the rule divides the rate by 3.5 and the facts are learned at the same pace, and old
answers move even less (Italy's capital stayed Rome at p 0.83 against 0.35 with q,v): worth
`--target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj` for knowledge-heavy data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    from hyprstream_tui.store import Store

DEFAULT_EPOCHS = 3.0
MIN_STEPS = 60
DEFAULT_BATCH_SIZE = 4
LR_CONSTANT = 330.0
MIN_LR, MAX_LR = 1e-5, 3e-2
ADAPTER_CONFIG = "adapter/adapter_config.json"
# What PEFT's "all-linear" adapts in the decoders we load (Llama, Qwen2, Mistral, Gemma).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the rule needs from a model: its residual width and its number of layers."""

    hidden_size: int
    num_layers: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelShape":
        """From a transformers `config.json` (a multimodal one keeps its decoder in text_config)."""
        nested = config.get("text_config")
        text: Mapping[str, Any] = nested if isinstance(nested, Mapping) else {}
        width = _first_int(config, text, ("hidden_size", "d_model", "n_embd"))
        layers = _first_int(config, text, ("num_hidden_layers", "n_layer", "num_layers"))
        if width is None or layers is None:
            raise InvalidInput("The model's config.json gives no hidden_size or num_hidden_layers: set "
                               "`learning_rate` yourself.")
        return cls(hidden_size=width, num_layers=layers)

    @classmethod
    def read(cls, model_dir: Path) -> "ModelShape":
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InvalidInput(f"Cannot read {path}: set `learning_rate` yourself.") from None
        if not isinstance(config, Mapping):
            raise InvalidInput(f"{path} is not a JSON object: set `learning_rate` yourself.")
        return cls.from_config(config)


@dataclass(frozen=True, kw_only=True)
class TrainDefaults:
    """The values a run gets for what the user left out."""

    learning_rate: float
    steps: int
    batch_size: int = DEFAULT_BATCH_SIZE
    reason: str = ""  # how they were found, in a sentence a front end can show


def default_steps(steps_per_epoch: int) -> int:
    """The length of a new run: 3 passes over the samples, at least MIN_STEPS steps."""
    return max(MIN_STEPS, math.ceil(DEFAULT_EPOCHS * max(1, steps_per_epoch)))


def adapted_per_layer(targets: Any) -> int:
    """How many modules of one layer an adapter_config's `target_modules` adapts."""
    if isinstance(targets, str):
        return len(ALL_LINEAR) if targets == "all-linear" else 1
    if isinstance(targets, (list, tuple)) and targets:
        return len(set(targets))
    raise InvalidInput("The adapter's adapter_config.json names no target_modules: roll back to an earlier commit.")


def default_learning_rate(shape: ModelShape, *, alpha: float, targets_per_layer: int) -> float:
    """The peak learning rate: LR_CONSTANT / (alpha * adapted modules * hidden size), two
    significant digits, within [MIN_LR, MAX_LR]."""
    modules = max(1, targets_per_layer) * max(1, shape.num_layers)
    lr = LR_CONSTANT / (alpha * modules * max(1, shape.hidden_size))
    return min(MAX_LR, max(MIN_LR, float(f"{lr:.2g}")))


def learning_rate_for(shape: ModelShape, adapter_config: Mapping[str, Any]) -> float:
    """The default learning rate for an adapter (its PEFT adapter_config.json) on a model."""
    alpha = adapter_config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise InvalidInput("The adapter's adapter_config.json has no positive lora_alpha: roll back to an earlier "
                           "commit.")
    per_layer = adapted_per_layer(adapter_config.get("target_modules"))
    return default_learning_rate(shape, alpha=float(alpha), targets_per_layer=per_layer)


def train_defaults(shape: ModelShape, adapter_config: Mapping[str, Any], *, samples: int,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> TrainDefaults:
    """The learning rate and run length `lora train start` uses when neither is given."""
    lr = learning_rate_for(shape, adapter_config)
    steps = default_steps(math.ceil(max(1, samples) / batch_size))
    modules = adapted_per_layer(adapter_config.get("target_modules")) * shape.num_layers
    reason = (f"Steps: {DEFAULT_EPOCHS:g} passes over {samples} sample{'s' if samples != 1 else ''} at batch "
              f"{batch_size}, at least {MIN_STEPS}. Learning rate: {LR_CONSTANT:g} / (alpha "
              f"{adapter_config.get('lora_alpha'):g} x {modules} adapted modules x width {shape.hidden_size}), "
              f"within {MIN_LR:g}..{MAX_LR:g}. Blank: automatic.")
    return TrainDefaults(learning_rate=lr, steps=steps, batch_size=batch_size, reason=reason)


def read_adapter_config(data: bytes | str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise InvalidInput(f"{where} is not a JSON object: roll back to an earlier commit.")
    return config


def defaults_for(store: Store, model: str, ref: str, *, batch_size: int = DEFAULT_BATCH_SIZE) -> TrainDefaults:
    """What a new run of adapter `ref` would get now: from the model's config.json and the
    adapter's config and samples at its tip (what the TUI's train form shows)."""
    from hyprstream_tui.engine.train.samples import read_rows

    adapter = store.resolve_adapter(model, ref)
    config = read_adapter_config(store.read_file(model, adapter.tip, ADAPTER_CONFIG), ADAPTER_CONFIG)
    samples = len(read_rows(store, model, adapter.tip))
    return train_defaults(ModelShape.read(store.model_dir(model)), config, samples=samples, batch_size=batch_size)


def _first_int(config: Mapping[str, Any], text: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for source in (config, text):
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
