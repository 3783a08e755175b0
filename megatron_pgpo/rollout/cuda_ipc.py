"""Weight buckets by CUDA IPC handle: the engine owner's GPU bucket reaches vLLM's workers without host bytes.

On a GPU run the owner's full-model HF tensors are already on its GPU (``weight_sync`` gathers them there). The
bytes path would copy every bucket to host memory, serialise it and copy it back; here the owner packs a bucket into
one flat ``uint8`` CUDA buffer, shares it by handle, and each vLLM worker maps that buffer into its own process and
loads views of it. This is the transport verl, NeMo-RL and slime use for colocated engines; the details follow
NeMo-RL (``nemo_rl/models/policy/utils.py``: ``get_handle_from_tensor``, ``stream_weights_via_ipc_zmq_impl``,
``rebuild_cuda_tensor_from_ipc``; ``vllm_backend.py``: ``update_weights_via_ipc_zmq``):

- tensors are packed at ``ALIGN``-byte offsets, so every view has a storage offset its dtype allows;
- the owner synchronises its stream before sharing; the worker synchronises after loading, before it replies, so
  the owner may free or reuse the buffer as soon as the RPC returns;
- the worker opens the handle **on its own device index** (``rebuild_cuda_tensor``'s device argument replaced, as
  NeMo-RL does): the owner's index means nothing in the engine process, whose ``CUDA_VISIBLE_DEVICES`` differ
  (``parallel/placement.py``). Which GPU holds the buffer is told by its UUID: a worker on another GPU than the
  owner's (rollout TP > 1) maps it through peer access (CUDA opens IPC handles with lazy peer access enabled) and
  copies the bucket to its own memory before loading.

The payload is plain data (dicts, lists, str, int, bool, bytes): it crosses vLLM's msgpack RPC without pickling.

    flat, meta = pack_bucket(bucket)                   # owner, [(name, cuda tensor)] -> flat uint8 + layout
    payload = {"cuda_ipc": share(flat), "meta": meta}  # owner: keep ``flat`` alive until the RPC returns
    named = open_bucket(payload, worker_device)        # worker: [(name, tensor viewing the shared buffer)]
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

#: Byte alignment of each tensor in a packed bucket (NeMo-RL's ``calculate_aligned_size`` uses 256 too): larger than
#: any element size, and the alignment CUDA's allocator gives every block.
ALIGN = 256

#: ``[name, shape, dtype name, byte offset]`` per tensor of a bucket.
Layout = List[List[Any]]


def aligned(nbytes: int, align: int = ALIGN) -> int:
    return (nbytes + align - 1) // align * align


def pack_bucket(bucket: Sequence[Tuple[str, torch.Tensor]], device: Optional[torch.device] = None
                ) -> Tuple[torch.Tensor, Layout]:
    """One flat ``uint8`` buffer holding every tensor of ``bucket`` at ``ALIGN``-byte offsets, and its layout.

    The buffer is on ``device`` (default: the first tensor's). Shapes: each tensor any shape and dtype; the buffer
    ``[sum of aligned sizes]``.
    """
    if not bucket:
        raise ValueError("pack_bucket: empty bucket")
    device = device or bucket[0][1].device
    layout: Layout = []
    offset = 0
    for name, tensor in bucket:
        layout.append([name, list(tensor.shape), str(tensor.dtype).split(".")[-1], offset])
        offset += aligned(tensor.numel() * tensor.element_size())
    flat = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, start) in zip(bucket, layout):
        nbytes = tensor.numel() * tensor.element_size()
        flat[start:start + nbytes].copy_(tensor.detach().reshape(-1).view(torch.uint8), non_blocking=True)
    return flat, layout


def unpack_bucket(flat: torch.Tensor, layout: Layout) -> List[Tuple[str, torch.Tensor]]:
    """Views of ``flat`` (no copies) as the tensors ``pack_bucket`` put there; raises if the layout overruns it."""
    out = []
    for name, shape, dtype_name, start in layout:
        dtype = getattr(torch, dtype_name)
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        if start % ALIGN or start + nbytes > flat.numel():
            raise ValueError(f"{name}: bytes [{start}, {start + nbytes}) do not fit a {flat.numel()}-byte bucket "
                             f"at {ALIGN}-byte alignment")
        out.append((name, flat[start:start + nbytes].view(dtype).view(shape)))
    return out


def device_uuid(index: int) -> str:
    """The GPU's UUID (the same in every process, whatever its ``CUDA_VISIBLE_DEVICES``)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def share(flat: torch.Tensor) -> Dict[str, Any]:
    """A CUDA IPC handle of ``flat`` as plain data. The caller keeps ``flat`` alive until every receiver is done."""
    from torch.multiprocessing.reductions import reduce_tensor

    if flat.device.type != "cuda" or flat.dtype != torch.uint8 or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"share: needs a contiguous 1-D uint8 CUDA tensor, got {flat.dtype} {tuple(flat.shape)} on "
                         f"{flat.device}")
    torch.cuda.current_stream(flat.device).synchronize()  # the packing copies are done before anyone reads
    (_cls, size, _stride, tensor_offset, _storage_cls, _dtype, device, handle, storage_bytes, storage_offset,
     _grad, ref_handle, ref_offset, event_handle, event_sync) = reduce_tensor(flat.detach())[1]
    return {"numel": int(size[0]), "tensor_offset": int(tensor_offset), "handle": handle,
            "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset), "ref_handle": ref_handle,
            "ref_offset": int(ref_offset), "event_handle": event_handle, "event_sync": bool(event_sync),
            "uuid": device_uuid(device)}


def open_shared(shared: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """The buffer ``share`` described, mapped into this process on ``device`` (this process's own GPU: see the
    module docstring), copied into ``device``'s memory when the buffer lives on another GPU."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    index = device.index if device.index is not None else torch.cuda.current_device()
    flat = rebuild_cuda_tensor(
        torch.Tensor, torch.Size([shared["numel"]]), (1,), shared["tensor_offset"], torch.storage.TypedStorage,
        torch.uint8, index, shared["handle"], shared["storage_bytes"], shared["storage_offset"], False,
        shared["ref_handle"], shared["ref_offset"], shared["event_handle"], shared["event_sync"])
    if shared["uuid"] != device_uuid(index):  # peer-mapped memory of the owner's GPU: load from a local copy
        flat = flat.clone()
    return flat


def open_bucket(payload: Dict[str, Any], device: torch.device) -> List[Tuple[str, torch.Tensor]]:
    """The worker's side: ``[(name, tensor)]`` from a ``{"cuda_ipc": share(...), "meta": layout}`` payload."""
    return unpack_bucket(open_shared(payload["cuda_ipc"], device), payload["meta"])


def resolve_transport(setting: str, multiprocess: bool, tensor_device: str) -> str:
    """How a bucket travels to the engine: ``objects`` (in-process engine: the tensors themselves), ``bytes``
    (safetensors bytes through the RPC) or ``cuda_ipc``.

    ``setting``: ``auto`` (CUDA IPC when the tensors are on a GPU and the engine is another process, else bytes),
    ``bytes`` or ``cuda_ipc`` (refused for tensors that are not on a GPU).
    """
    if setting not in ("auto", "bytes", "cuda_ipc"):
        raise ValueError(f"weight transport {setting!r}: expected auto, bytes or cuda_ipc")
    if not multiprocess:
        return "objects"
    if setting == "cuda_ipc" and tensor_device != "cuda":
        raise ValueError(f"weight transport cuda_ipc needs the exported tensors on a GPU; they are on {tensor_device}")
    if setting == "auto":
        return "cuda_ipc" if tensor_device == "cuda" else "bytes"
    return setting
