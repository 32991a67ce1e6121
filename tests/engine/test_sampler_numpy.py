"""The numpy sampler: hand-made logits with exact expectations, the large-vocabulary fast paths
(strided top-k, the nucleus above a floor, the block draw) against a plain full-vocabulary
reference, draw frequencies against the probabilities, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hyprstream_tui.engine.params import SamplingParams
from hyprstream_tui.engine.sampling import (
    apply_repetition_penalty,
    logits_to_probs,
    multinomial,
    sample,
    top_k_ids,
)
from hyprstream_tui.engine.sequence import SequenceState, seeded
from tests.helpers import REPO_ROOT

NONE = np.empty(0, dtype=np.int64)


def _log(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _reference(x, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The filters as transformers applies them, one full-vocabulary pass each, in float64."""
    z = x.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        z[z < np.sort(z)[-top_k]] = -np.inf
    if top_p < 1.0:
        probs = _softmax(z)
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        drop = before >= top_p
        drop[0] = False
        z[order[drop]] = -np.inf
    if min_p > 0.0:
        probs = _softmax(z)
        z[probs < min_p * probs.max()] = -np.inf
    return _softmax(z)


def test_temperature_gives_the_exact_tempered_softmax():
    logits = _log([1, 2, 4])
    assert np.allclose(logits_to_probs(logits), np.array([1, 2, 4]) / 7, atol=1e-6)
    assert np.allclose(logits_to_probs(logits, temperature=0.5), np.array([1, 4, 16]) / 21,
                       atol=1e-6)
    assert np.allclose(logits_to_probs(logits, temperature=2.0),
                       np.sqrt([1, 2, 4]) / np.sqrt([1, 2, 4]).sum(), atol=1e-6)


def test_top_k_keeps_every_tie_at_the_kth_value():
    logits = np.array([1, 3, 3, 2, 3, 0], dtype=np.float32)
    assert top_k_ids(logits, 2).tolist() == [1, 2, 4]
    assert np.flatnonzero(logits_to_probs(logits, top_k=2)).tolist() == [1, 2, 4]
    assert np.allclose(logits_to_probs(logits, top_k=4)[[1, 2, 3, 4]],
                       _softmax(logits[[1, 2, 3, 4]]), atol=1e-6)
    assert top_k_ids(logits, 0) is None and top_k_ids(logits, 6) is None


@pytest.mark.parametrize("top_p, kept", [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]),
                                         (0.99, [0, 1, 2, 3]), (1e-6, [0])])
def test_top_p_keeps_tokens_until_the_mass_before_them_reaches_p(top_p, kept):
    logits = _log([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(logits, top_p=top_p)
    assert np.flatnonzero(probs).tolist() == kept
    full = np.array([0.5, 0.3, 0.15, 0.05])[kept]
    assert np.allclose(probs[kept], full / full.sum(), atol=1e-6)


def test_min_p_drops_below_its_share_of_the_top_probability_and_renormalises():
    logits = _log([0.5, 0.3, 0.15, 0.05])
    probs = logits_to_probs(logits, min_p=0.2)  # below 0.2 * 0.5 = 0.1 goes
    assert np.allclose(probs, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=1e-6)


def test_repetition_penalty_divides_positives_multiplies_negatives_and_leaves_the_input():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]
    # In sample: the penalty comes first, so a penalised top token loses the greedy pick.
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=2.5), seen=[0]) == 2


def test_greedy_picks_the_first_maximum():
    assert sample(np.array([1, 5, 5, 2], dtype=np.float32), SamplingParams(temperature=0),
                  seen=NONE) == 1
    big = np.zeros(151936, dtype=np.float32)
    big[[70000, 9000, 150000]] = 3.0
    assert sample(big, SamplingParams(temperature=0), seen=NONE) == 9000


LARGE = [dict(temperature=0.7), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=40),
         dict(temperature=0.8, top_k=200, top_p=0.95, min_p=0.02), dict(temperature=1.0, min_p=0.05),
         dict(temperature=2.5, top_p=0.5), dict(temperature=0.7, top_k=50000)]


@pytest.mark.parametrize("vocab", [49152, 151936])
@pytest.mark.parametrize("settings", LARGE, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_large_vocabularies_match_the_full_pass_reference(vocab, settings):
    logits = (np.random.default_rng(vocab).standard_normal(vocab) * 3).astype(np.float32)
    ours = logits_to_probs(logits, **settings)
    theirs = _reference(logits, **settings)
    assert np.array_equal(ours > 0, theirs > 0)
    assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-9)


def test_top_k_is_exact_when_the_strided_estimate_falls_short():
    """The k best all sit where the strided sample looks: its floor has too few logits above."""
    logits = np.zeros(151936, dtype=np.float32)
    logits[::37] = np.arange(1, logits[::37].size + 1)
    ids = top_k_ids(logits, 40)
    assert ids.tolist() == sorted(np.argsort(-logits, kind="stable")[:40].tolist())


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_block_draw_frequencies_follow_the_probabilities():
    """Over a 10000-wide vocabulary (the block path), with a min-p-style zero mass elsewhere."""
    weights = np.zeros(10000, dtype=np.float32)
    hot = np.array([0, 5, 1023, 1024, 2047, 4096, 6000, 8191, 9000, 9999])  # block edges, the tail
    weights[hot] = np.arange(1, 11)
    weights[3000:3100] = 0.1  # 10 in all, spread over one block: one bucket below
    g = seeded(7)
    draws = np.array([multinomial(weights, g) for _ in range(12000)])
    assert set(np.unique(draws)) <= set(hot) | set(range(3000, 3100))
    counts = np.array([(draws == i).sum() for i in hot] + [((draws >= 3000) & (draws < 3100)).sum()])
    probs = np.append(np.arange(1, 11), 10.0) / 65.0
    assert _chi_square(counts, probs) < 35.0  # 10 degrees of freedom: 35 is a p-value of 1e-4


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=1.0, top_p=0.8),
                                      dict(temperature=1.2, top_k=20)])
def test_sampled_frequencies_follow_logits_to_probs(settings):
    logits = (np.random.default_rng(3).standard_normal(49152) * 4).astype(np.float32)
    probs = logits_to_probs(logits, **settings).astype(np.float64)
    top = np.argsort(-probs)[:8]
    g = seeded(11)
    params = SamplingParams(**settings)
    draws = np.array([sample(logits, params, seen=NONE, generator=g) for _ in range(4000)])
    assert (probs[draws] > 0).all()
    counts = np.array([(draws == i).sum() for i in top] + [(~np.isin(draws, top)).sum()])
    buckets = np.append(probs[top], 1.0 - probs[top].sum())
    keep = buckets * draws.size >= 5  # the chi-square needs five expected draws a bucket
    rest = counts[~keep].sum(), buckets[~keep].sum()
    counts, buckets = np.append(counts[keep], rest[0]), np.append(buckets[keep], rest[1])
    if buckets[-1] * draws.size < 5:
        counts, buckets = counts[:-1], buckets[:-1]
    assert _chi_square(counts, buckets / buckets.sum()) < 35.0


def test_a_seed_reproduces_its_stream_and_another_seed_does_not():
    logits = (np.random.default_rng(1).standard_normal(151936) * 3).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.95)

    def run(seed):
        g = seeded(seed)
        return [sample(logits, params, seen=NONE, generator=g) for _ in range(40)]

    assert isinstance(seeded(1), np.random.Generator)
    assert run(1) == run(1) != run(2)


def test_pick_reads_a_torch_tensor_as_its_numpy_float32_values():
    import torch

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)).bfloat16()
    params = SamplingParams(temperature=0.8, top_k=30, max_tokens=4)

    def pick(x):
        seq = SequenceState([1, 2, 3], params, eos_ids=frozenset(), generator=seeded(4))
        return [seq.pick(x) for _ in range(10)]

    assert pick(logits) == pick(logits.float().numpy())
    seq = SequenceState([1, 2, 3], params, eos_ids=frozenset(), generator=None)
    seq.accept(7)
    assert seq.seen.dtype == np.int64 and seq.seen[:4].tolist() == [1, 2, 3, 7]


def test_sequence_and_sampling_import_without_torch():
    code = ("import sys\n"
            f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "import hyprstream_tui.engine.sequence, hyprstream_tui.engine.sampling\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_top_p_sorts_the_whole_vocabulary_when_a_long_tail_holds_the_nucleus():
    """One token far ahead, 151935 tied ones each under 1e-6 of it but 11% of the mass in all:
    no floor holds p of the mass, so the nucleus comes from the full sort (ties: lowest ids)."""
    logits = np.zeros(151936, dtype=np.float32)
    logits[0] = 14.0
    ours = np.flatnonzero(logits_to_probs(logits, top_p=0.95))
    theirs = np.flatnonzero(_reference(logits, top_p=0.95))
    assert ours[0] == 0 and np.array_equal(ours, np.arange(ours.size))
    assert abs(ours.size - theirs.size) <= 2 and 50000 < ours.size < 151936
