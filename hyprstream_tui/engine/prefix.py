"""Reusing the KV cache of earlier requests: the prompt's longest prefix already computed.

Chat prompts start alike: SmolLM2's template puts the same default system prompt first, and a
chat re-sends its whole history each turn. After a single-stream request the engine keeps its KV
cache with the token ids it holds (prompt and the generated tokens that were fed back); the next
request on the same loaded model, in the same state, takes the cache that shares the longest
prefix with its prompt and prefills only the rest (at least the prompt's last token runs:
`generate.decode` computes the first logits from it).

An entry is tied to one `LoadedModel` object (a reloaded model is another object), its active
adapter by key and commit, and its load options (quantize scheme, dtype): another state never
reuses it. A folder adapter has no commit to vouch for its weights, so nothing is kept under one.
Entries are few and bounded in bytes (least recently used first out); a cache in use belongs to
its request alone (taken out, kept again when the request ends without an error).

Kinds of cache: the native decoder's `NativeCache` (per-layer tensors written in place plus a
`length`: n positions are reused by setting `length = n`, later ones are overwritten), and
transformers' `DynamicCache` with plain layers (sliced to n). Others are not kept.

Imports no torch: the caches arrive built.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

if TYPE_CHECKING:
    from hyprstream_tui.engine.loader import LoadedModel

MAX_ENTRIES = 4  # caches kept per engine (a few chats side by side)
MAX_BYTES = 512 << 20  # their tensors together; one larger than this is not kept


@dataclass(eq=False)
class Entry:
    owner: "weakref.ref[LoadedModel]"
    state: Hashable
    ids: list[int]  # the token id at each position the cache holds
    cache: Any
    nbytes: int


@dataclass(frozen=True)
class Taken:
    """What `PrefixCache.take` hands a request: a cache holding `reused` positions of its prompt
    (None: none reusable; start with an empty cache)."""

    cache: Any
    reused: int


class PrefixCache:
    """The engine's kept caches. Thread-safe; call `take` and `keep` under the model's lock (the
    adapter in use is part of the state)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max(0, max_entries)
        self.max_bytes = max(0, max_bytes)
        self._entries: list[Entry] = []  # least recently used first
        self._lock = threading.Lock()

    def take(self, lm: LoadedModel, ids: Sequence[int]) -> Taken:
        """The kept cache sharing the longest prefix with `ids` (at most all but its last token),
        cut to that prefix and taken out of the store; Taken(None, 0) when none shares any."""
        state = state_of(lm)
        if state is None or len(ids) < 2:
            return Taken(None, 0)
        with self._lock:
            self._purge()
            best, shared = None, 0
            for entry in self._entries:
                if entry.owner() is lm and entry.state == state:
                    n = common_prefix(entry.ids, ids)
                    if n > shared:
                        best, shared = entry, n
            if best is None:
                return Taken(None, 0)
            self._entries.remove(best)
        reused = min(shared, len(ids) - 1)
        if not truncate(best.cache, reused):
            return Taken(None, 0)
        return Taken(best.cache, reused)

    def keep(self, lm: LoadedModel, ids: Sequence[int], cache: Any) -> None:
        """Keep `cache` for later requests: it holds the first positions of `ids` (how many it
        says itself: generated tokens past the prompt may or may not have been written)."""
        state = state_of(lm)
        if state is None or self.max_entries == 0:
            return
        held = seq_length(cache)
        nbytes = size_of(cache)
        if held is None or held == 0 or held > len(ids) or nbytes is None or nbytes > self.max_bytes:
            return
        entry = Entry(owner=weakref.ref(lm), state=state, ids=[int(i) for i in ids[:held]],
                      cache=cache, nbytes=nbytes)
        with self._lock:
            self._purge()
            self._entries.append(entry)
            while len(self._entries) > self.max_entries or self.nbytes() > self.max_bytes:
                self._entries.pop(0)

    def forget(self, lm: LoadedModel | None = None) -> None:
        """Drop the entries of `lm` (every entry for None): an unloaded model's memory goes."""
        with self._lock:
            self._entries = [e for e in self._entries if lm is not None and e.owner() is not lm]

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def _purge(self) -> None:
        self._entries = [e for e in self._entries if e.owner() is not None]


def state_of(lm: LoadedModel) -> Hashable | None:
    """What must match for a cache to be reused on `lm`, besides the object itself: the active
    adapter (key and commit) and the load options. None: keep nothing (a folder adapter)."""
    if lm.active is None:
        return (None, None, lm.options)
    adapter = lm.adapters.get(lm.active)
    if adapter is None or adapter.commit is None:
        return None
    return (lm.active, adapter.commit, lm.options)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def seq_length(cache: Any) -> int | None:
    """Positions `cache` holds; None for a kind this module does not reuse."""
    if _native(cache):
        return int(cache.length)
    layers = _dynamic_layers(cache)
    if layers is None:
        return None
    return int(cache.get_seq_length())


def truncate(cache: Any, n: int) -> bool:
    """Make `cache` hold its first `n` positions only (False: it cannot)."""
    if _native(cache):
        if not 0 < n <= cache.length:
            return False
        cache.length = n  # later positions are overwritten in place by the next forward
        return True
    layers = _dynamic_layers(cache)
    if layers is None or not 0 < n <= cache.get_seq_length():
        return False
    for layer in layers:
        layer.keys = layer.keys[..., :n, :]
        layer.values = layer.values[..., :n, :]
    return True


def size_of(cache: Any) -> int | None:
    """Bytes the cache's tensors take (their whole capacity)."""
    if _native(cache):
        tensors = [t for t in (*cache.keys, *cache.values) if t is not None]
    else:
        layers = _dynamic_layers(cache)
        if layers is None:
            return None
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _native(cache: Any) -> bool:
    return type(cache).__name__ == "NativeCache" and isinstance(getattr(cache, "length", None), int)


def _dynamic_layers(cache: Any) -> list[Any] | None:
    """The layers of a transformers DynamicCache whose layers all keep every position (no
    sliding window, nothing offloaded); None otherwise."""
    if type(cache).__name__ != "DynamicCache":
        return None
    layers = list(getattr(cache, "layers", None) or [])
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    if any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    return layers


__all__ = ["MAX_BYTES", "MAX_ENTRIES", "PrefixCache", "Taken", "common_prefix", "state_of"]
