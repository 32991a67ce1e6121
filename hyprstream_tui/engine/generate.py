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

from typing import TYPE_CHECKING, Any, Iterator

import torch

from hyprstream_tui.engine import loop
from hyprstream_tui.engine.loop import CancelToken, NeverCancel
from hyprstream_tui.engine.sequence import SequenceState
from hyprstream_tui.engine.speculate import Speculator
from hyprstream_tui.engine.tuned.lean import LeanDecoder
from hyprstream_tui.engine.tuned.step import FusedStep, packing

if TYPE_CHECKING:
    from transformers import Cache, PretrainedConfig

    from hyprstream_tui.engine.native.model import NativeCache



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


class TorchRun:
    """One sequence's prompt and steps through torch's model: its own classes' fused C step on their
    tensors (the prompt too) where it applies, else the lean step, else `model(...)`."""

    def __init__(self, model: torch.nn.Module, seq: SequenceState, cache: "Cache | NativeCache | None",
                 tuned: bool, draft: Any = None) -> None:
        self.model, self.seq, self.tuned, self.draft = model, seq, tuned, draft
        self.device = next(model.parameters()).device
        n_prompt, max_new = seq.n_prompt, seq.params.max_tokens
        self.positions = torch.arange(n_prompt + max_new, device=self.device).unsqueeze(0)  # [1, S + N]
        self.token = torch.empty(1, 1, dtype=torch.long, device=self.device)  # [1, 1]
        self.cached = 0 if cache is None else cache.get_seq_length()
        if self.cached >= n_prompt:
            raise ValueError(f"the cache holds {self.cached} positions of a {n_prompt}-token prompt: at "
                             "least its last token must run")
        self.cache: Cache | NativeCache | None = new_cache(model) if cache is None else cache
        self.fused: FusedStep | None = None
        self.lean: LeanDecoder | None = None
        self.pending = False  # the fused step comes once the model's weights are packed
        self.speculator: Speculator | None = None  # steps through a draft's checked guesses

    def prompt(self) -> torch.Tensor:
        """The logits [V] after the prompt's last token (its positions before `cached` reused)."""
        model, seq, cache, cached, n_prompt = self.model, self.seq, self.cache, self.cached, self.seq.n_prompt
        assert cache is not None
        # Where decode steps run fused, so does the prompt: its positions then hold what steps
        # would have left (a prefix reused later, or a reply continued, reads the same cache)
        self.fused = FusedStep.build(model, cache, wait=False) if self.tuned else None
        if self.fused is not None:
            self.speculator = Speculator.build(self.fused, self.draft, seq)
            if self.speculator is not None and n_prompt - cached == 1:  # the first check starts here
                return self.speculator.step(int(seq.seen[cached]), cached)
            logits = self.fused.prefill(torch.from_numpy(seq.seen[cached:n_prompt]), cached)
            if self.speculator is not None:
                self.speculator.prompted(n_prompt)
            return logits
        input_ids = torch.from_numpy(seq.seen[cached:n_prompt]).unsqueeze(0).to(self.device)  # [1, S - cached]
        logits = prefill(model, input_ids, self.positions[:, cached:n_prompt], cache)
        self.fused = FusedStep.build(model, cache, wait=False) if self.tuned else None
        # An exact bf16 model whose weights are still being packed: torch's steps on the same cache
        # until they are, then the fused step (the same values bit for bit)
        self.pending = self.tuned and self.fused is None and packing(model)
        if self.tuned and self.fused is None and not self.pending:
            self.lean = LeanDecoder.build(model, cache, n_prompt, seq.params.max_tokens)
            if self.lean is not None:
                self.cache = None  # its keys and values now live in the lean decoder's buffers
        return logits

    def step(self, token_id: int, pos: int) -> torch.Tensor:
        """The logits [V] after `token_id` at position `pos`."""
        if self.pending and not packing(self.model):
            self.pending = False
            self.fused = FusedStep.build(self.model, self.cache, wait=False)
        if self.speculator is not None:
            return self.speculator.step(token_id, pos)
        if self.fused is not None:
            return self.fused.step(token_id, pos)
        self.token.fill_(token_id)
        if self.lean is not None:
            return self.lean.step(self.token, self.positions[:, pos : pos + 1])
        assert self.cache is not None
        return decode_one_token(self.model, self.token, self.positions[:, pos : pos + 1], self.cache)


def decode(
    model: torch.nn.Module,
    seq: SequenceState,
    *,
    cancel: CancelToken = NeverCancel(),
    cache: Cache | NativeCache | None = None,
    tuned: bool = True,
    draft: Any = None,
) -> Iterator[str]:
    """The single-stream loop (`loop.run`) over torch's model: prefill `seq`'s prompt, then one
    token per step until `seq` ends.

    Yields, after every accepted token, the text it released (often ""), and at the end the tail
    (when not empty). `cache`: a KV cache (`new_cache`) already holding the first positions of this
    prompt, computed earlier; prefill runs only the rest (at least one token) and the cache is
    extended in place. `tuned`: the fused or lean step where it applies (False: `model(...)` every
    step). `draft`: the model's int8 draft (`engine.speculate`; the same reply, sooner).
    """
    run = TorchRun(model, seq, cache, tuned, draft)
    try:
        with torch.inference_mode():
            yield from loop.run(seq, run.prompt, run.step, cancel=cancel)
    finally:
        if run.speculator is not None:
            run.speculator.settle()


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
