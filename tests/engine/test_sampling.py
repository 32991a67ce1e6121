"""Sampling statistics: excluded tokens never come out; temperature reshapes the distribution."""

from __future__ import annotations

import math

import pytest
import torch

from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sampling import (
    apply_repetition_penalty,
    logits_to_probs,
    multinomial,
    sample,
)

V = 50
DRAWS = 3000


def _logits(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 2


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS) -> torch.Tensor:
    g = torch.Generator().manual_seed(params.seed or 0)
    seen = torch.empty(0, dtype=torch.long)
    return torch.tensor([sample(logits, params, seen=seen, generator=g) for _ in range(n)])


def test_top_k_never_emits_outside_the_k_best():
    logits = _logits()
    allowed = set(logits.topk(5).indices.tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.5, top_k=5, seed=1)).tolist())
    assert drawn <= allowed
    assert len(drawn) == 5  # all of them do come out over 3000 draws


def test_top_p_keeps_the_smallest_nucleus():
    logits = _logits(1)
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    n_keep = int((cumulative < 0.6).sum()) + 1  # the first token that reaches 0.6 is kept
    allowed = set(order[:n_keep].tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=2)).tolist())
    assert drawn <= allowed
    assert len(drawn) == n_keep


def test_min_p_drops_tokens_below_the_threshold():
    logits = _logits(2)
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=1.0, min_p=0.1, seed=3)).tolist())
    assert drawn <= allowed


def test_combined_filters_and_probabilities_sum_to_one():
    logits = _logits(3)
    probs = logits_to_probs(logits, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert int((probs > 0).sum()) <= 10


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def test_temperature_orders_entropy_and_matches_empirical_frequencies():
    logits = _logits(4)
    entropies = [_entropy(logits_to_probs(logits, temperature=t)) for t in (0.3, 0.7, 1.0, 2.0)]
    assert entropies == sorted(entropies)
    # At temperature 1 the draws follow softmax(logits): total variation small.
    counts = torch.bincount(_draws(logits, SamplingParams(temperature=1.0, seed=5), 6000), minlength=V)
    tv = 0.5 * float((counts / counts.sum() - logits.softmax(-1)).abs().sum())
    assert tv < 0.06


def test_greedy_is_argmax_and_same_seed_same_draws():
    logits = _logits(5)
    assert _draws(logits, SamplingParams(temperature=0), 5).tolist() == [int(logits.argmax())] * 5
    a = _draws(logits, SamplingParams(temperature=1.0, seed=9), 200)
    b = _draws(logits, SamplingParams(temperature=1.0, seed=9), 200)
    c = _draws(logits, SamplingParams(temperature=1.0, seed=10), 200)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = _logits(6)
    seen = torch.tensor([1, 3, 3, 7, 20])
    ours = apply_repetition_penalty(logits, seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    assert torch.allclose(ours, theirs)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_top_p_matches_transformers(top_p):
    from transformers import TopPLogitsWarper

    logits = _logits(7)
    ours = logits_to_probs(logits, top_p=top_p) > 0
    theirs = TopPLogitsWarper(top_p)(None, logits[None].clone())[0] > float("-inf")
    assert torch.equal(ours, theirs)


def test_multinomial_never_picks_zero_probability():
    probs = torch.zeros(V)
    probs[[4, 9]] = torch.tensor([0.25, 0.75])
    g = torch.Generator().manual_seed(0)
    picks = [multinomial(probs, g) for _ in range(500)]
    assert set(picks) == {4, 9}
    assert 300 < picks.count(9) < 450
