"""Stop strings: text is held back while it could still be the start of a stop string.

A stop string is never emitted, even when the model produces it across several tokens; text
before it is emitted as soon as it can no longer be part of one.
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """push(text) -> text safe to emit; `.matched` is set once a stop string completes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.matched: str | None = None
        self._held = ""

    def push(self, text: str) -> str:
        if self.matched is not None:
            return ""
        buffer = self._held + text
        hit = self._earliest_stop(buffer)
        if hit is not None:
            index, stop = hit
            self.matched, self._held = stop, ""
            return buffer[:index]
        keep = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back is ordinary text after all."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _earliest_stop(self, buffer: str) -> tuple[int, str] | None:
        """The stop string that completes first (ties: the one that starts first), and its index.

        Ordering by where a match ends, not where it starts, makes the result the same however
        the text arrives: streaming never sees past the first completed stop string.
        """
        found = [(i + len(s), i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if not found:
            return None
        _end, index, stop = min(found)
        return index, stop

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
