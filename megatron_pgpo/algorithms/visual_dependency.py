"""Token visual dependency S_t = KL(pi(.|s_t, I) || pi(.|s_t)) (docs/pgpo_spec.md section 1), single-device math.

Two estimators:

* ``k3`` (the paper's default): with ``r = pi_text(x_t) / pi_image(x_t)`` at the sampled token,
  ``S_t ~= (r - 1) - log r``. Needs only the sampled token's log-prob in both passes.
* ``exact``: the full-vocabulary sum ``sum_x p_I(x) (log p_I(x) - log p_T(x))``. ``full_vocab_kl`` here is the
  single-device reference; the tensor-parallel version that never gathers the vocabulary lives in
  ``megatron_pgpo.parallel``.

``sanitize_scores`` applies the spec's rule before the scores reach PGPO's Eq. 4: NaN -> 0, clamp to
``[0, s_max]``, and counts what it changed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

#: Default clamp for visual-dependency scores (docs/pgpo_spec.md section 1, "Sanitising S").
DEFAULT_S_MAX = 1e4


def k3_divergence(logp_image: torch.Tensor, logp_text: torch.Tensor) -> torch.Tensor:
    """Elementwise k3 estimate of KL(p_image || p_text) at the sampled tokens.

    Args:
        logp_image: ``[...]`` log-prob of the sampled token given the image (the sampling policy).
        logp_text: ``[...]`` log-prob of the same token in the text-only pass.

    Returns:
        ``[...]`` in float32 (or float64 for float64 inputs), ``>= 0``. ``expm1(x) - x`` with
        ``x = logp_text - logp_image`` keeps precision for small differences. Edge cases: ``logp_text = -inf``
        (finite image) gives ``+inf``; ``logp_image = -inf`` (finite text) gives ``+inf``; both ``-inf`` gives 0.
    """
    if logp_image.shape != logp_text.shape:
        raise ValueError(f"shape mismatch: logp_image {tuple(logp_image.shape)} vs logp_text {tuple(logp_text.shape)}")
    dtype = torch.float64 if torch.float64 in (logp_image.dtype, logp_text.dtype) else torch.float32
    li, lt = logp_image.to(dtype), logp_text.to(dtype)
    log_r = lt - li
    k3 = (torch.expm1(log_r) - log_r).clamp(min=0.0)
    k3 = torch.where(log_r == torch.inf, torch.full_like(k3, torch.inf), k3)
    both_impossible = (li == -torch.inf) & (lt == -torch.inf)
    return torch.where(both_impossible, torch.zeros_like(k3), k3)


def full_vocab_kl(logits_image: torch.Tensor, logits_text: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || Q) over the last (vocabulary) dimension, P = softmax(logits_image), Q = softmax(logits_text).

    The single-device reference for the vocab-parallel version. Computed in float32 (float64 for float64 input).
    Entries that are ``-inf`` in P contribute 0; a ``-inf`` in Q where P has mass gives ``+inf``.

    Args:
        logits_image: ``[..., V]`` logits of the image-conditioned pass.
        logits_text: ``[..., V]`` logits of the text-only pass.

    Returns:
        ``[...]`` KL per position (not clamped: rounding can leave values of about -1e-7).
    """
    if logits_image.shape != logits_text.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_image.shape)} vs {tuple(logits_text.shape)}")
    dtype = torch.float64 if logits_image.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits_image.to(dtype), dim=-1)
    logq = torch.log_softmax(logits_text.to(dtype), dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def sanitize_scores(
    scores: torch.Tensor, mask: Optional[torch.Tensor] = None, s_max: float = DEFAULT_S_MAX
) -> Tuple[torch.Tensor, torch.Tensor]:
    """NaN -> 0, then clamp to ``[0, s_max]`` (docs/pgpo_spec.md section 1).

    Args:
        scores: ``[...]`` raw visual-dependency scores.
        mask: optional ``[...]`` validity mask; only valid positions are counted.
        s_max: upper clamp.

    Returns:
        ``(clean [...], num_sanitized)``: the cleaned scores (same dtype) and a 0-d int64 count of valid positions
        whose value changed (NaN, +-inf, negative or above ``s_max``).
    """
    if not s_max > 0:
        raise ValueError(f"s_max must be > 0, got {s_max}")
    clean = torch.nan_to_num(scores, nan=0.0, posinf=s_max, neginf=0.0).clamp(min=0.0, max=s_max)
    changed = torch.isnan(scores) | (clean != scores)
    if mask is not None:
        changed = changed & mask.bool()
    return clean, changed.sum()
