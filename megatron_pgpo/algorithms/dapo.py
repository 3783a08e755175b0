"""DAPO's length handling: overlong filtering and the soft overlong penalty (DAPO paper, section 3.4).

Both act on whole responses; the group filter of dynamic sampling is ``advantages.dapo_keep_groups``.
"""
from __future__ import annotations

import torch


def overlong_soft_penalty(
    response_lengths: torch.Tensor, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward.

    With ``L_max = max_response_length`` and ``L_cache = buffer_length``:
    0 for ``|y| <= L_max - L_cache``; ``-penalty_factor * (|y| - (L_max - L_cache)) / L_cache`` inside the buffer;
    ``-penalty_factor`` at and beyond ``L_max``.

    Args:
        response_lengths: ``[B]`` number of generated tokens of each response.

    Returns:
        ``[B]`` float32 penalties (<= 0).
    """
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length must be in (0, max_response_length={max_response_length}], got {buffer_length}")
    start = max_response_length - buffer_length
    over = (response_lengths.to(torch.float32) - start).clamp(min=0.0, max=float(buffer_length))
    return -penalty_factor * over / buffer_length


def overlong_filter_mask(finish_truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: ``[B]`` float mask, 0 for responses cut at the length limit, to multiply into their
    token loss mask (they are neither rewarded nor punished for an unfinished answer)."""
    return (~finish_truncated.bool()).to(torch.float32)
