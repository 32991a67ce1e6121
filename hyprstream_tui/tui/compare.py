"""Comparing two adapter commits without torch: their loss curves (metrics/steps.jsonl) and how
far each LoRA layer's weight change moved (||B2 A2 - B1 A1|| per module, numpy)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from numpy.typing import NDArray

_LAYER_RE = re.compile(r"(.*?)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def metric_curve(steps_jsonl: str | None) -> list[tuple[int, float, float | None]]:
    """(step, loss, lr) per line of metrics/steps.jsonl; unreadable lines are skipped."""
    out = []
    for line in (steps_jsonl or "").splitlines():
        try:
            row = json.loads(line)
            lr = row.get("lr")
            out.append((int(row["step"]), float(row["loss"]), float(lr) if lr is not None else None))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def loss_curve(steps_jsonl: str | None) -> list[tuple[int, float]]:
    return [(step, loss) for step, loss, _lr in metric_curve(steps_jsonl)]


@dataclass(frozen=True)
class LayerChange:
    module: str  # e.g. layers.0.self_attn.q_proj
    norm_a: float  # ||delta W|| at the first commit
    norm_b: float
    change: float  # ||delta W_b - delta W_a||


def _deltas(data: bytes | None) -> dict[str, NDArray]:
    """The weight change B @ A of each LoRA module in a safetensors file."""
    if not data:
        return {}
    from safetensors.numpy import load

    tensors = load(data)
    pairs: dict[str, dict[str, NDArray]] = {}
    for key, value in tensors.items():
        match = _LAYER_RE.match(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value.astype("float32")
    return {name: p["B"] @ p["A"] for name, p in pairs.items() if "A" in p and "B" in p}


def _short(module: str) -> str:
    """base_model.model.model.layers.3.self_attn.q_proj -> L3.q_proj"""
    for prefix in ("base_model.model.model.", "base_model.model."):
        if module.startswith(prefix):
            module = module[len(prefix):]
    parts = module.split(".")
    if len(parts) >= 3 and parts[0] == "layers" and parts[1].isdigit():
        return f"L{parts[1]}.{parts[-1]}"
    return module


def layer_changes(weights_a: bytes | None, weights_b: bytes | None, *, scale: float = 1.0) -> list[LayerChange]:
    import numpy as np

    a, b = _deltas(weights_a), _deltas(weights_b)
    out = []
    for name in sorted(set(a) | set(b), key=_natural):
        da, db = a.get(name), b.get(name)
        shape = (da if da is not None else b[name]).shape
        da = da if da is not None else np.zeros(shape, "float32")
        db = db if db is not None else np.zeros(shape, "float32")
        out.append(LayerChange(_short(name), float(np.linalg.norm(da)) * scale, float(np.linalg.norm(db)) * scale,
                               float(np.linalg.norm(db - da)) * scale))
    return out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
