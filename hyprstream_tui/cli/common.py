"""What the verb families share: the store from `--home`, JSON and console output, adapter lookup,
and how the CLI names a setting an error is about (its flag).

Light at import: rich, the store, json, dataclasses and pathlib load inside the functions that use
them (tests/cli/test_startup.py keeps `hyprstream --help` free of them).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from hyprstream_tui.store.store import Store
    from hyprstream_tui.store.types import AdapterInfo


def store_from(args: argparse.Namespace) -> Store:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(args.home))


def print_json(value: Any) -> None:
    import dataclasses
    import json
    from pathlib import Path

    def default(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(type(obj).__name__)

    print(json.dumps(value, default=default, indent=2, ensure_ascii=False))


def console() -> Console:
    from rich.console import Console

    return Console(highlight=False)


def path_arg(text: str) -> Path:
    """argparse `type=` for a path: pathlib loads when a path is given, not for `--help`."""
    from pathlib import Path

    return Path(text)


def flag(setting: str) -> str:
    """The CLI's name for a setting an error names (errors.py): `learning_rate` -> `--learning-rate`."""
    return "--" + setting.replace("_", "-")


def adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("--model", help="the base model, when the adapter name is not unique")


def split_adapter_spec(spec: str) -> tuple[str | None, str]:
    """`model:adapter` -> (model, adapter); a bare name -> (None, name)."""
    if ":" in spec:
        model, _, adapter = spec.partition(":")
        return model, adapter
    return None, spec


def find_adapter(store: Store, spec: str, model: str | None = None) -> AdapterInfo:
    """Resolve an adapter given as `model:adapter`, or a name unique across all models."""
    from hyprstream_tui.errors import InvalidInput, NotFound

    spec_model, ref = split_adapter_spec(spec)
    model = spec_model if spec_model is not None else model
    if model is not None:  # given, even empty: the store says what is wrong with it
        return store.resolve_adapter(model, ref)
    matches = []
    for summary in store.list_models():
        try:
            matches.append(store.resolve_adapter(summary.name, ref))
        except NotFound:
            continue
    if not matches:
        raise NotFound(f"No adapter {ref!r} in any model: see `hyprstream lora list`.")
    if len(matches) > 1:
        models = ", ".join(m.model for m in matches)
        raise InvalidInput(f"Adapter {ref!r} exists in several models ({models}): write it as MODEL:{ref}.")
    return matches[0]
