"""Our own prefill + decode loop over a KV cache, and the text stream built on it.

Shape of a step (batch 1): prefill runs the whole prompt once and computes the output layer for
the last position only; each decode step feeds one token at its position and reuses the cache.
Positions come from one preallocated arange. With `tuned` (LoadOptions.tuned, the default),
the prompt and the decode steps go through `tuned.step.FusedStep` (the whole model in one C call:
the engine's own classes with int8/int4 weights), else decode steps go through `tuned.lean.LeanDecoder` (the model's own layers over a
preallocated cache, without transformers' per-step glue) where the architecture allows, else
through `model(...)`.

The per-request state (sampling, detokenising, stop strings, how it ended) is
`sequence.SequenceState`, which the batch scheduler decodes with too.

Imports torch at module level: the engine imports this module lazily, in its worker threads.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator, Protocol

import torch

from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.tuned.lean import LeanDecoder
from hyprstream_tui.engine.tuned.step import FusedStep

if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig

    from hyprstream_tui.engine.native.model import NativeCache



class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class NeverCancel:
    def is_set(self) -> bool:
        return False


def new_cache(model: torch.nn.Module) -> "Cache | NativeCache":
    """An empty KV cache laid out for `model`: its own (`engine.native`), or transformers' with
    sliding-window layers included."""
    own = getattr(model, "new_cache", None)
    if own is not None:
        cache: NativeCache = own()
        return cache
    from transformers import DynamicCache

    config: PretrainedConfig = model.config  # type: ignore[assignment]  # nn.Module's __getattr__ is untyped
    return DynamicCache(config=config)


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
            cache: "Cache | NativeCache") -> torch.Tensor:
    """Run the prompt; return the logits of its last position.

    input_ids: [1, S], positions: [1, S] -> logits: [V]
    """
    out = model(
        input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[0, -1]


def decode_one_token(model: torch.nn.Module, token: torch.Tensor, position: torch.Tensor,
                     cache: "Cache | NativeCache") -> torch.Tensor:
    """One step: token: [1, 1] at position: [1, 1] -> logits: [V]."""
    out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
    return out.logits[0, -1]


def decode(
    model: torch.nn.Module,
    seq: SequenceState,
    *,
    cancel: CancelToken = NeverCancel(),
    cache: Cache | NativeCache | None = None,
    tuned: bool = True,
) -> Iterator[str]:
    """The single-stream loop: prefill `seq`'s prompt, then one token per step until `seq` ends.

    Yields, after every accepted token, the text it released (often ""), and at the end the tail
    (when not empty). `cache`: a KV cache (`new_cache`) already holding the first positions of this
    prompt, computed earlier; prefill runs only the rest (at least one token) and the cache is
    extended in place. `tuned`: decode through the lean step where it applies (False: `model(...)`
    every step).
    """
    device = next(model.parameters()).device
    n_prompt, max_new = seq.n_prompt, seq.params.max_tokens
    positions = torch.arange(n_prompt + max_new, device=device).unsqueeze(0)  # [1, S + N]
    token = torch.empty(1, 1, dtype=torch.long, device=device)  # [1, 1]
    cached = 0 if cache is None else cache.get_seq_length()
    if cached >= n_prompt:
        raise ValueError(f"the cache holds {cached} positions of a {n_prompt}-token prompt: at "
                         "least its last token must run")
    cache = new_cache(model) if cache is None else cache
    with torch.inference_mode():
        started = time.perf_counter()
        # Where decode steps run fused, so does the prompt: its positions then hold what steps
        # would have left (a prefix reused later, or a reply continued, reads the same cache)
        fused = FusedStep.build(model, cache) if tuned else None
        if fused is not None:
            logits = fused.prefill(torch.from_numpy(seq.seen[cached:n_prompt]), cached)
        else:
            input_ids = torch.from_numpy(seq.seen[cached:n_prompt]).unsqueeze(0).to(device)  # [1, S - cached]
            logits = prefill(model, input_ids, positions[:, cached:n_prompt], cache)
            fused = FusedStep.build(model, cache) if tuned else None
        lean = LeanDecoder.build(model, cache, n_prompt, max_new) if tuned and fused is None else None
        if lean is not None:
            cache = None  # its keys and values now live in the lean decoder's buffers
        first = True
        while True:
            next_id = seq.pick(logits.cpu())
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
            token.fill_(next_id)
            pos = seq.position
            if fused is not None:
                logits = fused.step(next_id, pos)
            elif lean is not None:
                logits = lean.step(token, positions[:, pos : pos + 1])
            else:
                assert cache is not None
                logits = decode_one_token(model, token, positions[:, pos : pos + 1], cache)
    tail = seq.tail()
    if tail:
        yield tail


def generate_tokens(
    model: torch.nn.Module,
    seq: SequenceState,
    *,
    cancel: CancelToken = NeverCancel(),
    cache: Cache | NativeCache | None = None,
    tuned: bool = True,
) -> Iterator[int]:
    """The new token ids of `decode`, one as soon as it is sampled (EOS is not yielded)."""
    done = 0
    for _ in decode(model, seq, cancel=cancel, cache=cache, tuned=tuned):
        while done < len(seq.token_ids):
            yield seq.token_ids[done]
            done += 1


def stream_text(
    model: torch.nn.Module,
    seq: SequenceState,
    *,
    cancel: CancelToken = NeverCancel(),
    tuned: bool = True,
) -> Iterator[str]:
    """Text deltas of `decode`: whole characters only, stop strings held back and never emitted."""
    for text in decode(model, seq, cancel=cancel, tuned=tuned):
        if text:
            yield text
