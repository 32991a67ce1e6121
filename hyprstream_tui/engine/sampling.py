"""Pure sampling functions: logits in, probabilities or a token id out.

Order follows transformers' logits processors (repetition penalty, temperature, top-k, top-p,
min-p), so a seeded run here means the same thing as a sampling run there. Nothing here holds
state: the caller passes a `torch.Generator` seeded per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from hyprstream_tui.engine.params import SamplingParams


def apply_repetition_penalty(
    logits: "torch.Tensor", seen: "torch.Tensor", penalty: float
) -> "torch.Tensor":
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied.

    logits: [V] float32; seen: [N] token ids (prompt and generated so far).
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)  # [N]
    picked = picked.where(picked < 0, picked / penalty)
    picked = picked.where(picked >= 0, picked * penalty)
    return logits.scatter(0, seen, picked)


def mask_top_k(logits: "torch.Tensor", k: int) -> "torch.Tensor":
    """Keep the k largest logits (ties at the k-th value kept), -inf elsewhere. logits: [V]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: "torch.Tensor", p: float) -> "torch.Tensor":
    """Keep the smallest set of most likely tokens whose probability reaches p. logits: [V]."""
    import torch

    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)  # [V], [V]
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    # Drop a token when the mass before it already reaches p; the most likely token always stays.
    drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def mask_min_p(logits: "torch.Tensor", min_p: float) -> "torch.Tensor":
    """Drop tokens whose probability is below min_p times the top token's. logits: [V]."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), float("-inf"))


def logits_to_probs(
    logits: "torch.Tensor",
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> "torch.Tensor":
    """The distribution to draw the next token from. logits: [V] -> probs: [V] float32.

    temperature must be > 0 here; greedy decoding never calls this.
    """
    logits = logits.float() / max(temperature, 1e-5)
    logits = mask_top_k(logits, top_k)
    logits = mask_top_p(logits, top_p)
    logits = mask_min_p(logits, min_p)
    return logits.softmax(-1)


def multinomial(probs: "torch.Tensor", generator: "torch.Generator | None") -> int:
    """One draw from probs: [V]. Exponential race (gpt-fast), seeded by `generator`."""
    import torch

    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return int((probs / noise).argmax())


def sample(
    logits: "torch.Tensor",
    params: "SamplingParams",
    *,
    seen: "torch.Tensor",
    generator: "torch.Generator | None" = None,
) -> int:
    """The next token id for logits: [V] under `params`; `seen`: [N] ids for the penalty."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy:
        return int(logits.argmax())
    probs = logits_to_probs(
        logits,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
    )
    return multinomial(probs, generator)
