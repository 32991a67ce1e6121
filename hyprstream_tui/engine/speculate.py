"""Speculative decoding for the fused step: an int8 copy of the model's own weights (the draft)
guesses the next few tokens, and the model computes its logits for all of them in one pass.

An fp32 step of a small model reads every weight once per token (540 MB on SmolLM2-135M), so a
reply's decode is bound by memory bandwidth, not by arithmetic. `hs_prefill_every` reads the
weights once for a whole proposal and returns each token's logits exactly as that token's own
step returns them, bit for bit (`step.c`), so the reply cannot change: `Speculator.step` is a
drop-in for `FusedStep.step` under `loop.run`. The loop samples each token from the model's own
logits with the request's own generator, as always; where the sampled token is the draft's
guess, the next logits are already there, and where it is not, the rest of the proposal is
dropped (the cache's later positions are simply overwritten) and a new one starts from the
sampled token. Greedy and seeded sampling alike give the replies of plain steps; only the time
differs.

The draft keeps its own KV cache beside the model's (`DraftState`, hung on the model's cache, so
the engine's prefix cache keeps both together) with the token ids it holds, and catches up on
whatever the model's cache holds that it does not (a prompt, an accepted token) before guessing.

Where it applies: an fp32 model running the fused step (not an exact bf16 one: torch's own
prompt is not its steps' bits), with an int8 draft loaded by the engine (`LoadedModel.draft`,
made in long-lived engines only: the keep-alive engine). `HYPRSTREAM_DRAFT=0` turns it off.

Imports torch at module level: only `engine.generate` imports it.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hyprstream_tui.engine.prefix import common_prefix
from hyprstream_tui.engine.tuned.step import FusedStep

if TYPE_CHECKING:
    from hyprstream_tui.engine.sequence import SequenceState

ENV = "HYPRSTREAM_DRAFT"  # "0": no speculative decoding
LOOKAHEAD = 8  # tokens checked per pass at most: the sampled one and up to 7 guesses
MAX_CATCH_UP = 64  # draft positions to run before guessing; more (a long new prompt) costs more than it saves
# A pass's time in model steps: 1 + GUESS_COST per guess (a draft step and one more row checked):
# SmolLM2-135M fp32 against its int8 draft, 2 cores: step 17 ms, draft step 4.5, each row 1.8.
GUESS_COST = 0.37
DECAY = 0.7  # weight of earlier passes in the acceptance estimate
# Before any pass: the rate a draft of the same weights starts from (SmolLM2-135M's int8 draft
# took 0.87 of its greedy guesses and 0.33 of its sampled ones), worth PRIOR_WEIGHT guesses.
PRIOR = {True: 0.9, False: 0.5}
PRIOR_WEIGHT = 2.0


class Acceptance:
    """How often the draft's guesses are taken, recent passes weighing most, for greedy and for
    sampled requests apart (a sampled token is the draft's greedy guess less often)."""

    def __init__(self) -> None:
        self.taken = {True: 0.0, False: 0.0}
        self.tried = {True: 0.0, False: 0.0}

    def rate(self, greedy: bool) -> float:
        return (self.taken[greedy] + PRIOR[greedy] * PRIOR_WEIGHT) / (self.tried[greedy] + PRIOR_WEIGHT)

    def record(self, greedy: bool, taken: int, guessed: int) -> None:
        self.taken[greedy] = DECAY * self.taken[greedy] + taken
        self.tried[greedy] = DECAY * self.tried[greedy] + min(guessed, taken + 1)

    def lookahead(self, greedy: bool) -> int:
        """Tokens per pass with the least expected time a token: a pass of k costs
        1 + GUESS_COST (k - 1) steps and yields (1 - a^k) / (1 - a) tokens at acceptance a."""
        a = min(self.rate(greedy), 0.999)
        return min(range(1, LOOKAHEAD + 1), key=lambda k: (1 + GUESS_COST * (k - 1)) * (1 - a) / (1 - a ** k))


_acceptance: "weakref.WeakKeyDictionary[Any, Acceptance]" = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@dataclass(eq=False)
class DraftState:
    """The draft's cache beside a model's cache, and the token id at each position it holds."""

    cache: Any
    ids: list[int] = field(default_factory=list)


class Speculator:
    """`step(token, position)` as `FusedStep.step` answers it, through checked guesses."""

    def __init__(self, main: FusedStep, draft: FusedStep, state: DraftState, seq: "SequenceState") -> None:
        self.main, self.draft, self.state, self.seq = main, draft, state, seq
        self.ahead: dict[int, tuple[int, torch.Tensor]] = {}  # position -> (token, its logits)
        self.confirmed = main.cache.length  # positions holding tokens the sequence has taken
        self.eos = seq.eos_ids
        self.greedy = seq.params.greedy
        self.acceptance = _acceptance.setdefault(draft.model, Acceptance())
        self.guessed: list[int] = []  # the last pass's guesses, till the sequence takes or leaves them
        self.start = 0  # the position of the last pass's first guess

    @classmethod
    def build(cls, main: FusedStep | None, draft_model: Any, seq: "SequenceState") -> "Speculator | None":
        """A speculator for `main` with `draft_model` (None where it does not apply)."""
        if main is None or draft_model is None or main.exact or not enabled():
            return None
        state = getattr(main.cache, "draft", None)
        if not isinstance(state, DraftState) or getattr(state.cache, "owner", None) is not draft_model:
            state = DraftState(cache=draft_model.new_cache())
            state.cache.owner = draft_model
        draft = FusedStep.build(draft_model, state.cache, wait=False)
        if draft is None:
            return None
        main.cache.draft = state
        return cls(main, draft, state, seq)

    def prompted(self, length: int) -> None:
        """The model's cache now holds the prompt's `length` positions: the draft reads them too
        (now, not at the first step: a warm-up's prompt leaves both caches ready)."""
        self.confirmed = length
        if self.acceptance.lookahead(self.greedy) > 1:
            self.catch_up(length)

    def catch_up(self, upto: int) -> torch.Tensor | None:
        """Run the draft over the sequence's tokens before position `upto` that its cache lacks;
        its logits after the last of them (None: too many to run, or none to run)."""
        seen = self.seq.seen[:upto].tolist()
        have = common_prefix(self.state.ids, seen)
        if have == upto:
            have -= 1  # the last token runs again: its logits are what is needed
        if upto - have > MAX_CATCH_UP or have < 0:
            return None
        self.draft.cache.length = have
        del self.state.ids[have:]
        logits = self.draft.prefill(torch.tensor(seen[have:], dtype=torch.int64), have)
        self.state.ids.extend(seen[have:])
        return logits

    def step(self, token: int, position: int) -> torch.Tensor:
        """The model's logits [V] after `token` at `position`, bit for bit those of its step."""
        known = self.ahead.get(position)
        if known is not None and known[0] == token:
            self.confirmed = position + 1
            return known[1]
        self.close_pass(position)
        self.main.cache.length = position  # later positions: a dropped guess's, overwritten
        proposal = [token] + self.guess(position + 1)
        logits = self.main.prefill(torch.tensor(proposal, dtype=torch.int64), position, every=True)
        self.ahead = {position + i: (t, logits[i]) for i, t in enumerate(proposal)}
        self.guessed, self.start = proposal[1:], position + 1
        self.confirmed = position + 1
        return logits[0]

    def close_pass(self, position: int) -> None:
        """Count how many of the last pass's guesses the sequence took (it has come to `position`
        or ended there) and forget the rest."""
        if self.guessed:
            taken = min(position - self.start, len(self.guessed))
            self.acceptance.record(self.greedy, taken, len(self.guessed))
        self.guessed = []
        self.ahead.clear()

    def guess(self, upto: int) -> list[int]:
        """The draft's greedy guesses after the sequence's first `upto` tokens (it ends at the
        request's token budget and at an end-of-sequence token)."""
        room = min(self.acceptance.lookahead(self.greedy), self.seq.params.max_tokens - len(self.seq.token_ids)) - 1
        if room <= 0:
            return []
        logits = self.catch_up(upto)
        out: list[int] = []
        while logits is not None:
            token = int(torch.argmax(logits))
            if token in self.eos:
                break
            out.append(token)
            if len(out) == room:
                break
            logits = self.draft.step(token, upto + len(out) - 1)
            self.state.ids.append(token)
        return out

    def settle(self) -> None:
        """After the reply: the model's cache holds the taken tokens only (a kept prefix must)."""
        self.main.cache.length = min(self.main.cache.length, self.confirmed)
        if self.guessed and self.seq.finish_reason is not None:  # the reply ended in the pass
            self.close_pass(self.confirmed + (0 if self.seq.finish_reason == "eos" else 1))


__all__ = ["ENV", "DraftState", "Speculator", "enabled"]
