"""The text-only pass of PGPO (docs/pgpo_spec.md section 1): the same sequence, blind to every visual token.

Two equivalent forms:

* **drop** (default, cheap): remove the visual tokens from the sequence but keep every remaining token's original
  3-D position ids, and skip the vision tower. Attention then sees the same keys with the same rotary phases as
  in the masked form, so the text tokens' logits are identical, and the pass is shorter by the image tokens.
* **mask** (verification): keep the full sequence (image features included) with an attention mask under which
  no token attends to a visual token (each visual token may still attend to itself, so no softmax row is empty).
  Works with the local layer spec; it is what the cheap form is tested against.

Neither renumbers positions, and neither feeds a blank image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TextOnlyBatch:
    """A batch with its visual tokens removed, right-padded to the longest remaining row.

    input_ids: ``[B, S']``; position_ids: ``[3, B, S']`` (the original ids of the kept tokens);
    source_index: ``[B, S']`` original position of each kept token (-1 on padding); valid: ``bool[B, S']``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source_index: torch.Tensor
    valid: torch.Tensor

    def select(self, mask: torch.Tensor) -> torch.Tensor:
        """``bool[B, S']``: the kept tokens where ``mask [B, S]`` (on the original positions) is True, e.g. the
        response mask in this batch's coordinates (visual tokens are never response tokens, so the order of the
        selected tokens is the same in both)."""
        return self.valid & mask.gather(1, self.source_index.clamp(min=0))

    def restore(self, values: torch.Tensor, seq_len: int, fill: float = 0.0) -> torch.Tensor:
        """Put per-token ``values [B, S', ...]`` back at their original positions: ``[B, seq_len, ...]``, with
        ``fill`` at the visual (dropped) and padded positions."""
        out = values.new_full((values.shape[0], seq_len, *values.shape[2:]), fill)
        b, j = torch.nonzero(self.valid, as_tuple=True)
        out[b, self.source_index[b, j]] = values[b, j]
        return out


def drop_visual_tokens(input_ids: torch.Tensor, position_ids: torch.Tensor, image_mask: torch.Tensor,
                       pad_token_id: int = 0, attention_mask: Optional[torch.Tensor] = None) -> TextOnlyBatch:
    """Remove the positions where ``image_mask [B, S]`` is True, keeping the original ``position_ids [3, B, S]``.

    ``attention_mask [B, S]`` (0 on padding), if given, drops the padding too, so ``valid`` marks real tokens only.
    """
    keep = ~image_mask.bool()
    if attention_mask is not None:
        keep &= attention_mask.bool()
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    batch = input_ids.shape[0]
    slot = torch.cumsum(keep.long(), dim=1) - 1  # destination column of each kept token
    b, s = torch.nonzero(keep, as_tuple=True)
    dest = slot[b, s]
    new_ids = input_ids.new_full((batch, width), pad_token_id)
    new_ids[b, dest] = input_ids[b, s]
    new_pos = position_ids.new_zeros((3, batch, width))
    new_pos[:, b, dest] = position_ids[:, b, s]
    # Padding continues each row's last position so rotary phases stay in range (it is never attended to by
    # real tokens: the mask is causal and padding is at the end).
    last = new_pos.gather(2, (counts.clamp(min=1) - 1).view(1, batch, 1).expand(3, batch, 1))
    pad = torch.arange(width, device=input_ids.device)[None, :] >= counts[:, None]
    new_pos = torch.where(pad[None], last + 1, new_pos)
    source = torch.full((batch, width), -1, dtype=torch.long, device=input_ids.device)
    source[b, dest] = s
    return TextOnlyBatch(new_ids, new_pos, source, ~pad)


def visual_blind_attention_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """``bool[B, 1, S, S]`` for Megatron (True = may NOT attend): causal, and no query attends to a visual key
    other than itself."""
    batch, seq = image_mask.shape
    causal = torch.ones(seq, seq, dtype=torch.bool, device=image_mask.device).tril()
    visual_key = image_mask.bool()[:, None, :]  # [B, 1, S] over keys
    allowed = causal[None] & ~visual_key
    allowed |= torch.eye(seq, dtype=torch.bool, device=image_mask.device)[None]
    return ~allowed[:, None]
