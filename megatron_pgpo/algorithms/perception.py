"""PAPO and VPPO: perception terms from a *masked-image* view, beside PGPO's text-only view.

How they differ from PGPO (and GRPO). All three compare the policy on the real image with a degraded view of it,
at the sampled tokens. PGPO removes the image (text-only pass) and moves each response's advantage between its
tokens (Eq. 7 keeps the mean). The two relatives mask random 14-px patches instead and use the comparison
differently:

* **PAPO** (Perception-Aware Policy Optimization; MikeWangWZHL/PAPO, ``verl/workers/actor/dp_actor.py``) keeps
  GRPO/DAPO's advantages and adds an *implicit perception loss*: the k3 estimate of KL(pi_theta(.|I) ||
  pi_old(.|I_masked)) at each sampled token, clamped to [-10, 10], token-averaged and **maximised** with
  coefficient gamma (0.01 with DAPO, 0.02 with GRPO), so the policy keeps depending on what the mask hides. The
  masked-image log-probs come from the policy before the update, without gradient; the gradient flows through
  the current policy's log-prob. Patches are masked with probability 0.6.
* **VPPO** (huaixuheqing/VPPO-RL, ``dp_actor.py``) scores each token by ``S_t = clamp(k3(pi_old(.|I),
  pi_old(.|I_masked)), 0, 10)`` (mask probability 0.5), keeps the gradient of the top 40 % tokens of each response
  only (the others' advantage is 0; the loss still averages over all valid tokens), and scales each response's
  advantage by ``beta_min + (1 - beta_min) n_i / mean(n)`` where ``n_i`` is its mean score min-max normalised over
  the batch (``beta_min`` 0.9): responses that depend more on the image count more, with mean scale 1.

Both papers also penalise entropy (PAPO 0.03, VPPO 0.06): ``+ c * token-mean(-log pi(sampled token))`` on the current
policy, which lowers it; that term is the clipped loss's ``entropy_penalty`` (``losses.py``). PAPO adds the same
term of the masked view, which carries no gradient and is left out.

Deliberate differences, also in docs/algorithms.md: the mask covers whole 14-px patches of the image the vision
tower sees (rows of ``pixel_values``, set to the normalised value of black), where PAPO masks 14-px squares of the
original image before resizing and VPPO of the resized one; one mask per prompt, seeded by the run's seed, the step
and the prompt (VPPO draws one per response); VPPO's min-max and mean run over each data-parallel rank's whole share
of the rollout batch (its code uses each device's mini-batch for the min-max and each micro-batch for the mean).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .losses import LOG_RATIO_CLAMP, aggregate_loss, clipped_policy_loss, masked_mean
from .registry import ADVANTAGE_SHAPERS, POLICY_LOSSES


# ------------------------------------------------------------------------------------------------ masked view
def black_patch_row(image_mean: Sequence[float], image_std: Sequence[float], row_size: int) -> torch.Tensor:
    """``[D]``: a ``pixel_values`` row of a black patch after the processor's normalisation. Rows are
    channel-major (``C x T x P x P``, Qwen2-VL's ``flatten_patches``), so each channel's block holds
    ``-mean_c / std_c``."""
    channels = len(image_mean)
    if row_size % channels:
        raise ValueError(f"a pixel_values row of {row_size} values does not split into {channels} channels")
    per_channel = row_size // channels
    return torch.cat([torch.full((per_channel,), -m / s) for m, s in zip(image_mean, image_std)])


def mask_patches(pixel_values: torch.Tensor, ratio: float, generator: torch.Generator,
                 fill_row: torch.Tensor) -> torch.Tensor:
    """A copy of ``pixel_values [patches, D]`` with each patch (row) replaced by ``fill_row [D]`` independently
    with probability ``ratio``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    hit = torch.rand(pixel_values.shape[0], generator=generator) < ratio
    out = pixel_values.clone()
    out[hit] = fill_row.to(out.dtype)
    return out


def clamped_k3(logp: torch.Tensor, view_logp: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``clamp(exp(d) - d - 1, low, high)`` with ``d = clamp(view_logp - logp, -20, 20)``: the k3 estimate of
    KL(pi || pi_view) at the sampled token, as PAPO (``[-10, 10]``) and VPPO (``[0, 10]``) clamp it. Gradient
    through ``logp`` only."""
    d = (view_logp.detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(d) - d).clamp(low, high)


# ------------------------------------------------------------------------------------------------ PAPO
@POLICY_LOSSES.register("papo")
def papo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
              *, view_logp: Optional[torch.Tensor] = None, perception_coef: float = 0.01,
              perception_clamp: float = 10.0, **clipped_kwargs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The clipped loss (``clipped_kwargs``) minus ``perception_coef`` x the aggregated ``clamped_k3(logp,
    view_logp, -c, c)``: PAPO's implicit perception loss. ``view_logp [B, T]``: the pre-update policy's log-probs
    of the sampled tokens with the masked image. Metric ``perception_kl``."""
    if view_logp is None:
        raise ValueError("the 'papo' loss needs view_logp [B, T]: the masked-image log-probs of the scoring pass")
    loss, metrics = clipped_policy_loss(logp, old_logp, advantages, response_mask, **clipped_kwargs)
    kl = clamped_k3(logp, view_logp, -perception_clamp, perception_clamp)
    mask = response_mask.bool()
    term = aggregate_loss(kl, mask, clipped_kwargs.get("aggregation", "token-mean"),
                          clipped_kwargs.get("global_num_tokens"), clipped_kwargs.get("global_num_seqs"))
    metrics["perception_kl"] = masked_mean(kl.detach(), mask)
    return loss - perception_coef * term, metrics


#: The scoring pass computes the masked-image view's log-probs for this loss (``view_logp``).
papo_loss.second_view = "masked_image"


# ------------------------------------------------------------------------------------------------ VPPO
def top_fraction_mask(scores: torch.Tensor, response_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """``bool[B, T]``: the ``ceil(fraction x L)`` highest-scoring valid tokens of each response (``L`` its valid
    length); ties go to the earlier token."""
    mask = response_mask.bool()
    keyed = torch.where(mask, scores.to(torch.float64), torch.full_like(scores, -math.inf, dtype=torch.float64))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    k = torch.ceil(mask.sum(dim=-1).to(torch.float64) * fraction).long()
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & mask


def trajectory_scales(scores: torch.Tensor, response_mask: torch.Tensor, beta_min: float) -> torch.Tensor:
    """``[B]``: ``beta_min + (1 - beta_min) n_i / mean(n)``, ``n_i`` = response ``i``'s mean score min-max
    normalised over the batch (responses with valid tokens); all 1 when the scores do not spread (max - min <=
    1e-6) or fewer than two responses have tokens."""
    mask = response_mask.bool()
    lengths = mask.sum(dim=-1)
    valid = lengths > 0
    mean = (scores.to(torch.float64) * mask).sum(dim=-1) / lengths.clamp(min=1)
    scales = torch.ones_like(mean)
    if int(valid.sum()) < 2:
        return scales
    lo, hi = mean[valid].min(), mean[valid].max()
    if float(hi - lo) <= 1e-6:
        return scales
    n = ((mean - lo) / (hi - lo)).clamp(0.0, 1.0)
    mu = n[valid].mean()
    scales[valid] = beta_min + (1.0 - beta_min) * n[valid] / (mu + 1e-8)
    return scales


def vppo_advantages(seq_advantages: torch.Tensor, scores: torch.Tensor, response_mask: torch.Tensor,
                    top_fraction: float = 0.4, beta_min: float = 0.9, score_clamp: float = 10.0) -> torch.Tensor:
    """``[B, T]``: ``A_i x scale_i`` on each response's top-``top_fraction`` tokens by ``clamp(S, 0,
    score_clamp)``, 0 elsewhere (see the module docstring). ``scores [B, T]``: k3 of the image vs masked-image
    view under the old policy."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"beta_min must be in [0, 1], got {beta_min}")
    clean = torch.nan_to_num(scores.to(torch.float64), nan=0.0).clamp(0.0, score_clamp)
    keep = top_fraction_mask(clean, response_mask, top_fraction)
    scale = trajectory_scales(clean, response_mask, beta_min)
    return (seq_advantages.to(torch.float64) * scale)[:, None] * keep


@ADVANTAGE_SHAPERS.register("vppo")
def vppo_shaper(seq_advantages: torch.Tensor, response_mask: torch.Tensor, *, scores: Optional[torch.Tensor] = None,
                vppo_top_fraction: float = 0.4, vppo_beta_min: float = 0.9, vppo_score_clamp: float = 10.0,
                **_unused) -> torch.Tensor:
    """Registry entry for VPPO: ``scores [B, T]`` from the masked-image view are required; called once on the rank's
    whole share of the rollout batch (``whole_batch``: the trajectory scaling normalises over it)."""
    if scores is None:
        raise ValueError("the 'vppo' advantage shaper needs masked-image dependency scores [B, T]; got scores=None")
    out = vppo_advantages(seq_advantages, scores, response_mask, vppo_top_fraction, vppo_beta_min, vppo_score_clamp)
    return out.to(torch.float32 if scores.dtype != torch.float64 else torch.float64)


vppo_shaper.second_view = "masked_image"
vppo_shaper.whole_batch = True
