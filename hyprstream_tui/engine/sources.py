"""`MODEL[:ADAPTER[@REV]]`: parsing, and resolving it to folders and commits.

MODEL is a store name, or a folder path (anything with a '/' or starting with '.' or '~').
ADAPTER is an adapter name, uuid, tag (`name/label`) or commit in the store, or an adapter folder
path (starting with '/', '.' or '~'). REV is a tag label, commit or `step:N` of that adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hyprstream_tui.engine.loader import AdapterSource, ModelSource
from hyprstream_tui.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from hyprstream_tui.store import Store


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    model: str
    adapter: str | None = None
    rev: str | None = None

    def __str__(self) -> str:
        text = self.model
        if self.adapter:
            text += f":{self.adapter}"
        if self.rev:
            text += f"@{self.rev}"
        return text


def parse_spec(spec: str) -> ModelSpec:
    """Split `model[:adapter[@rev]]`; one place, so every interface reads it the same way."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInput("No model given: name one as MODEL[:ADAPTER[@REV]].")
    if not spec.isprintable():  # a newline, NUL, RTL override or zero-width character: not a name
        raise InvalidInput(f"The model {spec[:60]!r} holds a control or invisible character: write it as "
                           "MODEL[:ADAPTER[@REV]].")
    model, sep, rest = spec.strip().partition(":")
    adapter, at, rev = rest.partition("@") if not is_adapter_path(rest) else (rest, "", "")
    if not model or (sep and not adapter) or (at and not rev):
        raise InvalidInput(f"Cannot read {spec!r}: write it as MODEL[:ADAPTER[@REV]].")
    return ModelSpec(model=model, adapter=adapter or None, rev=rev or None)


def is_path(text: str) -> bool:
    """A model given as a folder (store names never contain '/')."""
    return "/" in text or text.startswith((".", "~"))


def is_adapter_path(text: str) -> bool:
    """An adapter given as a folder; `poet/v1` is a tag, not a path."""
    return text.startswith(("/", ".", "~"))


def resolve_source(spec: str | ModelSpec, store: Store | None = None) -> ModelSource:
    """Folders and commits for `spec`; unknown models and adapters raise NotFound."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if is_path(spec.model):
        path = _folder(spec.model, "model")
        model = ModelSource(name=path.name, path=path, commit=None)
    else:
        store = store if store is not None else _default_store()
        model = ModelSource(
            name=spec.model, path=store.model_dir(spec.model), commit=store.head(spec.model),
            cache=store.paths.cache,
        )
    if spec.adapter is None:
        return model
    if is_adapter_path(spec.adapter):
        path = _folder(spec.adapter, "adapter")
        adapter = AdapterSource(name=path.name, path=path, commit=None)
    elif store is None:
        raise InvalidInput(
            f"The model {spec.model!r} is a folder: give its adapter as a folder path too."
        )
    else:
        info = store.resolve_adapter(spec.model, spec.adapter, spec.rev)
        path = store.snapshot(spec.model, info.tip, subdir="adapter")
        adapter = AdapterSource(name=info.name, path=path, commit=info.tip)
    return dataclasses.replace(model, adapter=adapter)


def _folder(text: str, what: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        raise NotFound(f"No {what} folder at {str(path)!r}.")
    return path


def _default_store() -> Store:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env())
