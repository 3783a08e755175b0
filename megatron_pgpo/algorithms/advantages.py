"""Group-normalised outcome advantages (GRPO / DAPO) and DAPO's group filter.

Every response ``i`` of a prompt's group ``g`` gets one scalar advantage

    A_i = (R_i - mean_g R) / (std_g R + eps)        (``scale_by_std=True``, GRPO / DAPO)
    A_i =  R_i - mean_g R                           (``scale_by_std=False``, Dr. GRPO style)

where ``std_g`` is the *sample* standard deviation (Bessel-corrected, torch's default, as verl and EasyR1 compute
it). A group of one response has advantage 0 (its own mean). Groups are identified by arbitrary integer ids and
need not be contiguous or sorted.

The ``grpo`` advantage shaper broadcasts ``A_i`` to every valid token of the response; ``pgpo`` (in ``pgpo.py``)
reweights it per token.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .registry import ADVANTAGE_SHAPERS


def _group_index(group_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Map arbitrary group ids ``[B]`` to dense indices ``[B]`` in ``0..G-1``; returns (index, G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max().item()) + 1 if index.numel() else 0


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-response group statistics, computed in float64.

    Args:
        rewards: ``[B]`` scalar reward of each response.
        group_ids: ``[B]`` integer id of the prompt each response answers.

    Returns:
        ``(mean [B], sample_std [B], group_size [B])``, each the statistic of the response's group, broadcast back
        to the response. ``sample_std`` is 0 for groups of one.
    """
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must have equal shape")
    index, num_groups = _group_index(group_ids)
    r = rewards.detach().to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r) / count
    centred = r - mean[index]
    sq = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, centred * centred)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return mean[index], var.sqrt()[index], count[index]


def group_normalized_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO/DAPO outcome advantage of each response.

    Args:
        rewards: ``[B]`` rewards.
        group_ids: ``[B]`` group (prompt) id of each response.
        eps: added to the group std before dividing.
        scale_by_std: divide by the group's sample std (GRPO/DAPO); False keeps only the mean-centring.

    Returns:
        ``[B]`` advantages in ``rewards``' floating dtype (float32 for integer rewards); 0 for groups of one.
    """
    mean, std, count = group_stats(rewards, group_ids)
    adv = rewards.detach().to(torch.float64) - mean
    if scale_by_std:
        adv = adv / (std + eps)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(out_dtype)


def dapo_keep_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling filter: ``bool[B]``, False for every response of a group whose rewards are all equal.

    Such groups (all right or all wrong) have zero advantage everywhere and only dilute the batch. A group of one
    response is "all equal" too.
    """
    index, num_groups = _group_index(group_ids)
    r = rewards.detach().to(torch.float64)
    hi = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, index, r, reduce="amax"
    )
    lo = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, index, r, reduce="amin"
    )
    return (hi > lo)[index]


def _check_mask(seq_advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    if seq_advantages.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != seq_advantages.shape[0]:
        raise ValueError(
            f"expected seq_advantages [B] and response_mask [B, T], got {tuple(seq_advantages.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    return response_mask.bool()


@ADVANTAGE_SHAPERS.register("grpo")
def grpo_token_advantages(
    seq_advantages: torch.Tensor, response_mask: torch.Tensor, *, scores: Optional[torch.Tensor] = None, **_unused
) -> torch.Tensor:
    """GRPO/DAPO: every valid token of response ``i`` carries ``A_i``; padded positions 0.

    Args:
        seq_advantages: ``[B]`` response advantages.
        response_mask: ``[B, T]``, nonzero on the response's valid tokens.
        scores: ignored (accepted so that every shaper has the same call signature).

    Returns:
        ``[B, T]`` token advantages.
    """
    mask = _check_mask(seq_advantages, response_mask)
    return seq_advantages[:, None] * mask.to(seq_advantages.dtype)
