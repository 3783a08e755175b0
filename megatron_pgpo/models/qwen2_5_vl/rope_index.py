"""3-D multimodal RoPE position ids of Qwen2.5-VL, computed exactly as transformers does (images only).

Text tokens count up by one on all three axes. An image of ``grid_thw = (t, h, w)`` patches becomes
``t * (h/m) * (w/m)`` tokens (``m`` = spatial merge size) whose (temporal, height, width) ids are
``start + (t_i, h_i, w_i)``; the text after it resumes at ``start + max(h, w) / m`` (transformers 5.x).

Why our own copy: transformers' ``get_rope_index`` is a model method, needs ``mm_token_type_ids`` (without them
the model silently falls back to 1-D positions), and renumbers positions when given a 2-D attention mask. We need
the ids from the full sequence, for both passes, without a transformers model.
"""
from __future__ import annotations

from typing import Optional

import torch


def image_token_mask(input_ids: torch.Tensor, image_token_id: int, prompt_lengths: Optional[torch.Tensor] = None):
    """``bool[B, S]``: positions holding an image placeholder token.

    With ``prompt_lengths [B]`` only prompt positions count: a sampled response may emit ``<|image_pad|>`` as text
    (docs/pgpo_spec.md section 6), which is never an image slot.
    """
    mask = input_ids == image_token_id
    if prompt_lengths is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask &= positions[None, :] < prompt_lengths.to(input_ids.device)[:, None]
    return mask


def get_rope_index(
    input_ids: torch.Tensor,
    image_mask: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor],
    spatial_merge_size: int = 2,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Position ids ``[3, B, S]`` (int64).

    Args:
        input_ids: ``[B, S]`` token ids (only the shape and device are used).
        image_mask: ``bool[B, S]`` image placeholder positions (see ``image_token_mask``); each contiguous run is one
            image, consumed in order from ``image_grid_thw``.
        image_grid_thw: ``[num_images, 3]`` patch grid of every image in the batch, in order; None if no image.
        spatial_merge_size: the vision merger's ``spatial_merge_size``.
        attention_mask: optional ``[B, S]``, 0 on padding: padding gets position 0 (as transformers) and is skipped.

    Raises:
        ValueError if an image run's length does not match its grid.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    out = torch.zeros(3, batch, seq, dtype=torch.long, device=device)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool, device=device)
        kept_idx = torch.nonzero(keep, as_tuple=True)[0]
        is_image = image_mask[b][kept_idx].tolist()
        pieces, pos, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(torch.arange(j - i, device=device).expand(3, -1) + pos)
                pos += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError("more image placeholder runs than rows in image_grid_thw") from None
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                if t * gh * gw != j - i:
                    raise ValueError(f"an image run of {j - i} tokens does not match grid {(t, h, w)} "
                                     f"({t * gh * gw} tokens after {spatial_merge_size}x{spatial_merge_size} merge)")
                tt, hh, ww = torch.meshgrid(torch.arange(t, device=device), torch.arange(gh, device=device),
                                            torch.arange(gw, device=device), indexing="ij")
                pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
                pos += max(h, w) // spatial_merge_size
            i = j
        if pieces:
            out[:, b, kept_idx] = torch.cat(pieces, dim=1)
    return out
