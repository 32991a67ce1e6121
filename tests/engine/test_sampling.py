"""Sampling statistics: excluded tokens never come out; temperature reshapes the distribution.
(Hand-made exact cases, the large-vocabulary paths and the torch-free import: test_sampler_numpy.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sampling import (
    apply_repetition_penalty,
    logits_to_probs,
    multinomial,
    sample,
)
from hyprstream_tui.engine.sequence import seeded

V = 50
DRAWS = 3000


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 2).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _draws(logits: np.ndarray, params: SamplingParams, n: int = DRAWS) -> np.ndarray:
    g = seeded(params.seed or 0)
    seen = np.empty(0, dtype=np.int64)
    return np.array([sample(logits, params, seen=seen, generator=g) for _ in range(n)])


def test_top_k_never_emits_outside_the_k_best():
    logits = _logits()
    allowed = set(np.argsort(-logits)[:5].tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.5, top_k=5, seed=1)).tolist())
    assert drawn <= allowed
    assert len(drawn) == 5  # all of them do come out over 3000 draws


def test_top_p_keeps_the_smallest_nucleus():
    logits = _logits(1)
    probs = _softmax(logits)
    order = np.argsort(-probs)
    cumulative = probs[order].cumsum()
    n_keep = int((cumulative < 0.6).sum()) + 1  # the first token that reaches 0.6 is kept
    allowed = set(order[:n_keep].tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=2)).tolist())
    assert drawn <= allowed
    assert len(drawn) == n_keep


def test_min_p_drops_tokens_below_the_threshold():
    logits = _logits(2)
    probs = _softmax(logits)
    allowed = set(np.flatnonzero(probs >= 0.1 * probs.max()).tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.1, seed=3)).tolist())
    assert drawn <= allowed


def test_combined_filters_and_probabilities_sum_to_one():
    logits = _logits(3)
    probs = logits_to_probs(logits, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    assert probs.dtype == np.float32 and probs.shape == (V,)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert int((probs > 0).sum()) <= 10


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0].astype(np.float64)
    return float(-(p * np.log(p)).sum())


def test_temperature_orders_entropy_and_matches_empirical_frequencies():
    logits = _logits(4)
    entropies = [_entropy(logits_to_probs(logits, temperature=t)) for t in (0.3, 0.7, 1.0, 2.0)]
    assert entropies == sorted(entropies)
    # At temperature 1 the draws follow softmax(logits): total variation small.
    counts = np.bincount(_draws(logits, SamplingParams(temperature=1.0, seed=5), 6000), minlength=V)
    tv = 0.5 * float(np.abs(counts / counts.sum() - _softmax(logits)).sum())
    assert tv < 0.06


def test_greedy_is_argmax_and_same_seed_same_draws():
    logits = _logits(5)
    assert _draws(logits, SamplingParams(temperature=0), 5).tolist() == [int(logits.argmax())] * 5
    a = _draws(logits, SamplingParams(temperature=1.0, seed=9), 200)
    b = _draws(logits, SamplingParams(temperature=1.0, seed=9), 200)
    c = _draws(logits, SamplingParams(temperature=1.0, seed=10), 200)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(6)
    seen = np.array([1, 3, 3, 7, 20])
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(seen)[None],
                                                   torch.from_numpy(logits)[None].clone())[0]
    assert np.allclose(ours, theirs.numpy())
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_matches_transformers(top_p):
    import torch
    from transformers import TopPLogitsWarper

    logits = _logits(7)
    ours = logits_to_probs(logits, top_p=top_p) > 0
    theirs = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)[None].clone())[0] > float("-inf")
    assert np.array_equal(ours, theirs.numpy())


def test_multinomial_never_picks_zero_probability():
    probs = np.zeros(V, dtype=np.float32)
    probs[[4, 9]] = [0.25, 0.75]
    g = seeded(0)
    picks = [multinomial(probs, g) for _ in range(500)]
    assert set(picks) == {4, 9}
    assert 300 < picks.count(9) < 450
