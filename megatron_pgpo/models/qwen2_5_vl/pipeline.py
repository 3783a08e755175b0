"""A forward-only pass through every pipeline stage, without Megatron's schedules: parity checks, evaluation,
checkpoint tests.

    logits = forward_all_stages(model, input_ids, position_ids, pixel_values=..., image_grid_thw=..., image_mask=...)
    if logits is not None:                      # last pipeline stage only
        full = gather_vocab_logits(logits, model.vocab_size)   # [B, S, V] on every TP rank of that stage

Stage ``k > 0`` receives stage ``k - 1``'s hidden states ``[S(/TP under SP), B, H]`` over Megatron's pipeline group
(their shape is sent first, so variable sequence lengths work) and hands them to ``model.set_input_tensor``; every
stage but the last sends its output on. One micro-batch, no interleaving; training uses Megatron's schedules.
"""
from __future__ import annotations

from typing import Optional

import torch


def forward_all_stages(model, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs) -> Optional[torch.Tensor]:
    """This rank's part of a full forward over all PP stages; the last stage's output, None on other stages.

    Args:
        model: this rank's ``Qwen2_5_VLMegatronModel`` stage (or anything with ``config`` and ``set_input_tensor``).
        input_ids: ``[B, S]``; position_ids: ``[3, B, S]``; kwargs: passed to the model (image inputs are used on
            the first stage only).

    Returns:
        On the last stage the model's output (vocab-parallel logits ``[B, S, V_padded / TP]``), else None.
    """
    from megatron.core import parallel_state as ps

    from ...parallel import collectives

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return model(input_ids, position_ids, **kwargs)
    group = ps.get_pipeline_model_parallel_group()
    dtype = model.config.pipeline_dtype or model.config.params_dtype
    if not ps.is_pipeline_first_stage():
        prev = ps.get_pipeline_model_parallel_prev_rank()
        shape = collectives.recv((3,), torch.int64, prev, group)
        model.set_input_tensor(collectives.recv(shape.tolist(), dtype, prev, group, device=input_ids.device))
    output = model(input_ids, position_ids, **kwargs)
    if ps.is_pipeline_last_stage():
        return output
    output = output.contiguous().to(dtype)
    collectives.send(torch.tensor(list(output.shape), dtype=torch.int64), ps.get_pipeline_model_parallel_next_rank(),
                     group)
    collectives.send(output, ps.get_pipeline_model_parallel_next_rank(), group)
    return None


def gather_vocab_logits(logits: torch.Tensor, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary logits ``[..., vocab_size]`` from this TP rank's ``[..., V_padded / TP]`` slice.

    All-gathers over the tensor-parallel group (every TP rank gets the result) and drops Megatron's vocabulary
    padding when ``vocab_size`` is given. Not differentiable; for inspection and checks.
    """
    from megatron.core import parallel_state as ps

    from ...parallel import collectives

    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = torch.cat(collectives.all_gather(logits.detach(), ps.get_tensor_model_parallel_group()), dim=-1)
    return logits[..., :vocab_size] if vocab_size is not None else logits
