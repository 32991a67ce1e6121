"""One sequence being generated: the state the single-stream loop and the batch both decode with.

`SequenceState` holds what a request needs from its first sampled token to its last: the tokens
seen (for the repetition penalty), its seeded generator, its detokeniser and stop matcher, the text
released so far and how it ended. `generate.stream_text` (one request) and `scheduler.Scheduler`
(a batch of them) feed it logits and take its text, so a request's text is the same alone or
batched: EOS is not emitted, stop strings are held back and never emitted, the detokeniser never
splits a character, and the tail is flushed at the end.

`provenance` and `SequenceState.done` build a reply's `Provenance` and `GenerationDone`, for both.

Torch-free (numpy): the torch-free cold path decodes with it too, so one seed gives one reply on
every path. `seen` is a numpy int64 array (`torch.from_numpy` makes a model input of it without a
copy); `pick` takes numpy logits or a torch tensor; `seeded` makes the numpy generator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hyprstream_tui.engine.detok import IncrementalDetokenizer
from hyprstream_tui.engine.events import FinishReason, GenerationDone, Provenance, Timings
from hyprstream_tui.engine.sampling import sample
from hyprstream_tui.engine.stops import StopMatcher

if TYPE_CHECKING:
    import numpy.typing as npt

    from hyprstream_tui.engine.loader import LoadedModel, ModelSource, Tokenizer
    from hyprstream_tui.engine.params import SamplingParams


class SequenceState:
    """One request's decoding state. Feed it: `pick(logits)` then `accept(token)`, until
    `finish_reason` is set; then `tail()` once.

    Without a `tokenizer` it keeps tokens only (no text, no stop strings): the token-level loop.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: "SamplingParams",
        *,
        eos_ids: frozenset[int],
        generator: np.random.Generator | None,
        tokenizer: "Tokenizer | None" = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.eos_ids = eos_ids
        self.generator = generator
        self.n_prompt = len(self.prompt_ids)
        self.seen = np.empty(self.n_prompt + params.max_tokens, dtype=np.int64)  # [S + N]
        self.seen[: self.n_prompt] = self.prompt_ids
        self.token_ids: list[int] = []
        self.detok = None if tokenizer is None else IncrementalDetokenizer(
            _decoder(tokenizer), context=self.prompt_ids)
        self.stops = StopMatcher(params.stop if tokenizer is not None else ())
        self.pieces: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.stop: str | None = None
        self.prefill_s = 0.0
        self.decode_s = 0.0

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds."""
        return self.n_prompt + len(self.token_ids) - 1

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def pick(self, logits: "npt.ArrayLike") -> int:
        """logits: [V], a numpy array or a torch tensor (any device or float dtype; read as
        float32 on the CPU, torch never imported here) -> the next token id under this request's
        parameters."""
        if hasattr(logits, "numpy"):  # a torch tensor
            tensor: Any = logits
            logits = tensor.detach().float().cpu().numpy()
        seen = self.seen[: self.n_prompt + len(self.token_ids)]
        return sample(logits, self.params, seen=seen, generator=self.generator)

    def accept(self, token_id: int) -> str:
        """Take a sampled token; return the text it releases. Sets `finish_reason` when done."""
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return ""
        self.seen[self.n_prompt + len(self.token_ids)] = token_id
        self.token_ids.append(token_id)
        text = ""
        if self.detok is not None:
            text = self.stops.push(self.detok.push(token_id))
        if self.stops.matched is not None:
            self.finish_reason, self.stop = "stop", self.stops.matched
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        return self._keep(text)

    def cancel(self) -> None:
        """Its request was cancelled: it ends here, unless it had ended already."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def tail(self) -> str:
        """At the end: what the detokeniser and stop matcher still hold (none after a stop)."""
        if self.finish_reason == "stop" or self.detok is None:
            return ""
        tail = self.stops.push(self.detok.flush())
        if self.stops.matched is not None:
            self.finish_reason, self.stop = "stop", self.stops.matched
        return self._keep(tail + self.stops.flush())

    def done(self, request_id: str, provenance: Provenance, *, load_s: float = 0.0,
             dropped_messages: int = 0) -> GenerationDone:
        """The finished request's report."""
        return GenerationDone(
            request_id=request_id,
            text=self.text,
            finish_reason=self.finish_reason or "length",
            stop=self.stop,
            dropped_messages=dropped_messages,
            provenance=provenance,
            timings=Timings(load_s=load_s, prefill_s=self.prefill_s, decode_s=self.decode_s,
                            prompt_tokens=self.n_prompt, completion_tokens=len(self.token_ids)),
        )

    def _keep(self, text: str) -> str:
        if text:
            self.pieces.append(text)
        return text


def _decoder(tokenizer: "Tokenizer") -> Callable[[Sequence[int]], str]:
    def decode(ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(ids), skip_special_tokens=True)
        return text if isinstance(text, str) else "".join(text)

    return decode


def provenance(lm: "LoadedModel", source: "ModelSource", params: "SamplingParams",
               seed: int) -> Provenance:
    """Which weights and settings produce a reply of `lm` for `source`: enough to reproduce it."""
    adapter = source.adapter
    return Provenance(
        model=source.name, model_commit=source.commit,
        adapter=adapter.name if adapter else None,
        adapter_commit=adapter.commit if adapter else None,
        params=params.as_dict(), seed=seed, dtype=lm.dtype, device=lm.device,
        quantize=lm.options.quantize,
    )


def seeded(seed: int) -> np.random.Generator:
    """The request's generator: numpy's PCG64 from `seed` (a seed's stream is not torch's)."""
    return np.random.default_rng(seed)


__all__ = ["SequenceState", "provenance", "seeded"]
