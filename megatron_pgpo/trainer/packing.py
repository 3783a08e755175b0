"""Shared-prompt packing: the responses to one prompt in one row, with the prompt (and its image) once.

The ``rollout.n`` responses of a group share their prompt: the same token ids and the same image. Unpacked, the
scoring pass runs that prompt, and the vision tower on its image, once per response. Packed, a row is

    [ prompt | response_1 | response_2 | ... | response_k | padding ]

with an attention mask under which every response token sees the prompt and the earlier tokens of its own
response only, and with every token's original 3-D position ids (each response starts at the position right
after the prompt, as in its own row). Each response token therefore meets exactly the keys and rotary phases it
meets in its own row, so its logits are the same, while the prompt is computed once per group. Prefix Grouper
(Liu et al., 2025) applies the same idea to GRPO training.

The text-only variant of a micro-batch packs the same way (its prompts have the visual tokens dropped, positions
kept), so PGPO's text-only rows shrink by the same factor.

Needs an attention that takes an arbitrary mask: Megatron's local layer spec does; Transformer Engine's fused
causal attention does not, so the TE spec keeps one row per response (``sharing_supported``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence, Tuple

import torch


@dataclass
class PackedRows:
    """Packed rows of one variant of a micro-batch (``R`` rows of width ``L``).

    input_ids ``[R, L]``; position_ids ``[3, R, L]``; segment ``[R, L]`` (0 = prompt, ``j >= 1`` = the row's
    ``j``-th response, -1 = padding); image_mask ``bool[R, L]``; row_of ``[B]``: the packed row of each original
    sequence; column ``[B, S]``: the packed column of each of its tokens (-1 where the token does not exist);
    members: the original sequences of each row (the first one's prompt and images are the row's).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    image_mask: torch.Tensor
    row_of: torch.Tensor
    column: torch.Tensor
    members: List[List[int]]

    def positions_of(self, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(row, column)`` of the original tokens ``(rows [N], cols [N])``."""
        packed_cols = self.column[rows, cols]
        if bool((packed_cols < 0).any()):
            raise ValueError("a requested token is not part of the packed rows")
        return self.row_of[rows], packed_cols


def pack_shared_prompts(input_ids: torch.Tensor, position_ids: torch.Tensor, image_mask: torch.Tensor,
                        lengths: Sequence[int], prompt_lengths: Sequence[int], keys: Sequence[Hashable],
                        width_multiple: int = 1) -> PackedRows:
    """Pack the right-padded rows ``input_ids [B, S]`` (``position_ids [3, B, S]``, ``image_mask bool[B, S]``).

    Rows with equal ``keys[b]`` share one packed row; they must have the same first ``prompt_lengths[b]`` tokens
    (checked). ``lengths[b]``: real tokens of row ``b``. The width is rounded up to ``width_multiple``.
    """
    batch = input_ids.shape[0]
    members: dict = {}
    for b in range(batch):
        members.setdefault(keys[b], []).append(b)
    groups = list(members.values())
    widths = []
    for group in groups:
        first, prompt = group[0], prompt_lengths[group[0]]
        for b in group[1:]:
            if prompt_lengths[b] != prompt or not torch.equal(input_ids[b, :prompt], input_ids[first, :prompt]):
                raise ValueError(f"sequences {first} and {b} share a key but not their prompt")
        widths.append(prompt + sum(lengths[b] - prompt_lengths[b] for b in group))
    width = -(-max(widths, default=1) // width_multiple) * width_multiple
    rows = len(groups)
    ids = input_ids.new_zeros((rows, width))
    pos = position_ids.new_zeros((3, rows, width))
    segment = torch.full((rows, width), -1, dtype=torch.long)
    img = torch.zeros((rows, width), dtype=torch.bool)
    row_of = torch.empty(batch, dtype=torch.long)
    column = torch.full(input_ids.shape, -1, dtype=torch.long)
    for r, group in enumerate(groups):
        first, prompt = group[0], prompt_lengths[group[0]]
        ids[r, :prompt] = input_ids[first, :prompt]
        pos[:, r, :prompt] = position_ids[:, first, :prompt]
        img[r, :prompt] = image_mask[first, :prompt]
        segment[r, :prompt] = 0
        cursor = prompt
        for j, b in enumerate(group, start=1):
            start, end = prompt_lengths[b], lengths[b]
            span = slice(cursor, cursor + end - start)
            ids[r, span] = input_ids[b, start:end]
            pos[:, r, span] = position_ids[:, b, start:end]
            segment[r, span] = j
            row_of[b] = r
            column[b, :start] = torch.arange(start)
            column[b, start:end] = torch.arange(span.start, span.stop)
            cursor = span.stop
        # Padding continues the last position (never attended to by a real token).
        pos[:, r, cursor:] = pos[:, r, cursor - 1:cursor] + 1 if cursor else 0
    return PackedRows(ids, pos, segment, img, row_of, column, groups)


def shared_prompt_mask(segment: torch.Tensor) -> torch.Tensor:
    """``bool[R, 1, L, L]`` for Megatron (True = may NOT attend) from ``segment [R, L]``: causal, and a response
    token attends to the prompt and its own response only; a padding query attends to itself only."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal[None] & ((key == 0) | (key == query)) & (query >= 0) & (key >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device)[None]
    return ~allowed[:, None]


def stack_packed(first: PackedRows, second: PackedRows, width_multiple: int = 1):
    """Rows of ``first`` then ``second``, right-padded to one width: ``(input_ids [R1+R2, L],
    position_ids [3, R1+R2, L], image_mask bool[R1+R2, L], attention_mask bool[R1+R2, 1, L, L])``."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])
    width = -(-width // width_multiple) * width_multiple

    def widen(p: PackedRows):
        pad = width - p.input_ids.shape[1]
        pos = torch.nn.functional.pad(p.position_ids, (0, pad), mode="replicate") if pad else p.position_ids
        return (torch.nn.functional.pad(p.input_ids, (0, pad)), pos,
                torch.nn.functional.pad(p.image_mask, (0, pad)), torch.nn.functional.pad(p.segment, (0, pad), value=-1))

    a, b = widen(first), widen(second)
    segment = torch.cat([a[3], b[3]])
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]], dim=1), torch.cat([a[2], b[2]]), shared_prompt_mask(segment)


def sharing_supported(transformer_impl: str) -> bool:
    """Whether the layer spec's attention honours an arbitrary mask (see the module docstring)."""
    return transformer_impl == "local"


def images_of(members: Sequence[Sequence[int]], image_counts: Sequence[int], pixel_values: Optional[torch.Tensor],
              image_grid_thw: Optional[torch.Tensor]):
    """``(pixel_values, image_grid_thw)`` of each packed row's first sequence, in row order, out of a micro-batch's
    concatenation (``image_counts[b]`` images for sequence ``b``; image ``i`` has ``image_grid_thw[i].prod()``
    patches), or ``(None, None)`` when there are none. Raises ``ValueError`` if another sequence of a row has
    different images (a prompt is shared only with its own image)."""
    if pixel_values is None or not any(image_counts):
        return None, None
    image_start = [0]
    for count in image_counts:
        image_start.append(image_start[-1] + count)
    patches = image_grid_thw.prod(dim=1)
    patch_start = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()

    def pixels(b):
        return pixel_values[patch_start[image_start[b]]: patch_start[image_start[b + 1]]]

    for row in members:
        for b in row[1:]:
            if not (torch.equal(image_grid_thw[image_start[b]: image_start[b + 1]],
                                image_grid_thw[image_start[row[0]]: image_start[row[0] + 1]])
                    and torch.equal(pixels(b), pixels(row[0]))):
                raise ValueError(f"sequences {row[0]} and {b} share a prompt key but not their images")
    firsts = [row[0] for row in members]
    images = [i for b in firsts for i in range(image_start[b], image_start[b + 1])]
    if not images:
        return None, None
    return torch.cat([pixels(b) for b in firsts]), image_grid_thw[images]
