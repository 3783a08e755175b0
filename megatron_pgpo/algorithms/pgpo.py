"""PGPO: Perception-Grounded Policy Optimization (arXiv 2604.01840), per-token advantage reshaping.

How PGPO differs from GRPO/DAPO, in order:

1. GRPO gives every token of response ``i`` the same advantage ``A_i``. PGPO keeps ``A_i`` (group-normalised,
   unchanged) but hands it out unevenly: tokens that depend on the image get more, the rest less.
2. The dependency of token ``t`` is ``S_t = KL(pi(.|s_t, I) || pi(.|s_t))``, the divergence between the policy with
   and without the image (``visual_dependency.py``), computed once per rollout batch with the old policy.
3. Per response, over its valid tokens only: ``S~ = log(1 + S)`` (Eq. 4) tames the heavy tail; min-max
   normalisation ``I = (S~ - min) / (max - min + eps)`` (Eq. 5) makes scores comparable across responses; a
   threshold gate (Eq. 6) suppresses tokens below ``tau`` (``w = I / tau`` in ``[0, 1)``) and boosts those at or
   above it (``w = 1 + beta (I - tau) / (1 - tau)`` in ``[1, 1 + beta]``).
4. Eq. 7 rescales the weights to sum to the response length, so a response's *mean* token advantage is still
   ``A_i``: PGPO moves credit between tokens of one response, never between responses.
5. Degenerate responses (one token, all scores equal: the weights sum to ``<= eps``) fall back to weight 1, i.e.
   plain GRPO/DAPO for that response. No NaN or inf ever leaves; padded positions get weight 0.

Everything else (clipped surrogate, token-mean aggregation, DAPO sampling) is unchanged: the loss just reads
``A~[B, T]`` where GRPO would read ``A[B]`` broadcast.

The paper's ablations are registered shapers of their own (``GATES``, ``normalize``): ``pgpo_suppression_only``
(tokens below ``tau`` suppressed, the rest at weight 1), ``pgpo_boosting_only`` (tokens at or above ``tau``
boosted, the rest at 1), both with Eq. 7; ``pgpo_no_normalization`` (the full gate, Eq. 7 skipped: a response's
mean token advantage is then no longer ``A_i``). The degenerate-response rule holds in all of them.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import ADVANTAGE_SHAPERS
from .visual_dependency import DEFAULT_S_MAX, sanitize_scores


def _validate(scores: torch.Tensor, response_mask: torch.Tensor, tau: float, beta: float, eps: float) -> None:
    if scores.dim() != 2 or scores.shape != response_mask.shape:
        raise ValueError(
            f"expected scores and response_mask of equal shape [B, T], got {tuple(scores.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")


def normalized_importance(scores: torch.Tensor, response_mask: torch.Tensor, eps: float = 1e-6,
                          s_max: float = DEFAULT_S_MAX) -> torch.Tensor:
    """Eqs. 4-5: per-response min-max normalised ``log(1 + S)`` over valid tokens, ``[B, T]`` float64 in ``[0, 1)``.

    Scores are sanitised first (NaN -> 0, clamp ``[0, s_max]``). Padded positions are 0.
    """
    mask = response_mask.bool()
    clean, _ = sanitize_scores(scores.to(torch.float64), s_max=s_max)
    s_tilde = torch.log1p(clean)
    lo = torch.where(mask, s_tilde, torch.full_like(s_tilde, torch.inf)).amin(dim=-1, keepdim=True)
    hi = torch.where(mask, s_tilde, torch.full_like(s_tilde, -torch.inf)).amax(dim=-1, keepdim=True)
    # All-padding rows have lo = inf, hi = -inf: give them a harmless range; their positions are masked anyway.
    empty = ~mask.any(dim=-1, keepdim=True)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    importance = (s_tilde - lo) / (hi - lo + eps)
    return torch.where(mask, importance, torch.zeros_like(importance))


#: Which branches of Eq. 6 a gate keeps: ``both`` (PGPO), ``suppress`` (at or above ``tau``: 1), ``boost`` (below
#: ``tau``: 1).
GATES = ("both", "suppress", "boost")


def threshold_gate(importance: torch.Tensor, tau: float = 0.4, beta: float = 2.0, eps: float = 1e-6,
                   gate: str = "both") -> torch.Tensor:
    """Eq. 6, elementwise: ``I / (tau + eps)`` below ``tau``; ``1 + beta (I - tau) / (1 - tau + eps)`` at or above.
    ``gate`` (``GATES``) replaces one branch by 1 for the paper's ablations."""
    if gate not in GATES:
        raise ValueError(f"gate {gate!r}: valid: {', '.join(GATES)}")
    below = importance / (tau + eps) if gate != "boost" else torch.ones_like(importance)
    above = 1.0 + beta * (importance - tau) / (1.0 - tau + eps) if gate != "suppress" else torch.ones_like(importance)
    return torch.where(importance < tau, below, above)


def pgpo_token_weights(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    s_max: float = DEFAULT_S_MAX,
    gate: str = "both",
    normalize: bool = True,
) -> torch.Tensor:
    """PGPO token weights ``w~`` (Eqs. 4-7 with the spec's sanitising and degenerate-response rules).

    Args:
        scores: ``[B, T]`` visual-dependency scores ``S`` (any values: NaN, inf and negatives are sanitised).
        response_mask: ``[B, T]``, nonzero on each response's valid tokens.
        tau: gate threshold in ``[0, 1]``; ``tau = 1`` only suppresses, ``tau = 0`` only boosts.
        beta: boost strength (>= 0).
        eps: stabiliser of Eqs. 5-7; also the degenerate-response threshold on the weight sum.
        s_max: clamp applied to ``S`` before Eq. 4.
        gate: ``both`` (PGPO), or an ablation's single branch (``GATES``).
        normalize: Eq. 7 (False: the ``pgpo_no_normalization`` ablation, weights straight from Eq. 6).

    Returns:
        ``[B, T]`` weights, float32 (float64 for float64 scores). Each response's weights sum to its valid length
        (with ``normalize``); padded positions are 0; degenerate responses get 1 on every valid token.
    """
    _validate(scores, response_mask, tau, beta, eps)
    mask = response_mask.bool()
    maskf = mask.to(torch.float64)
    gated = threshold_gate(normalized_importance(scores, mask, eps=eps, s_max=s_max), tau, beta, eps, gate) * maskf
    total = gated.sum(dim=-1, keepdim=True)
    length = maskf.sum(dim=-1, keepdim=True)
    degenerate = total <= eps
    scaled = gated * length / torch.where(degenerate, torch.ones_like(total), total) if normalize else gated
    weights = torch.where(degenerate, maskf, scaled)
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return weights.to(out_dtype)


def pgpo_advantages(
    seq_advantages: torch.Tensor,
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    s_max: float = DEFAULT_S_MAX,
    gate: str = "both",
    normalize: bool = True,
) -> torch.Tensor:
    """Eq. 8: ``A~[B, T] = A[B, None] * w~[B, T]``; padded positions 0. See ``pgpo_token_weights``."""
    if seq_advantages.dim() != 1 or seq_advantages.shape[0] != scores.shape[0]:
        raise ValueError(f"seq_advantages must be [B={scores.shape[0]}], got {tuple(seq_advantages.shape)}")
    weights = pgpo_token_weights(scores, response_mask, tau=tau, beta=beta, eps=eps, s_max=s_max, gate=gate,
                                 normalize=normalize)
    return seq_advantages.to(weights.dtype)[:, None] * weights


def _register(name: str, gate: str = "both", normalize: bool = True):
    """Register a PGPO shaper (the method or one of its ablations) that needs ``scores [B, T]``."""

    def shaper(seq_advantages: torch.Tensor, response_mask: torch.Tensor, *, scores: Optional[torch.Tensor] = None,
               tau: float = 0.4, beta: float = 2.0, eps: float = 1e-6, s_max: float = DEFAULT_S_MAX,
               **_unused) -> torch.Tensor:
        if scores is None:
            raise ValueError(f"the {name!r} advantage shaper needs visual-dependency scores [B, T]; got scores=None")
        return pgpo_advantages(seq_advantages, scores, response_mask, tau=tau, beta=beta, eps=eps, s_max=s_max,
                               gate=gate, normalize=normalize)

    shaper.__name__ = shaper.__qualname__ = f"{name}_shaper"
    shaper.__doc__ = f"Registry entry {name!r}: gate {gate!r}, Eq. 7 {'on' if normalize else 'off'}."
    shaper.second_view = "text_only"  # the trainer runs the text-only pass (which computes ``scores``)
    return ADVANTAGE_SHAPERS.register(name)(shaper)


pgpo_shaper = _register("pgpo")
pgpo_suppression_only_shaper = _register("pgpo_suppression_only", gate="suppress")
pgpo_boosting_only_shaper = _register("pgpo_boosting_only", gate="boost")
pgpo_no_normalization_shaper = _register("pgpo_no_normalization", normalize=False)
