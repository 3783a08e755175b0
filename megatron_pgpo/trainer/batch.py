"""From sampled responses to model inputs: padded token tensors, 3-D positions, image slots, the response mask,
and the text-only variant of every sequence.

Label alignment: ``token_logprobs[b, t]`` is the log-prob of ``input_ids[b, t]`` given the tokens before it, read
from the logits at position ``t - 1``. ``response_mask[b, t]`` is True exactly on response tokens (never on prompt,
image or padding positions), so the same mask selects response tokens in the ids and their log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..models.qwen2_5_vl.rope_index import get_rope_index, image_token_mask
from ..models.qwen2_5_vl.text_only import TextOnlyBatch, drop_visual_tokens


@dataclass
class Sample:
    """One sampled response with what training needs to know about it.

    ``prompt_ids`` include the expanded image placeholder tokens; ``pixel_values [patches, C*T*P*P]`` and
    ``image_grid_thw [num_images, 3]`` are the prompt's images (None for a text prompt).
    """

    prompt_ids: List[int]
    response_ids: List[int]
    reward: float = 0.0
    group: int = 0
    truncated: bool = False
    rollout_logprobs: Optional[List[float]] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    answer: str = ""
    extra: dict = field(default_factory=dict)
    masked_pixel_values: Optional[torch.Tensor] = None  # ``pixel_values`` with patches masked (PAPO / VPPO view)
    #: False: no token of it is trained on (the response mask leaves it out), e.g. an empty response, whose one
    #: placeholder token is there only so the row has a shape; its reward still counts in its group's statistics
    trainable: bool = True

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def trained_tokens(self) -> int:
        """Response tokens the loss sees (0 when not ``trainable``)."""
        return len(self.response_ids) if self.trainable else 0


@dataclass
class ModelBatch:
    """Padded inputs of a micro-batch (``B`` sequences, right-padded to ``S``).

    input_ids ``[B, S]``; position_ids ``[3, B, S]``; image_mask ``bool[B, S]`` (prompt image slots);
    response_mask ``bool[B, S]``; pixel_values ``[patches, D]`` / image_grid_thw ``[images, 3]`` (or None);
    text_only: the same sequences without visual tokens (original positions kept); indices: which samples;
    lengths / prompt_lengths: real tokens / prompt tokens of each row; image_counts: images of each row (their
    patches are consecutive in pixel_values); prompt_keys: rows with equal keys share prompt and images (the
    same group), which ``packing.py`` uses to compute a prompt once.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    image_mask: torch.Tensor
    response_mask: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    text_only: TextOnlyBatch
    indices: List[int]
    lengths: List[int] = field(default_factory=list)
    prompt_lengths: List[int] = field(default_factory=list)
    image_counts: List[int] = field(default_factory=list)
    prompt_keys: List[tuple] = field(default_factory=list)
    masked_pixel_values: Optional[torch.Tensor] = None  # the same images with patches masked (PAPO / VPPO)
    padding: bool = False  # a masked-out stand-in that keeps a rank with no samples in step with the others

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def collate(samples: Sequence[Sample], indices: Sequence[int], image_token_id: int, spatial_merge_size: int,
            pad_token_id: int = 0, pad_to_multiple_of: int = 1) -> ModelBatch:
    """Pad and stack ``samples`` (in ``indices`` order) into a ``ModelBatch``.

    ``pad_to_multiple_of``: the width is rounded up to a multiple of it (sequence parallelism splits the sequence
    over the TP ranks, so it must divide by TP).
    """
    chosen = [samples[i] for i in indices]
    width = -(-max(s.length for s in chosen) // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(chosen)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.bool)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    prompt_lengths = torch.zeros(batch, dtype=torch.long)
    for row, s in enumerate(chosen):
        ids = s.prompt_ids + s.response_ids
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = True
        response_mask[row, len(s.prompt_ids): len(ids)] = s.trainable
        prompt_lengths[row] = len(s.prompt_ids)
    image_mask = image_token_mask(input_ids, image_token_id, prompt_lengths)
    with_images = [s for s in chosen if s.pixel_values is not None]
    pixel_values = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    masked = [s.masked_pixel_values for s in with_images]
    masked_pixel_values = torch.cat(masked) if with_images and all(m is not None for m in masked) else None
    grid = torch.cat([s.image_grid_thw for s in with_images]) if with_images else None
    position_ids = get_rope_index(input_ids, image_mask, grid, spatial_merge_size, attention_mask=attention)
    text_only = drop_visual_tokens(input_ids, position_ids, image_mask, pad_token_id, attention_mask=attention)
    return ModelBatch(input_ids, position_ids, image_mask, response_mask, pixel_values, grid, text_only,
                      list(indices), lengths=[s.length for s in chosen],
                      prompt_lengths=[len(s.prompt_ids) for s in chosen],
                      image_counts=[0 if s.image_grid_thw is None else int(s.image_grid_thw.shape[0]) for s in chosen],
                      prompt_keys=[(s.group, tuple(s.prompt_ids)) for s in chosen],
                      masked_pixel_values=masked_pixel_values)


def sequence_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every micro-batch's sequence width must be a multiple of: TP under sequence parallelism (each rank
    holds ``S / TP`` tokens); with FP8, 16 tokens per rank for Transformer Engine's FP8 GEMMs (whose token dimension
    must divide by 16; verl pads the same way, ``verl/models/mcore/util.py``), so 16 x TP with sequence parallelism,
    16 without (then ``S x B`` divides by 16 for any batch)."""
    multiple = tp if sequence_parallel else 1
    return multiple * 16 if fp8 else multiple


def length_bucketed_micro_batches(samples: Sequence[Sample], micro_batch_size: int) -> List[List[int]]:
    """Split sample indices into micro-batches of similar length (sorted by length, longest first), so padding
    stays small; every index appears exactly once. Deterministic for a given input."""
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].length, i))
    return [order[i: i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def prompt_grouped_micro_batches(samples: Sequence[Sample], micro_batch_size: int) -> List[List[int]]:
    """Like ``length_bucketed_micro_batches``, but the responses to one prompt stay together (longest prompts
    first, then group, then response length), so a micro-batch holds few distinct prompts: what shared-prompt
    packing (``packing.py``) computes once each. Every index appears exactly once; deterministic."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].prompt_ids), samples[i].group,
                                                       -samples[i].length, i))
    return [order[i: i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def predicting_positions(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(batch_index [N], seq_index [N])`` of the logits that predict the ``N`` True tokens of ``mask [B, S]``
    (each token's previous position), in row-major order: the order of ``values[mask]``."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if bool((cols == 0).any()):
        raise ValueError("a selected token at position 0 has no previous position to be predicted from")
    return rows, cols - 1


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it (nested in dicts, lists and tuples) on ``device``; other values as they are.

    Micro-batches are collated and packed on the CPU (index bookkeeping) and moved to the model's device one
    micro-batch at a time, just before the forward (``policy._forward_step``)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def scatter_to_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values [N]`` (row-major over the True entries of ``mask [B, S]``) -> ``[B, S]``, zero elsewhere
    (differentiable in ``values``)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)
