"""Hand-offs from worker threads to the UI that never flood the event loop.

A worker thread pushes as fast as it likes; a UI timer drains a few times a second and makes one
update per widget per tick. `Buffer` keeps every item (token text, loss points); `Latest` keeps only
the newest (progress of a download).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")
UI_HZ = 8  # updates per second per widget, at most
TYPING_HZ = 1  # how often a streaming reply is redrawn while the user types: right after a key's frame
TYPING_S = 0.5  # "types": a key within this many seconds
IDLE_S = 1.0  # no key for this long: the user is not typing (a full collection may run)


class Buffer(Generic[T]):
    def __init__(self) -> None:
        self._items: list[T] = []
        self._lock = threading.Lock()

    def push(self, item: T) -> None:
        with self._lock:
            self._items.append(item)

    def drain(self) -> list[T]:
        with self._lock:
            items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class Latest(Generic[T]):
    def __init__(self) -> None:
        self._value: T | None = None  # None: nothing new since the last take
        self._lock = threading.Lock()

    def set(self, value: T) -> None:
        with self._lock:
            self._value = value

    def take(self) -> T | None:
        with self._lock:
            value, self._value = self._value, None
        return value
