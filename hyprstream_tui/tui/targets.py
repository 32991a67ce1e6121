"""Chat targets: what can answer (`ChatTargets`), `MODEL[:ADAPTER[@REV]]` specs, and the short
labels replies carry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ChatTargets:
    """What can answer a chat: the models, the chosen one, its adapters and those of them without
    trained weights, and its context window (0 when unknown)."""

    models: tuple[str, ...]
    model: str | None
    adapters: tuple[str, ...]
    untrained: frozenset[str]
    window: int


def spec_of(model: str, adapter: str | None, rev: str | None) -> str:
    return model + (f":{adapter}" if adapter else "") + (f"@{rev}" if adapter and rev else "")


def label_of(spec: str) -> str:
    model, _, rest = spec.partition(":")
    if not rest:
        return f"{model} (base)"
    adapter, _, rev = rest.partition("@")
    return f"{adapter}@{rev[:7]}" if rev else adapter
