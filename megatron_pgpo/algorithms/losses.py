"""Policy losses: the clipped surrogate (PPO / GRPO / DAPO clip-higher), loss aggregation, and the optional
KL-to-reference penalty and entropy bonus (verl's actor: ``pg_loss - entropy_coeff * entropy + kl_coef * kl``, each
term aggregated the same way).

A loss receives per-token log-probs, never logits: turning vocab-parallel logits into log-probs happens before it
(``megatron_pgpo.parallel``), so nothing here knows about tensor parallelism.

Aggregations (how per-token losses ``l[B, T]`` become one scalar):

* ``token-mean`` (DAPO): ``sum(l * m) / N`` with ``N`` the number of valid tokens. Under data parallelism and
  micro-batching pass ``global_num_tokens`` = the valid tokens of the whole global mini-batch, so that summing the
  micro-batch losses of every rank gives the global token mean exactly.
* ``seq-mean-token-mean`` (GRPO as published): mean over responses of each response's token mean; pass
  ``global_num_seqs`` likewise. Responses without valid tokens are left out.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .registry import POLICY_LOSSES

#: Log-ratios are clamped to this range before ``exp`` (as verl does) so a stale token cannot overflow.
LOG_RATIO_CLAMP = 20.0

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def aggregate_loss(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    aggregation: str = "token-mean",
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> torch.Tensor:
    """Reduce ``token_loss [B, T]`` over the valid tokens of ``response_mask [B, T]`` to a scalar.

    ``global_num_tokens`` / ``global_num_seqs`` replace the local denominators (see module docstring). With no
    valid token at all the result is 0 (with a gradient path), never NaN.
    """
    mask = response_mask.to(token_loss.dtype)
    if aggregation == "token-mean":
        denom = mask.sum() if global_num_tokens is None else torch.as_tensor(global_num_tokens, dtype=token_loss.dtype)
        return (token_loss * mask).sum() / denom.clamp(min=1.0)
    if aggregation == "seq-mean-token-mean":
        lengths = mask.sum(dim=-1)
        per_seq = (token_loss * mask).sum(dim=-1) / lengths.clamp(min=1.0)
        has_tokens = (lengths > 0).to(token_loss.dtype)
        denom = has_tokens.sum() if global_num_seqs is None else torch.as_tensor(global_num_seqs, dtype=token_loss.dtype)
        return (per_seq * has_tokens).sum() / denom.clamp(min=1.0)
    raise KeyError(f"unknown loss aggregation {aggregation!r}; valid names: {', '.join(AGGREGATIONS)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over nonzero ``mask`` entries (0 when the mask is empty)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


@POLICY_LOSSES.register("clipped")
def clipped_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: str = "token-mean",
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    entropy_penalty: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped surrogate ``L = -agg min(rho A~, clip(rho, 1 - clip_low, 1 + clip_high) A~)``, ``rho = exp(logp -
    old_logp)``. ``clip_low == clip_high`` is PPO/GRPO; DAPO's clip-higher uses ``0.2 / 0.28``.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with gradient).
        old_logp: ``[B, T]`` log-probs under the policy that sampled them (no gradient).
        advantages: ``[B, T]`` token advantages (GRPO broadcast or PGPO's ``A~``).
        response_mask: ``[B, T]``, nonzero on valid response tokens.
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        aggregation: ``token-mean`` or ``seq-mean-token-mean``.
        global_num_tokens, global_num_seqs: global denominators (see ``aggregate_loss``).
        ref_logp, kl_coef, kl_estimator: with ``kl_coef > 0``, ``+ kl_coef * agg reference_kl(logp, ref_logp)``
            (``[B, T]`` log-probs under the frozen reference policy; ``k1`` / ``k2`` / ``k3`` as verl's
            ``kl_loss_type``); metric ``kl_ref``.
        entropy, entropy_coef: with ``entropy_coef > 0``, ``- entropy_coef * agg entropy`` (``[B, T]`` entropy of
            the current policy, with gradient); metric ``entropy``.
        entropy_penalty: with ``> 0``, ``+ entropy_penalty * agg(-logp)``: PAPO's and VPPO's entropy penalty (the
            sampled-token estimate of the entropy, lowered); metric ``nll``.

    Returns:
        ``(loss, metrics)``; metrics are detached 0-d tensors, token means over valid tokens of this batch:
        ``clip_fraction`` (tokens where the clipped term is the one used), ``clip_fraction_low`` /
        ``clip_fraction_high`` (split by side), ``approx_kl`` (k3 estimate of KL(old || new), >= 0),
        ``ratio_mean``, ``ratio_max``.
    """
    if not (logp.shape == old_logp.shape == advantages.shape == response_mask.shape):
        raise ValueError(
            "logp, old_logp, advantages and response_mask must share one [B, T] shape; got "
            f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(advantages.shape)}, {tuple(response_mask.shape)}"
        )
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    mask = response_mask.bool()
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)

    def agg(values: torch.Tensor) -> torch.Tensor:  # every term reduced the same way
        return aggregate_loss(values, mask, aggregation, global_num_tokens, global_num_seqs)

    loss = agg(token_loss)
    extra: Dict[str, torch.Tensor] = {}
    if kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp [B, T] (the reference policy's log-probs)")
        kl = reference_kl(logp, ref_logp, kl_estimator)
        loss = loss + kl_coef * agg(kl)
        extra["kl_ref"] = masked_mean(kl.detach(), mask)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy [B, T] (the current policy's, with gradient)")
        loss = loss - entropy_coef * agg(entropy)
        extra["entropy"] = masked_mean(entropy.detach(), mask)
    if entropy_penalty > 0:
        loss = loss + entropy_penalty * agg(-logp)
        extra["nll"] = masked_mean(-logp.detach(), mask)

    with torch.no_grad():
        used_clip = clipped > unclipped
        metrics = {
            "clip_fraction": masked_mean(used_clip.float(), mask),
            "clip_fraction_low": masked_mean((used_clip & (ratio < 1.0)).float(), mask),
            "clip_fraction_high": masked_mean((used_clip & (ratio > 1.0)).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, torch.zeros_like(ratio)).max() if mask.any() else ratio.new_zeros(()),
            **extra,
        }
    return loss, metrics


KL_ESTIMATORS = ("k1", "k2", "k3")


def reference_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens (GRPO's optional penalty), ``[B, T]``.

    ``k1 = log pi - log pi_ref``; ``k2 = (k1)^2 / 2``; ``k3 = exp(-k1) - 1 + k1`` (>= 0, unbiased, GRPO's choice).
    Gradients flow through ``logp``.
    """
    log_ratio = (logp - ref_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise KeyError(f"unknown KL estimator {estimator!r}; valid names: {', '.join(KL_ESTIMATORS)}")
