"""Training state out of device memory while the rollout engine generates (``trainer.offload_during_rollout``).

    with offloaded(policy.model, policy.optimizer, enabled=cfg.trainer.offload_during_rollout):
        samples = rollouts.batch(...)          # the engine has the GPU to itself

What moves, following verl's Megatron worker (``verl/utils/megatron_utils.py``: ``offload_megatron_model_to_cpu``,
``offload_megatron_optimizer`` and their ``load_*`` counterparts):

* the DDP parameter buffers (every trainable parameter is a view into one): copied to host memory (pinned on CUDA),
  then the buffer's storage is resized to 0; on the way back the storage is resized and the copy written in, so
  every view (the parameters, the distributed optimizer's shards of them) is valid again;
* the DDP gradient buffers: resized to 0 and back, zeroed (their contents are dead between updates: an update
  zeroes them before its backward pass);
* the optimizer's fp32 master copies of 16-bit parameters (``shard_fp32_from_float16_groups`` of the distributed
  optimizer, ``fp32_from_float16_groups`` of the plain one; with fp32 parameters the distributed optimizer's
  master shards are views into the parameter buffers) and Adam's ``exp_avg`` / ``exp_avg_sq``: moved with
  ``tensor.data = ...``, so the optimizer keeps the same tensor objects.

The storage resize is device-agnostic, so the same code runs on CPU, where the test suite checks that a round trip
is bit-exact and that a run with offloading equals one without (on CPU the host copy costs memory instead of
freeing any: the option is for GPUs).
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator, List

import torch


def _ddp_buffers(model) -> List:
    """Megatron DDP's parameter-and-gradient buffers (dense and expert-parallel)."""
    return [b for attr in ("buffers", "expert_parallel_buffers") for b in (getattr(model, attr, None) or [])]


def _optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """The optimizer's own tensors: fp32 master shards of 16-bit parameters and Adam's moments."""
    from .checkpoint import _inner_optimizers  # the one walk of a (chained) Megatron optimizer

    for opt, inner in _inner_optimizers(optimizer):
        # master copies of 16-bit parameters: the distributed optimizer's shards, or the plain optimizer's
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(opt, attr, None) or []:
                yield from group
        if inner is not None:
            for state in inner.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if isinstance(state.get(key), torch.Tensor):
                        yield state[key]


def _host_copy(tensor: torch.Tensor, owner) -> torch.Tensor:
    """``tensor``'s values in host memory (pinned for a CUDA tensor), in a buffer kept on ``owner`` and reused by
    the next offload: pinning tens of GB every step would cost more than the copy."""
    host = getattr(owner, "_pgpo_host_copy", None)
    if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                           pin_memory=tensor.is_cuda and torch.cuda.is_available())
        owner._pgpo_host_copy = host
    if host.data_ptr() != tensor.data_ptr():  # on the CPU an optimizer tensor may already live in it
        host.copy_(tensor, non_blocking=True)
    return host


@torch.no_grad()
def offload(model, optimizer) -> dict:
    """Move the training state to host memory; returns what ``reload`` needs."""
    saved = {"buffers": [], "tensors": []}
    for buffer in _ddp_buffers(model):
        data = buffer.param_data
        saved["buffers"].append((buffer, _host_copy(data, buffer), data.untyped_storage().size(),
                                 buffer.grad_data.untyped_storage().size()))
    for buffer, _, _, _ in saved["buffers"]:
        buffer.param_data.untyped_storage().resize_(0)
        buffer.grad_data.untyped_storage().resize_(0)
    for tensor in _optimizer_tensors(optimizer):
        saved["tensors"].append((tensor, tensor.device))
        tensor.data = _host_copy(tensor.data, tensor)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return saved


@torch.no_grad()
def reload(saved: dict) -> None:
    """Undo ``offload``: the same tensors, on their devices again, with the same values."""
    for buffer, host, param_bytes, grad_bytes in saved["buffers"]:
        buffer.param_data.untyped_storage().resize_(param_bytes)
        buffer.param_data.copy_(host, non_blocking=True)
        buffer.grad_data.untyped_storage().resize_(grad_bytes)
        buffer.grad_data.zero_()
    for tensor, device in saved["tensors"]:
        tensor.data = tensor.data.to(device, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def offloaded(model, optimizer, enabled: bool = True):
    """The training state is in host memory inside the block and back on its device after it (also on errors:
    a preemption save after a failed rollout needs it)."""
    if not enabled:
        yield
        return
    saved = offload(model, optimizer)
    try:
        yield
    finally:
        reload(saved)
