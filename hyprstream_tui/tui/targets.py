"""Chat targets as text: `MODEL[:ADAPTER[@REV]]` specs and the short labels replies carry."""

from __future__ import annotations


def spec_of(model: str, adapter: str | None, rev: str | None) -> str:
    return model + (f":{adapter}" if adapter else "") + (f"@{rev}" if adapter and rev else "")


def label_of(spec: str) -> str:
    model, _, rest = spec.partition(":")
    if not rest:
        return f"{model} (base)"
    adapter, _, rev = rest.partition("@")
    return f"{adapter}@{rev[:7]}" if rev else adapter
