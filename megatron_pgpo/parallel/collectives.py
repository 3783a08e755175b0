"""Every collective of the trainer, the rollout side and the model helpers goes through here, so every tensor
handed to a process group lives where that group's backend can take it.

The rule (``placement``): a tensor stays on its device when the group's backend takes that device type, else it
moves to one the backend takes. A GPU run's groups are ``cpu:gloo,cuda:nccl`` (as verl's Megatron worker makes
them), so CUDA tensors (weights gathered for export, activations between stages) go through NCCL without a host
copy and small CPU control tensors (flags, counts, metric sums) through gloo; a NCCL-only group would get every
tensor on the current CUDA device ("No backend type associated with device type cpu" otherwise). Results come back
on the caller's device. A receive allocates on the device the caller names (the sender's device type: the same
code runs on every rank), else where the group's backend prefers (``device_for``). Object collectives
(``all_gather_object`` and friends) are torch's, which place their byte tensors themselves once
``torch.cuda.set_device`` has run (``device.bind``).

A unit test (``tests/unit/test_collective_placement.py``) fails when any other module of the package calls a
``torch.distributed`` collective directly; the only exception is ``vocab_parallel.py``, whose autograd functions
reduce the logits' own statistics (already on the model's device) over an explicit TP group, like
``megatron/core/tensor_parallel/cross_entropy.py``.
"""
from __future__ import annotations

import datetime
from typing import Any, List, Optional, Set

import torch
import torch.distributed as dist


def backend_devices(backend: str) -> Set[str]:
    """Device types a group with this backend takes. ``backend``: torch's backend config string
    (``get_backend_config``: ``cpu:gloo,cuda:gloo`` for gloo, ``cuda:nccl`` for NCCL, ``cpu:gloo,cuda:nccl``
    mixed) or a plain backend name."""
    devices = set()
    for pair in str(backend).lower().replace(" ", "").split(","):
        device, _, name = pair.rpartition(":")
        if device:
            devices.add(device)
        elif name in ("gloo", "fake", "mpi", "ucc"):  # backends that take CPU tensors
            devices.add("cpu")
        elif name == "nccl":
            devices.add("cuda")
        else:
            raise ValueError(f"unknown process-group backend {backend!r}")
    return devices


def device_for_backend(backend: str, cuda_index: Optional[int] = None) -> torch.device:
    """Where a new tensor for a group with this backend goes (pure): the CPU when the backend takes CPU tensors,
    else the current CUDA device ``cuda_index``."""
    if "cpu" in backend_devices(backend):
        return torch.device("cpu")
    if cuda_index is None:
        raise ValueError(f"backend {backend!r} takes only CUDA tensors, but no CUDA device is current")
    return torch.device("cuda", cuda_index)


def placement(tensor_device: torch.device, backend: str, cuda_index: Optional[int] = None) -> torch.device:
    """Where a tensor on ``tensor_device`` goes for a group with this backend (pure): where it is when the backend
    takes that device type (no host round trip for CUDA tensors on a ``cpu:gloo,cuda:nccl`` group), else
    ``device_for_backend``."""
    if torch.device(tensor_device).type in backend_devices(backend):
        return torch.device(tensor_device)
    return device_for_backend(backend, cuda_index)


def device_for(group: Any = None) -> torch.device:
    """Where tensors for ``group`` (None: the default group) must live."""
    config = dist.get_backend_config(group)
    takes_cpu = device_for_backend(config, 0).type == "cpu"
    return device_for_backend(config, None if takes_cpu else torch.cuda.current_device())


def _placed(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    config = dist.get_backend_config(group)
    cuda = torch.cuda.current_device() if "cuda" in backend_devices(config) and torch.cuda.is_available() else None
    target = placement(tensor.device, config, cuda)
    return tensor if tensor.device == target else tensor.to(target)


# ----------------------------------------------------------------------------------------------- tensors
def all_reduce(tensor: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (any device); returns it."""
    placed = _placed(tensor, group)
    dist.all_reduce(placed, op=op, group=group)
    if placed is not tensor:
        tensor.copy_(placed)
    return tensor


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank of ``group`` iff ``flag`` is True on at least one."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce(value, dist.ReduceOp.MAX, group).item())


def all_ranks(flag: bool, group: Any = None) -> bool:
    """True on every rank of ``group`` iff ``flag`` is True on all of them."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce(value, dist.ReduceOp.MIN, group).item())


def all_gather(tensor: torch.Tensor, group: Any = None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype everywhere), in group-rank order, on ``tensor``'s device."""
    placed = _placed(tensor.contiguous(), group)
    parts = [torch.empty_like(placed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, placed, group=group)
    return [p.to(tensor.device) for p in parts]


def send(tensor: torch.Tensor, dst: int, group: Any = None) -> None:
    """Point-to-point send to global rank ``dst``."""
    dist.send(_placed(tensor.contiguous(), group), dst=dst, group=group)


def recv(shape, dtype: torch.dtype, src: int, group: Any = None, device: Optional[torch.device] = None
         ) -> torch.Tensor:
    """Receive a ``shape``/``dtype`` tensor from global rank ``src``, on ``device``: the device type the sender
    sends from (on a mixed group the two sides must use the same backend); default ``device_for(group)``."""
    buffer = torch.empty(tuple(shape), dtype=dtype, device=device if device is not None else device_for(group))
    placed = _placed(buffer, group)
    dist.recv(placed, src=src, group=group)
    if placed is not buffer:
        buffer.copy_(placed)
    return buffer


# ----------------------------------------------------------------------------------------------- objects
def all_gather_object(obj: Any, group: Any = None) -> List[Any]:
    """Every rank's picklable ``obj``, in group-rank order."""
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Global rank ``src``'s ``obj`` on every rank of ``group``."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def send_object(obj: Any, dst: int, group: Any = None) -> None:
    dist.send_object_list([obj], dst=dst, group=group)


def recv_object(src: int, group: Any = None) -> Any:
    box: List[Any] = [None]
    dist.recv_object_list(box, src=src, group=group)
    return box[0]


# ----------------------------------------------------------------------------------------------- barriers
def barrier(group: Any = None, timeout_s: Optional[float] = None) -> None:
    """Wait for every rank of ``group``. ``timeout_s``: a longer wait than the group's own timeout (e.g. while
    one rank restarts an engine); gloo then uses ``monitored_barrier``, which names the ranks that did not come.
    On NCCL the group's timeout applies (``parallel.distributed_timeout_minutes``)."""
    if timeout_s is not None and dist.get_backend(group) == dist.Backend.GLOO:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    elif device_for(group).type == "cuda":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)
