"""Incremental detokenisation that never emits part of a UTF-8 character.

Byte-level BPE tokens can end in the middle of a character (an emoji is often 2-4 tokens).
Decoding a window of recent tokens and emitting only what extends the previous decode, and only
once it no longer ends in U+FFFD, gives text deltas that concatenate to the full decode.
(The offsets scheme of text-generation-inference / vLLM.)
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """push(token) -> new text (possibly ""); flush() -> what is held back at the end."""

    def __init__(self, decode: Decode, *, context: Sequence[int] = ()) -> None:
        # `context`: a few prompt tokens, so tokenizers that decode a leading space differently at
        # the start of a sequence (SentencePiece) produce the same text as in the middle.
        self._decode = decode
        self._ids: list[int] = list(context)[-4:]
        self._prefix = 0  # start of the window decoded last time
        self._read = len(self._ids)  # end of what has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if new_text.endswith(REPLACEMENT) or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing visible yet): wait for more bytes
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held (an incomplete character decodes as U+FFFD here)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
