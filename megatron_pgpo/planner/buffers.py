"""Bytes of the training state one GPU holds: weights, Megatron DDP's gradient buffer and the Adam state.

Units: element counts are numbers of elements; everything named ``*_bytes`` or held in ``TrainingStateBytes`` is
bytes.

What ``trainer/policy.py`` builds, and what this module reproduces exactly (tested against the real buffers of a
tiny model on CPU):

* ``DistributedDataParallel(grad_reduce_in_fp32=True, overlap_grad_reduce=False)``: one contiguous gradient
  buffer (``main_grad`` of every trainable parameter is a view into it) in fp32 whatever the parameter dtype.
  Without ``overlap_grad_reduce`` Megatron uses no bucket size, so the buffer is one bucket, except that a tied
  embedding at PP > 1 (``shared_embedding``) gets a bucket of its own when the distributed optimizer is on.
  Parameters are laid out in REVERSE ``named_parameters()`` order. With the distributed optimizer every
  parameter starts at a multiple of 64 elements and every bucket is padded to a multiple of lcm(DP, 128); the
  parameters are then also moved into one param buffer of the same (padded) size, in the parameter dtype.
* Megatron's optimizer with Adam. bf16/fp16 parameters get fp32 master copies (``Float16OptimizerWithFloat16Params``
  or, distributed, ``shard_fp32_from_float16_groups``); fp32 parameters are updated in place (no copy). Adam keeps
  ``exp_avg`` and ``exp_avg_sq`` in fp32 for every element it updates. The distributed optimizer splits each
  bucket into DP equal contiguous ranges: a DP rank keeps master copies and moments only for the parameter
  elements inside its range (padding gets none).
* Not counted: torch Adam's per-parameter ``step`` scalar (4 bytes per tensor; GPU fused Adam keeps one per
  group), and allocator rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .model_size import TensorSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Megatron's alignment of each parameter's start in the buffer with the distributed optimizer (elements).
PARAM_ALIGN = 64
#: Megatron pads each bucket to a multiple of lcm(DP, BUCKET_ALIGN) with the distributed optimizer (elements).
BUCKET_ALIGN = 128


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``fp32`` / ``bf16`` / ``fp16``."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class BufferLayout:
    """Megatron's gradient buffer of one rank: total elements (padding included), the ``[start, end)`` of each
    bucket, and the ``[start, end)`` of each trainable tensor (in buffer order)."""

    numel: int
    buckets: Tuple[Tuple[int, int], ...]
    tensor_ranges: Tuple[Tuple[int, int], ...]

    @property
    def padding(self) -> int:
        return self.numel - sum(end - start for start, end in self.tensor_ranges)


def ddp_buffer_layout(trainable: Sequence[TensorSpec], dp: int, distributed_optimizer: bool,
                      bucket_size: Optional[int] = None) -> BufferLayout:
    """The gradient buffer ``_ParamAndGradBuffer`` builds for ``trainable`` (in ``named_parameters()`` order), as in
    megatron-core 0.16.1 (``param_and_grad_buffer.py``); ``bucket_size=None`` is what our policy gets."""
    pad = distributed_optimizer
    bucket_align = math.lcm(dp, BUCKET_ALIGN)
    buckets: List[Tuple[int, int]] = []
    ranges: List[Tuple[int, int]] = []
    bucket_start = start = end = 0
    open_bucket = False

    def close(at: int) -> int:
        nonlocal bucket_start, open_bucket
        bucket_end = _round_up(at, bucket_align) if pad else at
        buckets.append((bucket_start, bucket_end))
        bucket_start, open_bucket = bucket_end, False
        return bucket_end

    for tensor in reversed(trainable):
        if pad:
            start = _round_up(start, PARAM_ALIGN)
        own_bucket = tensor.shared_embedding and pad
        if own_bucket and open_bucket:
            start = close(start)
        end = start + tensor.numel
        ranges.append((start, end))
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if open_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel=numel, buckets=tuple(buckets), tensor_ranges=tuple(ranges))


def optimizer_shard_numel(layout: BufferLayout, dp: int, dp_rank: int) -> int:
    """Parameter elements the distributed optimizer of ``dp_rank`` updates: each bucket is cut into ``dp`` equal
    ranges and the rank owns the parameter elements inside its range."""
    owned = 0
    for bucket_start, bucket_end in layout.buckets:
        share = (bucket_end - bucket_start) // dp
        lo = bucket_start + dp_rank * share
        hi = min(bucket_end, lo + share)
        for start, end in layout.tensor_ranges:
            owned += max(0, min(end, hi) - max(start, lo))
    return owned


@dataclass(frozen=True)
class TrainingStateBytes:
    """Bytes of one GPU's persistent training state."""

    weights: int
    """Model parameters in the model dtype (with the distributed optimizer: the padded param buffer + frozen ones)."""
    grads: int
    """DDP's gradient buffer (``main_grad``), fp32 with ``grad_reduce_in_fp32``, padding included."""
    master_params: int
    """fp32 master copies of bf16/fp16 parameters (0 for fp32 models)."""
    adam_moments: int
    """Adam ``exp_avg`` + ``exp_avg_sq``, fp32."""

    @property
    def optimizer(self) -> int:
        return self.master_params + self.adam_moments

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def training_state_bytes(tensors: Sequence[TensorSpec], dtype: str, dp: int, distributed_optimizer: bool,
                         dp_rank: Optional[int] = None, train_vision_tower: bool = True,
                         grad_reduce_in_fp32: bool = True) -> TrainingStateBytes:
    """Weights, gradients and optimizer state of the rank holding ``tensors`` (``model_size.stage_tensors``).

    Args:
        dtype: the model's parameter dtype (``model.dtype``).
        dp: data-parallel size; ``dp_rank``: which DP rank (None: the largest over all DP ranks; they differ only
            by where the bucket cuts fall).
        train_vision_tower: False freezes the vision tower (no gradient, no optimizer state).
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    if dp_rank is None:
        ranks = range(dp) if distributed_optimizer else [0]
        per_rank = [training_state_bytes(tensors, dtype, dp, distributed_optimizer, r, train_vision_tower,
                                         grad_reduce_in_fp32) for r in ranks]
        return max(per_rank, key=lambda b: b.total)
    element = dtype_bytes(dtype)
    trainable = [t for t in tensors if train_vision_tower or not t.is_vision]
    frozen = sum(t.numel for t in tensors) - sum(t.numel for t in trainable)
    layout = ddp_buffer_layout(trainable, dp, distributed_optimizer)
    if distributed_optimizer:
        weights = (layout.numel + frozen) * element
        updated = optimizer_shard_numel(layout, dp, dp_rank)
    else:
        weights = (layout.numel - layout.padding + frozen) * element
        updated = layout.numel
    grads = layout.numel * (4 if grad_reduce_in_fp32 else element)
    master = 0 if dtype == "fp32" else 4 * updated
    return TrainingStateBytes(weights=weights, grads=grads, master_params=master, adam_moments=8 * updated)
