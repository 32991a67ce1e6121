"""Pure sampling functions: logits in, probabilities or a token id out. numpy only, no torch.

Every path that generates (the torch engine, the batch, the torch-free cold path) samples here, so
one seed gives one reply whichever path runs the model. Order follows transformers' logits
processors (repetition penalty, temperature, top-k, top-p, min-p), so a seeded run here means the
same thing as a sampling run there. Nothing here holds state: the caller passes a
`numpy.random.Generator` (PCG64) seeded per request. (Until Dec 2026 this drew from a
`torch.Generator`: a seed now gives another stream of tokens than it gave then, from the same
distribution.)

Speed (vocabularies of 49k-152k entries, once per token): the filters narrow the vocabulary to
candidate ids first and work on those; no full sort unless top-p needs one (a nucleus that only a
near-flat distribution has); the draw is an inverse-CDF over blocks (`multinomial`): one uniform
number per token, not one per vocabulary entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from hyprstream_tui.engine.params import SamplingParams

Floats = npt.NDArray[np.float32]
Ids = npt.NDArray[np.intp]

_BLOCK = 1024  # the draw's block: one cumulative sum over the blocks, one inside the chosen one
_NUCLEUS_FLOORS = (1e-2, 1e-4, 1e-6)  # top-p looks for its nucleus above these (x the top weight)


def apply_repetition_penalty(logits: Floats, seen: npt.ArrayLike, penalty: float) -> Floats:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied.

    logits: [V] float32 (never written to: a penalised copy comes back); seen: [N] token ids
    (prompt and generated so far, repeats allowed).
    """
    ids = np.asarray(seen, dtype=np.intp)
    if penalty == 1.0 or ids.size == 0:
        return logits
    picked = logits[ids]  # [N]
    out = logits.copy()
    out[ids] = np.where(picked < 0, picked * np.float32(penalty), picked / np.float32(penalty))
    return out


def top_k_ids(logits: Floats, k: int) -> Ids | None:
    """The ids (ascending) of the k largest logits, ties at the k-th value kept; None: all of them.

    A strided sample of the logits bounds the k-th value from below, so the exact selection runs
    over a few hundred candidates rather than the whole vocabulary.
    """
    size = logits.shape[0]
    if k <= 0 or k >= size:
        return None
    candidates: Ids | None = None
    stride = size // 4096
    if stride >= 2 and 4 * k < size:
        sample = logits[::stride]
        rank = min(sample.shape[0], -(-4 * k // stride) + 1)  # about 4k logits expected above it
        floor = np.partition(sample, sample.shape[0] - rank)[sample.shape[0] - rank]
        above = np.flatnonzero(logits >= floor)
        if above.shape[0] >= k:
            candidates = above
    if candidates is None:
        kth = np.partition(logits, size - k)[size - k]
        return np.flatnonzero(logits >= kth)
    values = logits[candidates]
    kth = np.partition(values, values.shape[0] - k)[values.shape[0] - k]
    return candidates[values >= kth]


def nucleus(weights: Floats, p: float) -> Ids | None:
    """Top-p: the ids (ascending) of the smallest set of most likely tokens whose mass reaches p;
    the most likely token always stays. None: all of them. weights: [n] >= 0, not normalised,
    the largest 1 (as `_weights` makes them)."""
    if p >= 1.0:
        return None
    target = float(weights.sum(dtype=np.float64)) * p
    candidates: Ids | None = None
    for floor in _NUCLEUS_FLOORS:  # every token above a floor: a prefix of the sorted order
        above = np.flatnonzero(weights >= floor)
        if float(weights[above].sum(dtype=np.float64)) >= target:
            candidates = above
            break
    if candidates is None:
        candidates = np.arange(weights.shape[0])
    values = weights[candidates]
    order = np.argsort(-values, kind="stable")  # most likely first; ties by id
    ranked = values[order]
    before = np.cumsum(ranked, dtype=np.float64) - ranked  # the mass before each token
    # Drop a token when the mass before it already reaches p; the most likely token always stays.
    n_keep = max(1, int(np.searchsorted(before, target, side="left")))
    return np.sort(candidates[order[:n_keep]])


def candidates(
    logits: Floats,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> tuple[Ids | None, Floats]:
    """The tokens to draw from and their weights: (ids [n] ascending, or None for all V; weights
    [n] float32, proportional to the probabilities, the largest 1, 0 for a token min-p drops).

    temperature must be > 0 here; greedy decoding never calls this.
    """
    ids = top_k_ids(logits, top_k)
    weights = _weights(logits if ids is None else logits[ids], temperature)
    kept = nucleus(weights, top_p)
    if kept is not None:
        weights = weights[kept]
        ids = kept if ids is None else ids[kept]
    if min_p > 0.0:  # below min_p times the top token's probability; the top token's weight is 1
        weights[weights < np.float32(min_p)] = 0.0
    return ids, weights


def logits_to_probs(
    logits: npt.ArrayLike,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Floats:
    """The distribution to draw the next token from. logits: [V] -> probs: [V] float32.

    temperature must be > 0 here; greedy decoding never calls this.
    """
    values = np.asarray(logits, dtype=np.float32)
    ids, weights = candidates(values, temperature=temperature, top_k=top_k, top_p=top_p,
                              min_p=min_p)
    probs = np.zeros(values.shape[0], dtype=np.float32)
    probs[slice(None) if ids is None else ids] = weights / weights.sum(dtype=np.float64)
    return probs


def multinomial(weights: npt.ArrayLike, generator: np.random.Generator | None) -> int:
    """One draw from weights: [n] >= 0 (probabilities, or proportional to them); never an index
    whose weight is 0. Inverse CDF with one uniform number from `generator`: a cumulative sum over
    blocks of `_BLOCK`, then one inside the block it falls in."""
    w = np.asarray(weights, dtype=np.float32)
    rng = generator if generator is not None else np.random.default_rng()
    size = w.shape[0]
    whole = size // _BLOCK * _BLOCK
    if whole < 4 * _BLOCK:
        return _inverse_cdf(w, rng.random())
    sums = w[:whole].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
    if whole < size:
        sums = np.append(sums, w[whole:].sum(dtype=np.float64))
    cumulative = np.cumsum(sums)
    u = rng.random() * float(cumulative[-1])
    block = int(np.searchsorted(cumulative, u, side="right"))
    if block >= sums.shape[0]:  # u rounded up to the total: the last block with any weight
        block = int(np.flatnonzero(sums)[-1]) if cumulative[-1] > 0 else 0
    before = float(cumulative[block - 1]) if block else 0.0
    part = w[block * _BLOCK: (block + 1) * _BLOCK]
    spread = float(sums[block])
    fraction = (u - before) / spread if spread > 0 else 0.0
    return block * _BLOCK + _inverse_cdf(part, min(max(fraction, 0.0), 1.0))


def sample(
    logits: npt.ArrayLike,
    params: "SamplingParams",
    *,
    seen: npt.ArrayLike,
    generator: np.random.Generator | None = None,
) -> int:
    """The next token id for logits: [V] under `params`; `seen`: [N] ids for the penalty.
    Greedy: the first of the largest logits (as torch's argmax)."""
    values = np.asarray(logits, dtype=np.float32)
    values = apply_repetition_penalty(values, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(values))
    ids, weights = candidates(values, temperature=params.temperature, top_k=params.top_k,
                              top_p=params.top_p, min_p=params.min_p)
    picked = multinomial(weights, generator)
    return picked if ids is None else int(ids[picked])


def _weights(logits: Floats, temperature: float) -> Floats:
    """exp((logits - max) / temperature): [n] float32, the top token's 1, a new array."""
    top = logits.max()
    weights = np.subtract(logits, top, dtype=np.float32)
    weights /= np.float32(max(temperature, 1e-5))
    np.exp(weights, out=weights)
    return weights


def _inverse_cdf(weights: Floats, fraction: float) -> int:
    """The index where `fraction` of the total weight is reached: never one whose weight is 0."""
    cumulative = np.cumsum(weights, dtype=np.float64)
    total = float(cumulative[-1]) if cumulative.shape[0] else 0.0
    if not total > 0:  # no weight at all (or NaN): the largest entry, as greedy would
        return int(np.argmax(weights))
    index = int(np.searchsorted(cumulative, fraction * total, side="right"))
    if index >= weights.shape[0]:  # rounding ran past the end: the last token with any weight
        index = int(np.flatnonzero(weights)[-1])
    return index
