"""The single-stream generation loop, whatever runs the model: a prompt's logits, then one token at a
time until the sequence ends.

`generate.decode` runs it over torch's model classes (or the fused C step through torch tensors),
`light.LightEngine` over a step image without torch; both through the same `SequenceState`
(sampling, detokenising, stops), so a reply is the same text on either. Logits are whatever
`SequenceState.pick` takes (a torch tensor or a numpy array, [V]).

Standard library only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

if TYPE_CHECKING:
    from hyprstream_tui.engine.sequence import SequenceState


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class NeverCancel:
    def is_set(self) -> bool:
        return False


def run(seq: "SequenceState", prompt: Callable[[], Any], step: Callable[[int, int], Any], *,
        cancel: CancelToken = NeverCancel()) -> Iterator[str]:
    """Yield, after every accepted token, the text it released (often ""), and at the end the tail
    (when not empty). `prompt()`: the logits after the prompt's last token; `step(token, position)`:
    the logits after `token` at `position`. The time to the first pick counts as the prompt's
    (`seq.prefill_s`), the rest as decoding (`seq.decode_s`)."""
    started = time.perf_counter()
    logits = prompt()
    first = True
    while True:
        next_id = seq.pick(logits)
        elapsed = time.perf_counter() - started
        if first:
            seq.prefill_s += elapsed
        else:
            seq.decode_s += elapsed
        first = False
        yield seq.accept(next_id)
        if cancel.is_set():
            seq.cancel()
        if seq.finish_reason is not None:
            break
        started = time.perf_counter()
        logits = step(next_id, seq.position)
    tail = seq.tail()
    if tail:
        yield tail


__all__ = ["CancelToken", "NeverCancel", "run"]
