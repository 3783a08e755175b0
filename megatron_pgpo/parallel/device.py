"""The one device a training rank runs on, resolved from how the rank was launched.

    device = resolve_device("auto", local_rank=3, cuda_available=True, visible_devices=8)   # cuda:3
    device = resolve_device("auto", local_rank=3, cuda_available=True, visible_devices=1)   # cuda:0 (bound GPU)
    device = resolve_device("auto", local_rank=0, cuda_available=False, visible_devices=0)  # cpu

Two launcher conventions bind a rank to a GPU, and both must work:

* **All GPUs visible** (torchrun, ``srun --gpus-per-node=8`` with one task per GPU, our local spawn): the rank
  takes GPU ``LOCAL_RANK`` of the ones it sees. This is what Megatron-LM's ``_initialize_distributed``
  (``megatron/training/initialize.py``: ``torch.cuda.set_device(args.local_rank)``) and verl's Megatron worker
  (``verl/workers/megatron_workers.py``: ``set_device(int(os.environ["LOCAL_RANK"]))``) do.
* **One GPU bound per task** (``srun --gpus-per-task=1``, or ``CUDA_VISIBLE_DEVICES`` set per rank): the rank
  sees exactly one device, which is ``cuda:0`` inside the process whatever its ``LOCAL_RANK`` (3 on the fourth
  task of a node). ``set_device(LOCAL_RANK)`` fails there; that is the case this module exists for.

Anything else (``LOCAL_RANK`` 5 with 4 visible GPUs) is refused with the numbers, before any process group starts.
The process group then uses ``cpu:gloo,cuda:nccl`` (verl's ``megatron_workers.py`` does the same): tensors on the
GPU go through NCCL, small control tensors on the CPU through gloo; ``collectives.py`` places tensors for a group
either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch

DeviceChoice = Literal["auto", "cpu", "cuda"]


class DeviceError(RuntimeError):
    """The rank cannot be bound to a device as asked; the message gives the numbers and what to change."""


def resolve_device(choice: DeviceChoice, local_rank: int, cuda_available: bool, visible_devices: int,
                   local_world_size: Optional[int] = None, shared_visible: bool = False) -> torch.device:
    """The device of one rank (pure: no CUDA call, so every case is unit-tested on CPU).

    Args:
        choice: ``parallel.device``: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda`` (an error
            without CUDA).
        local_rank: the rank's index on its node (``LOCAL_RANK``; 0 for a single process).
        cuda_available / visible_devices: ``torch.cuda.is_available()`` / ``torch.cuda.device_count()``.
        local_world_size: ranks on this node when known (``LOCAL_WORLD_SIZE``, or our local spawn): with more
            than one GPU visible, two ranks may not share one (NCCL refuses duplicate GPUs).
        shared_visible: every rank of the node sees the same devices (our local spawn), so even one visible GPU
            is the same GPU for all of them.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"parallel.device={choice!r}: choose auto, cpu or cuda")
    if choice == "cpu" or (choice == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available or visible_devices < 1:
        raise DeviceError("parallel.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False; "
                          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})")
    if local_rank < 0:
        raise DeviceError(f"LOCAL_RANK={local_rank} is negative")
    if visible_devices == 1 and not shared_visible:
        return torch.device("cuda", 0)  # one GPU bound to this task (or a one-GPU machine)
    if local_world_size is not None and local_world_size > visible_devices:
        raise DeviceError(f"{local_world_size} ranks on this node but only {visible_devices} GPUs visible: each rank "
                          "needs its own GPU (start fewer processes, or use more nodes)")
    if local_rank >= visible_devices:
        raise DeviceError(
            f"LOCAL_RANK={local_rank} but this process sees only {visible_devices} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): launch one task per GPU "
            "with all of the node's GPUs visible, or bind exactly one GPU per task (srun --gpus-per-task=1)")
    return torch.device("cuda", local_rank)


def local_rank_from_env(env: Mapping[str, str] = os.environ, default: int = 0) -> int:
    """``LOCAL_RANK`` (torchrun, slurm/rank_env.sh), else ``SLURM_LOCALID`` (a bare srun task), else ``default``."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(key, "") != "":
            return int(env[key])
    return default


def local_world_size_from_env(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """Ranks per node: ``LOCAL_WORLD_SIZE`` (torchrun), else Slurm's tasks per node when every node has the same
    number (``SLURM_NTASKS_PER_NODE``, ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` in Slurm's
    ``8(x2)`` or ``8,8`` form); None when unknown or uneven."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts = {part.split("(")[0] for part in env.get(key, "").split(",") if part}
        if len(counts) == 1 and next(iter(counts)).isdigit():
            return int(next(iter(counts)))
    return None


@dataclass(frozen=True)
class Binding:
    """What ``bind`` did: the device, and the backend string for ``init_process_group``."""

    device: torch.device
    backend: str

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def bind(choice: DeviceChoice, local_rank: int, local_world_size: Optional[int] = None,
         shared_visible: bool = False) -> Binding:
    """Resolve this rank's device and make it current (``torch.cuda.set_device``) before any CUDA allocation."""
    cuda = torch.cuda.is_available()
    device = resolve_device(choice, local_rank, cuda, torch.cuda.device_count() if cuda else 0, local_world_size,
                            shared_visible)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return Binding(device, "cpu:gloo,cuda:nccl")
    return Binding(device, "gloo")


def current_device() -> torch.device:
    """The device this process computes on: the current CUDA device, or the CPU when CUDA is absent or the
    Megatron CPU patches are in effect (``compat/megatron_cpu.py``: a CPU run on a machine that has a GPU)."""
    from ..compat.megatron_cpu import cpu_patches_applied

    if not torch.cuda.is_available() or cpu_patches_applied():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
