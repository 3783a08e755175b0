"""Megatron (any TP x PP) -> HF-named full tensors -> a rollout engine, in buckets that never split a fused group.

Export: every rank of a model-parallel group calls ``iter_full_model_hf_tensors`` (or ``sync_weights`` /
``save_hf_checkpoint``, built on it) in lockstep. Stage by stage, the stage's TP ranks all-gather each
``mapping.ParamMapping`` through ``loading.gather_hf_tensors`` (the one mapping the loader uses too); the HF
layer index comes from the mapping (stage offset + local index). Stage 0's TP rank 0 -- the **engine owner** of its
data-parallel replica -- yields its own tensors directly and receives the other stages' tensors from their TP
rank 0 over the pipeline group, bucket by bucket (metadata object, then one flat byte buffer). So each DP replica's
owner sees the full model, in checkpoint order, holding one bucket at a time; the other ranks' generators yield
nothing. Every DP replica does the same, so each one's TP=1 engine gets the full model.

Fused groups (why buckets may not end anywhere): an inference engine loads weights per *module*. vLLM fuses HF
tensors into one module (``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj``; ``gate_proj``/``up_proj`` ->
``gate_up_proj``, in the language model AND in the vision blocks) and reloads module by module: a module whose
tensors arrive in two different reload calls is processed with half of them missing, which silently corrupts it
(measured: docs/stack.md). So a bucket ends only between two fused groups (all tensors of one vLLM module, weight and
bias together). A group always holds whole ``ParamMapping`` s (q/k/v of ``linear_qkv``; gate/up of
``linear_fc1``), and the qkv weight and qkv bias mappings of a layer share one group.

``sync_weights(model, engine)``: the owner streams into ``engine.update_weights`` (its failure policy: see
``vllm_engine``), the others feed it; afterwards the model-parallel group agrees on the outcome, so every rank raises
``WeightSyncError`` if any part failed. After a failure the next ``sync_weights`` rebuilds the engine when needed and
re-sends the full model -- the trainer's weights are the last good full state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Tuple, Union

import torch

NamedTensor = Tuple[str, torch.Tensor]

DEFAULT_BUCKET_BYTES = 512 << 20

# Last module-name component -> the fused module vLLM loads it into.
_FUSED = {
    "q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
    "q": "qkv", "k": "qkv", "v": "qkv",
}


class GroupOrderError(ValueError):
    """A fused group's tensors are not contiguous in the stream (it could not be kept in one bucket)."""


def fused_group_key(hf_name: str) -> str:
    """The inference-side module an HF tensor is loaded into, e.g. ``model.layers.3.self_attn.q_proj.bias`` ->
    ``model.layers.3.self_attn.qkv_proj``; ``visual.blocks.0.mlp.up_proj.weight`` -> ``visual.blocks.0.mlp.gate_up_proj``."""
    module, _, _ = hf_name.rpartition(".")
    parent, _, last = module.rpartition(".")
    fused = _FUSED.get(last)
    if fused is None:
        return module
    return f"{parent}.{fused}" if parent else fused


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def iter_fused_groups(named_tensors: Iterable[NamedTensor]) -> Iterator[List[NamedTensor]]:
    """Contiguous runs of tensors sharing a ``fused_group_key``; raises ``GroupOrderError`` if a key comes back
    after its run ended (the producer must emit a module's tensors together)."""
    done = set()
    key, group = None, []
    for name, tensor in named_tensors:
        k = fused_group_key(name)
        if k != key:
            if group:
                yield group
                done.add(key)
            if k in done:
                raise GroupOrderError(f"{name}: its fused group {k!r} was already emitted; emit a module's tensors "
                                      "together")
            key, group = k, []
        group.append((name, tensor))
    if group:
        yield group


def iter_buckets(named_tensors: Iterable[NamedTensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> Iterator[List[NamedTensor]]:
    """Pack whole fused groups, in order, into buckets of at most ``bucket_bytes`` (a single group larger than that
    is a bucket of its own: groups are never split). Streams: holds one bucket at a time."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: List[NamedTensor] = []
    size = 0
    for group in iter_fused_groups(named_tensors):
        group_size = sum(tensor_bytes(t) for _, t in group)
        if bucket and size + group_size > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(group)
        size += group_size
    if bucket:
        yield bucket


# ------------------------------------------------------------------------------------------ Megatron -> HF names
class WeightSyncError(RuntimeError):
    """Exporting or loading the weights failed on some rank of the model-parallel group."""


def _layout() -> Tuple[Any, int, int, Any, int, int]:
    """(tp_group, tp_rank, tp_size, pp_group, pp_rank, pp_size) from Megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_group(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())


def is_engine_owner() -> bool:
    """True on the rank that owns its DP replica's rollout engine: TP rank 0 of pipeline stage 0."""
    _, tp_rank, _, _, pp_rank, _ = _layout()
    return tp_rank == 0 and pp_rank == 0


def iter_stage_hf_tensors(model, transformer_impl: str = "local") -> Iterator[NamedTensor]:
    """This stage's tensors as full HF tensors, in checkpoint order. Collective over the TP group (every TP rank
    must iterate it to the end); every TP rank receives the full tensors."""
    from ..models.qwen2_5_vl.loading import gather_hf_tensors, stage_mappings

    tp_group, _, tp_size, _, pp_rank, pp_size = _layout()
    with torch.no_grad():
        for mapping in stage_mappings(model, pp_rank, pp_size, transformer_impl):
            if not mapping.export:  # the last stage's copy of tied embeddings: HF holds it once
                continue
            tensors = gather_hf_tensors(model, mapping, tp_group if tp_size > 1 else None)
            yield from zip(mapping.hf, tensors)


def _send_bucket(bucket: Optional[List[NamedTensor]], dst: int, group, error: Optional[str] = None) -> None:
    """Metadata (the packed layout and its byte count; None = end of stage; a string = the sender failed), then
    the bytes, packed as the CUDA-IPC transport packs them (``cuda_ipc.pack_bucket``: aligned, so every tensor's
    view is valid on the receiving side whatever the mix of dtypes)."""
    from ..parallel import collectives
    from .cuda_ipc import pack_bucket

    if error is not None or bucket is None:
        collectives.send_object(error, dst, group)
        return
    flat, layout = pack_bucket(bucket)
    collectives.send_object((layout, flat.numel()), dst, group)
    collectives.send(flat, dst, group)


def _recv_bucket(src: int, group, device: torch.device) -> Optional[List[NamedTensor]]:
    """The next bucket from ``src``, received on ``device``: where the sender's stage keeps its weights too (the
    same device type on every rank), so a GPU run moves it over NCCL without a host copy."""
    from ..parallel import collectives
    from .cuda_ipc import unpack_bucket

    meta = collectives.recv_object(src, group)
    if meta is None:
        return None
    if isinstance(meta, str):
        raise WeightSyncError(f"the sender (global rank {src}) failed: {meta}")
    layout, numel = meta
    return unpack_bucket(collectives.recv((numel,), torch.uint8, src, group, device=device), layout)


def iter_full_model_hf_tensors(model, bucket_bytes: int = DEFAULT_BUCKET_BYTES, transformer_impl: str = "local"
                               ) -> Iterator[NamedTensor]:
    """The full model's HF tensors on the engine owner (see module docstring); nothing on the other ranks.

    Every rank of the model-parallel group must iterate it to the end, in lockstep with the others.
    """
    import torch.distributed as dist

    _, tp_rank, _, pp_group, pp_rank, pp_size = _layout()
    owner = tp_rank == 0 and pp_rank == 0
    for stage in range(pp_size):
        if stage == pp_rank:
            stream = iter_stage_hf_tensors(model, transformer_impl)
            if owner:
                yield from stream
            elif tp_rank == 0:  # a later stage's sender
                dst = dist.get_global_rank(pp_group, 0)
                try:
                    for bucket in iter_buckets(stream, bucket_bytes):
                        _send_bucket(bucket, dst, pp_group)
                except Exception as exc:
                    _send_bucket(None, dst, pp_group, error=repr(exc))  # unblock the owner, then fail here too
                    raise
                _send_bucket(None, dst, pp_group)
            else:
                for _ in stream:  # take part in the TP all-gathers only
                    pass
        elif owner:
            src = dist.get_global_rank(pp_group, stage)
            device = next(model.parameters()).device
            while True:
                bucket = _recv_bucket(src, pp_group, device)
                if bucket is None:
                    break
                yield from bucket


def _agree(ok: bool) -> bool:
    """True iff ``ok`` on every rank of the model-parallel group."""
    from megatron.core import parallel_state as ps

    from ..parallel import collectives

    return collectives.all_ranks(ok, ps.get_model_parallel_group())


#: How long the other model-parallel ranks wait while the owner rebuilds its engine (a vLLM start: ~20 s on CPU).
RESTART_TIMEOUT_S = 900.0


def _restart_owner_engine_if_needed(engine, owner: bool) -> None:
    """If the owner's engine is not started yet or must be rebuilt, (re)start it while the other ranks wait in a
    barrier with a long timeout (not in the next collective, whose default timeout a busy machine's engine start
    can exceed)."""
    from megatron.core import parallel_state as ps

    from ..parallel import collectives

    group = ps.get_model_parallel_group()
    pending = engine is not None and (getattr(engine, "needs_restart", False) or not getattr(engine, "started", True))
    if not collectives.any_rank(owner and pending, group):
        return
    if owner:
        engine.restart()
    collectives.barrier(group, timeout_s=RESTART_TIMEOUT_S)


def sync_weights(model, engine=None, bucket_bytes: Optional[int] = None, transformer_impl: str = "local",
                 named_tensor_filter=None) -> Optional[int]:
    """Send the model's current weights to the DP replica's rollout engine; call on every model-parallel rank.

    Args:
        engine: the ``RolloutEngine`` on the owner (``is_engine_owner()``), started here if it is not; ignored
            elsewhere.
        bucket_bytes: transport bucket size between pipeline stages (default: the engine's, else 512 MB).
        named_tensor_filter: test hook, a function ``iterator -> iterator`` applied on the owner before the engine.

    Returns the engine's new weight version on the owner, None elsewhere. Raises ``WeightSyncError`` on every rank
    if any rank failed (the engine is then unusable until the next successful sync).
    """
    owner = is_engine_owner()
    if bucket_bytes is None:
        bucket_bytes = getattr(getattr(engine, "config", None), "bucket_bytes", DEFAULT_BUCKET_BYTES)
    error: Optional[BaseException] = None
    version = None
    _restart_owner_engine_if_needed(engine, owner)
    stream = iter_full_model_hf_tensors(model, bucket_bytes, transformer_impl)
    try:
        if owner:
            if engine is None:
                raise ValueError("sync_weights: the engine owner was given no engine")
            version = engine.update_weights(named_tensor_filter(stream) if named_tensor_filter else stream)
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = exc
    try:
        for _ in stream:  # the other ranks' whole part; on the owner, keeps the senders going if the engine stopped
            pass
    except Exception as exc:  # noqa: BLE001
        error = error or exc
    if not _agree(error is None):
        raise WeightSyncError(f"weight sync failed{': ' + repr(error) if error else ' on another rank'}") from error
    return version


def save_hf_checkpoint(model, out_dir: Union[str, Path], source_dir: Optional[Union[str, Path]] = None,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, transformer_impl: str = "local",
                       max_shard_bytes: Optional[int] = None) -> Optional[Path]:
    """Export the model as an HF safetensors checkpoint on the engine owner, through the converter's streaming
    writer (``hf_io.HFCheckpointWriter``: one tensor in memory at a time, shards of ``max_shard_bytes``, written as
    ``out_dir.tmp`` and renamed when complete; an existing ``out_dir`` is replaced).

    Call on every model-parallel rank. ``source_dir``: copy config, tokenizer and processor files from there.
    ``bucket_bytes``: transport bucket between pipeline stages. Returns ``out_dir`` on the owner, None elsewhere.
    """
    from ..models.qwen2_5_vl.hf_io import DEFAULT_MAX_SHARD_BYTES, HFCheckpointWriter

    stream = iter_full_model_hf_tensors(model, bucket_bytes, transformer_impl)
    if not is_engine_owner():
        for _ in stream:
            pass
        return None
    with HFCheckpointWriter(out_dir, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, overwrite=True) as writer:
        for name, tensor in stream:
            writer.add(name, tensor)
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    writer.copy_file(f)
    return Path(out_dir)
