"""Our own prefill + decode loop over a KV cache, and the text stream built on it.

Shape of a step (batch 1): prefill runs the whole prompt once and computes the output layer for
the last position only; each decode step feeds one token at its position and reuses the cache.
Positions come from one preallocated arange. With `tuned` (LoadOptions.tuned, the default),
decode steps go through `tuned.lean.LeanDecoder` (the model's own layers over a preallocated cache,
without transformers' per-step glue) where the architecture allows, else through `model(...)`.

Imports torch at module level: the engine imports this module lazily, in its worker threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import torch

from hyprstream_tui.engine.detok import IncrementalDetokenizer
from hyprstream_tui.engine.tuned.lean import LeanDecoder
from hyprstream_tui.engine.sampling import sample
from hyprstream_tui.engine.stops import StopMatcher

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams




class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class NeverCancel:
    def is_set(self) -> bool:
        return False


@dataclass(kw_only=True)
class GenerationStats:
    """Filled in while a generation runs; read it once the stream is exhausted."""

    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    stop: str | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0


def new_cache(model: torch.nn.Module):
    """An empty KV cache laid out for `model` (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def prefill(model, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt; return the logits of its last position.

    input_ids: [1, S], positions: [1, S] -> logits: [V]
    """
    out = model(
        input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    return out.logits[0, -1]


def decode_one_token(model, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    """One step: token: [1, 1] at position: [1, 1] -> logits: [V]."""
    out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True)
    return out.logits[0, -1]


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    params: "SamplingParams",
    *,
    eos_ids: frozenset[int],
    generator: torch.Generator | None,
    cancel: CancelToken = NeverCancel(),
    stats: GenerationStats | None = None,
    cache=None,
    tuned: bool = True,
) -> Iterator[int]:
    """Yield up to params.max_tokens new token ids; stop at EOS (not yielded) or on cancel.

    `cache`: a KV cache (`new_cache`) already holding the first positions of this prompt, computed
    earlier; prefill runs only the rest (at least one token) and the cache is extended in place.
    `tuned`: decode through the lean step where it applies (False: `model(...)` every step).
    """
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    n_prompt, max_new = len(prompt_ids), params.max_tokens
    stats.prompt_tokens = n_prompt
    seen = torch.empty(n_prompt + max_new, dtype=torch.long)  # [S + N] for the penalty
    seen[:n_prompt] = torch.tensor(prompt_ids, dtype=torch.long)
    positions = torch.arange(n_prompt + max_new, device=device).unsqueeze(0)  # [1, S + N]
    token = torch.empty(1, 1, dtype=torch.long, device=device)  # [1, 1]
    cached = 0 if cache is None else cache.get_seq_length()
    if cached >= n_prompt:
        raise ValueError(f"the cache holds {cached} positions of a {n_prompt}-token prompt: at "
                         "least its last token must run")
    cache = new_cache(model) if cache is None else cache
    with torch.inference_mode():
        started = time.perf_counter()
        input_ids = seen[cached:n_prompt].unsqueeze(0).to(device)  # [1, S - cached]
        logits = prefill(model, input_ids, positions[:, cached:n_prompt], cache)
        lean = LeanDecoder.build(model, cache, n_prompt, max_new) if tuned else None
        if lean is not None:
            cache = None  # its keys and values now live in the lean decoder's buffers
        for i in range(max_new):
            next_id = sample(logits.cpu(), params, seen=seen[: n_prompt + i], generator=generator)
            _clock(stats, started, first=i == 0)
            if next_id in eos_ids:
                stats.finish_reason = "eos"
                return
            seen[n_prompt + i] = next_id
            stats.token_ids.append(next_id)
            yield next_id
            if cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            if i + 1 == max_new:
                break
            started = time.perf_counter()
            token.fill_(next_id)
            pos = n_prompt + i
            if lean is not None:
                logits = lean.step(token, positions[:, pos : pos + 1])
            else:
                logits = decode_one_token(model, token, positions[:, pos : pos + 1], cache)
        stats.finish_reason = "length"


def _clock(stats: GenerationStats, started: float, *, first: bool) -> None:
    elapsed = time.perf_counter() - started
    if first:
        stats.prefill_s += elapsed
    else:
        stats.decode_s += elapsed


def stream_text(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    params: "SamplingParams",
    *,
    eos_ids: frozenset[int],
    generator: torch.Generator | None,
    cancel: CancelToken = NeverCancel(),
    stats: GenerationStats | None = None,
    tuned: bool = True,
) -> Iterator[str]:
    """Text deltas: whole characters only, stop strings held back and never emitted."""
    stats = stats if stats is not None else GenerationStats()
    detok = IncrementalDetokenizer(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True), context=prompt_ids
    )
    stops = StopMatcher(params.stop)
    tokens = generate_tokens(
        model, prompt_ids, params, eos_ids=eos_ids, generator=generator, cancel=cancel, stats=stats,
        tuned=tuned,
    )
    for token_id in tokens:
        text = stops.push(detok.push(token_id))
        if text:
            yield text
        if stops.matched is not None:
            tokens.close()
            stats.finish_reason, stats.stop = "stop", stops.matched
            return
    tail = stops.push(detok.flush())
    if stops.matched is not None:
        stats.finish_reason, stats.stop = "stop", stops.matched
    tail += stops.flush()
    if tail:
        yield tail
