"""Hugging Face Qwen2.5-VL checkpoint <-> Megatron-Core distributed checkpoint, streamed (never two copies).

    from_hf("Qwen2.5-VL-7B-Instruct/", "qwen7b-mcore/")        # HF safetensors -> torch_dist checkpoint
    to_hf("qwen7b-mcore/", "qwen7b-hf/")                         # and back (sharded safetensors + index)

The Megatron side is a ``megatron.core.dist_checkpointing`` checkpoint (torch_dist format) whose keys are those of
``Qwen2_5_VLMegatronModel.sharded_state_dict()``: global, TP/PP-agnostic tensors (decoder layers stacked along a
leading layer axis, ``linear_fc1`` saved as its [gate; up] halves, the vocabulary padded), so training loads it at
any TP/PP with ``load_checkpoint_into_model``. The directory also holds the HF ``config.json``, a small
``megatron_pgpo.json`` (source, transformer_impl, vocabulary sizes) and the HF tokenizer/processor files under
``hf_files/``, so ``to_hf`` needs nothing else.

Memory (measured by ``benchmarks/bench_convert_memory.py``):

* HF -> Megatron: the TP=1 model is built on the META device (no memory), each ShardedTensor's data is filled from
  the HF tensors one mapping at a time (``mapping.to_mcore``), then one ``dist_checkpointing.save``. Peak: one
  copy of the checkpoint plus one mapping's temporaries. HF tensors are read with plain file reads, not mmap, so
  the page cache of the source files does not count as resident memory.
* Megatron -> HF: a few layers at a time are loaded from the dist checkpoint (a sharded state dict naming some
  keys loads just those), converted with ``mapping.to_hf`` and written straight into the open safetensors shard.
  Peak: one load step (``step_bytes``, default 1/16 of the checkpoint, at most 1 GiB) or twice the largest single
  tensor (torch's checkpoint reader makes a temporary copy of each stored tensor), whichever is larger.

Both directions check everything they can before reading a weight: the model type, the parallel layout asked for
(``tp``/``pp``), every tensor name and shape (errors list the key names). Output directories are written as
``<dir>.tmp`` and renamed at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .hf_config import ModelConfigError, TextDims, load_hf_config, validate_parallel_layout
from .hf_io import (DEFAULT_MAX_SHARD_BYTES, CheckpointMismatch, HFCheckpointReader, HFCheckpointWriter,
                    mismatch_error)
from .mapping import ParamMapping, tied_output_names, to_hf as mapping_to_hf, to_mcore

PathLike = Union[str, Path]

METADATA_NAME = "megatron_pgpo.json"
HF_FILES_DIR = "hf_files"
FORMAT_VERSION = 1
#: Small HF files carried through a round trip (the weights and config.json are handled separately).
HF_SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUPPORTED_TRANSFORMER_IMPLS = ("local",)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor" if "tensor" in desc else "step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- process group
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_process_megatron() -> Iterator[None]:
    """A 1-rank gloo group with Megatron's parallel state at TP=PP=1, for the length of the block.

    ``dist_checkpointing`` and the model build need them. Whatever this sets up it also tears down (process group,
    parallel state, CPU patches, the global RNG state), so a library caller's process is left as it was. Inside a
    process that already has a 1-rank group, that group is used; inside a multi-rank job conversion is refused.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ...compat.megatron_cpu import apply_cpu_patches, cpu_patches_applied, init_cpu_distributed, \
        remove_cpu_patches, set_model_parallel_layout

    rng = torch.random.get_rng_state()
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("checkpoint conversion runs in a single process; call it outside the "
                               f"{dist.get_world_size()}-rank job")
        apply_cpu_patches()
        set_model_parallel_layout(1, 1, seed=None)
        try:
            yield
        finally:
            torch.random.set_rng_state(rng)
        return
    patched_before = cpu_patches_applied()
    init_cpu_distributed(0, 1, _free_port(), tp=1, pp=1, seed=None)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        if not patched_before:
            remove_cpu_patches()
        torch.random.set_rng_state(rng)


# ----------------------------------------------------------------------------------------- the model's layout
def build_meta_model(hf_config, transformer_impl: str = "local", make_vocab_size_divisible_by: int = 128,
                     dtype: str = "fp32"):
    """The TP=1/PP=1 ``Qwen2_5_VLMegatronModel`` on the META device: its names, shapes and sharded state dict,
    without memory. Needs Megatron's parallel state at TP=PP=1 (``single_process_megatron``)."""
    from .model import build_model

    if transformer_impl not in SUPPORTED_TRANSFORMER_IMPLS:
        raise ModelConfigError(f"conversion supports transformer_impl {SUPPORTED_TRANSFORMER_IMPLS}, not "
                               f"{transformer_impl!r} (dist-checkpoint keys are the same under the TE spec; "
                               "convert with 'local')")
    with torch.device("meta"):
        return build_model(hf_config, tp=1, pp=1, dtype=dtype, transformer_impl=transformer_impl,
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by, init_weights=False,
                           pre_process=True, post_process=True)


def model_mappings(model, transformer_impl: str = "local") -> List[ParamMapping]:
    """Every HF <-> Megatron mapping of the whole (TP=1/PP=1) model, in checkpoint order (exported ones only:
    no tied copies)."""
    from .loading import stage_mappings

    return [m for m in stage_mappings(model, 0, 1, transformer_impl) if getattr(m, "export", True)]


def expected_hf_shapes(model, mappings: Sequence[ParamMapping]) -> Dict[str, Tuple[int, ...]]:
    """HF tensor name -> shape, derived from the model's own (meta) parameters through ``mapping.to_hf``."""
    params = model.state_dict()
    shapes: Dict[str, Tuple[int, ...]] = {}
    for m in mappings:
        local = torch.empty(params[m.mcore].shape, device="meta")
        for name, t in zip(m.hf, mapping_to_hf(m.kind, [local], model.dims, vocab_size=model.vocab_size)):
            shapes[name] = tuple(t.shape)
    return shapes


def check_hf_checkpoint(reader: HFCheckpointReader, model, mappings: Sequence[ParamMapping]) -> None:
    """Raise ``CheckpointMismatch`` naming missing / unexpected tensors and every wrong shape (reads headers only)."""
    shapes = expected_hf_shapes(model, mappings)
    reader.check_names(shapes, allow_extra=tied_output_names(model.dims))
    wrong = [f"{name}: checkpoint {tuple(reader.shape(name))}, config expects {shape}"
             for name, shape in shapes.items() if tuple(reader.shape(name)) != shape]
    if wrong:
        raise CheckpointMismatch(f"{reader.path}: {len(wrong)} tensor(s) have the wrong shape for its config.json: "
                                 + "; ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))


def _is_tensor_entry(value) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return isinstance(value, (ShardedTensor, ShardedTensorFactory))


def _built(entry) -> list:
    """The ShardedTensors an entry is saved as (a factory's build on its meta data; a ShardedTensor itself)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    return list(entry.build()) if isinstance(entry, ShardedTensorFactory) else [entry]


def expected_checkpoint_tensors(sharded_state_dict: Dict[str, Any]) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """Checkpoint key -> (global shape, allow_shape_mismatch) of every tensor a sharded state dict loads."""
    out: Dict[str, Tuple[Tuple[int, ...], bool]] = {}
    for value in sharded_state_dict.values():
        if _is_tensor_entry(value):
            for st in _built(value):
                out[st.key] = (tuple(st.global_shape), bool(st.allow_shape_mismatch))
    return out


def check_megatron_checkpoint(ckpt_dir: PathLike, sharded_state_dict: Dict[str, Any], vocab_size: int,
                              ckpt_metadata: Optional[Dict[str, Any]] = None, allow_unexpected: bool = False) -> None:
    """Raise ``CheckpointMismatch`` naming the missing / unexpected checkpoint tensors and wrong global shapes.

    Vocabulary-padded tensors (``allow_shape_mismatch``) may be padded differently (another TP size); they must hold
    at least ``vocab_size`` rows and match in every other dimension.
    """
    from megatron.core import dist_checkpointing

    if ckpt_metadata is None:
        ckpt_metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    expected = expected_checkpoint_tensors(sharded_state_dict)
    have = {key: tuple(st.global_shape) for key, st in ckpt_metadata.items()}
    missing = sorted(set(expected) - set(have))
    unexpected = [] if allow_unexpected else sorted(set(have) - set(expected))
    wrong = []
    for key in sorted(set(expected) & set(have)):
        shape, flexible = expected[key]
        found = have[key]
        ok = found == shape or (flexible and len(found) == len(shape) and found[1:] == shape[1:]
                                and found[0] >= vocab_size)
        if not ok:
            wrong.append(f"{key}: checkpoint {found}, model expects {shape}")
    if missing or unexpected or wrong:
        raise mismatch_error(ckpt_dir, missing, unexpected, wrong)


# ------------------------------------------------------------------------------------------------- metadata
def write_checkpoint_metadata(ckpt_dir: PathLike, hf_config, *, source: Optional[str] = None,
                              transformer_impl: str = "local", make_vocab_size_divisible_by: int = 128,
                              padded_vocab_size: Optional[int] = None, config_json: Optional[str] = None) -> None:
    """Write ``config.json`` and ``megatron_pgpo.json`` into a Megatron checkpoint directory.

    ``config_json``: the original HF config text to keep verbatim (default: ``hf_config.to_json_string()``).
    Call it for checkpoints saved by training too, so ``to_hf`` can export them.
    """
    ckpt_dir = Path(ckpt_dir)
    dims = TextDims.from_hf(hf_config)
    (ckpt_dir / "config.json").write_text(config_json if config_json is not None else hf_config.to_json_string())
    meta = {
        "format": "megatron_pgpo.qwen2_5_vl.dist_checkpoint",
        "format_version": FORMAT_VERSION,
        "source": source,
        "transformer_impl": transformer_impl,
        "vocab_size": dims.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "tie_word_embeddings": dims.tie_word_embeddings,
    }
    (ckpt_dir / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def resolve_checkpoint_dir(path: PathLike) -> Path:
    """The Megatron checkpoint directory meant by ``path``: itself, a training checkpoint ``step_XXXXXXXX`` (its
    ``model_optim``), or a run directory (its latest checkpoint's ``model_optim``)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file() and latest.read_text().strip():
        path = path / "checkpoints" / latest.read_text().strip()
    if (path / "model_optim" / "metadata.json").is_file():
        path = path / "model_optim"
    return path


def read_checkpoint_metadata(ckpt_dir: PathLike) -> Tuple[Any, Dict[str, Any]]:
    """(HF config, ``megatron_pgpo.json`` dict) of a Megatron checkpoint directory; clear errors when absent."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a Megatron-Core distributed checkpoint (no metadata.json)")
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no HF config.json; write it with write_checkpoint_metadata()")
    meta_path = ckpt_dir / METADATA_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ModelConfigError(f"{meta_path}: format_version {meta['format_version']} is newer than this "
                               f"megatron-pgpo understands ({FORMAT_VERSION})")
    return load_hf_config(ckpt_dir), meta


def _copy_side_files(sources: Sequence[Path], dest: Path) -> List[str]:
    """Copy the HF side files found in the first of ``sources`` that has each; returns the names copied."""
    copied = []
    for name in HF_SIDE_FILES:
        for src in sources:
            if (src / name).is_file():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, dest / name)
                copied.append(name)
                break
    return copied


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _commit_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)


# ------------------------------------------------------------------------------------------- HF -> Megatron
def from_hf(hf_dir: PathLike, out_dir: PathLike, *, dtype: Optional[str] = None, tp: int = 1, pp: int = 1,
            make_vocab_size_divisible_by: int = 128, transformer_impl: str = "local", overwrite: bool = False,
            progress: bool = True, first_stage_layers: Optional[int] = None,
            last_stage_layers: Optional[int] = None) -> Path:
    """Convert the HF Qwen2.5-VL checkpoint at ``hf_dir`` into a Megatron-Core dist checkpoint at ``out_dir``.

    Args:
        dtype: ``fp32`` / ``bf16`` / ``fp16`` to cast to; None keeps each tensor's dtype (bit-exact round trip).
        tp, pp: the layout the checkpoint will be trained at; checked against the config before any weight is read
            (the checkpoint itself loads at any layout that divides the model). ``first_stage_layers`` /
            ``last_stage_layers``: that layout's uneven pipeline split, checked likewise (layers are saved under
            their global indices, so the checkpoint loads at any split).
        make_vocab_size_divisible_by: Megatron's vocabulary padding unit (the training config's value).
        overwrite: replace an existing ``out_dir``.

    Raises:
        ModelConfigError: unsupported model type or layout. CheckpointMismatch: missing / unexpected tensors or
        wrong shapes (with their names). Both before any weight is read.
    """
    from megatron.core import dist_checkpointing

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cast = _dtype(dtype)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    hf_config = load_hf_config(hf_dir)  # unsupported model types fail here
    validate_parallel_layout(TextDims.from_hf(hf_config), tp, pp, first_stage_layers, last_stage_layers)
    with HFCheckpointReader(hf_dir) as reader, single_process_megatron():
        model = build_meta_model(hf_config, transformer_impl, make_vocab_size_divisible_by)
        mappings = model_mappings(model, transformer_impl)
        check_hf_checkpoint(reader, model, mappings)
        sharded = model.sharded_state_dict()
        by_key = {m.mcore: m for m in mappings}
        unmapped = sorted(k for k, v in sharded.items() if _is_tensor_entry(v) and k not in by_key)
        if unmapped:
            raise CheckpointMismatch(f"no HF mapping for Megatron tensors {unmapped} (layer spec mismatch?)")

        staging = _prepare_out_dir(out_dir, overwrite)
        try:
            to_save: Dict[str, Any] = {k: v for k, v in sharded.items() if not _is_tensor_entry(v)}  # _extra_state
            for m in _progress(mappings, len(mappings), "HF -> Megatron tensors", progress):
                hf = [reader.read_copy(name) for name in m.hf]
                if cast is not None:
                    hf = [t.to(cast) for t in hf]
                entry = sharded[m.mcore]
                if m.kind == "fc1":
                    # SwiGLU fc1 is saved as two halves, [gate] and [up] (a factory chunks it when a model saves):
                    # give each half its own HF tensor so no view has to be cloned by the writer.
                    pieces = _built(entry)
                    to_save[m.mcore] = [_filled(p, t, m) for p, t in zip(pieces, hf)]
                else:
                    data = to_mcore(m.kind, hf, model.dims, 0, 1, padded_vocab=model.padded_vocab_size)
                    to_save[m.mcore] = _filled(entry, data, m)
                del hf
            dist_checkpointing.save(to_save, str(staging))
            del to_save
            write_checkpoint_metadata(staging, hf_config, source=str(hf_dir.resolve()),
                                      transformer_impl=transformer_impl,
                                      make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                      padded_vocab_size=model.padded_vocab_size,
                                      config_json=_config_text_with_dtype((hf_dir / "config.json").read_text(), cast))
            _copy_side_files([hf_dir], staging / HF_FILES_DIR)
            _commit_dir(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir


def _filled(entry, data: torch.Tensor, m: ParamMapping):
    """``entry`` (a meta ShardedTensor) with real ``data``, after checking the shape."""
    if tuple(data.shape) != tuple(entry.local_shape):
        raise CheckpointMismatch(f"{m.mcore} (from {', '.join(m.hf)}): conversion gives shape {tuple(data.shape)}, "
                                 f"the model expects {tuple(entry.local_shape)}")
    return replace(entry, data=data.contiguous(), dtype=data.dtype)


# ------------------------------------------------------------------------------------------- Megatron -> HF
def _mapping_bytes(m: ParamMapping, sharded: Dict[str, Any], ckpt_metadata: Dict[str, Any]) -> int:
    total = 0
    for st in _built(sharded[m.mcore]):
        total += st.data.numel() * ckpt_metadata[st.key].dtype.itemsize
    return total


def _load_steps(mappings: Sequence[ParamMapping], sizes: Sequence[int], step_bytes: int) -> List[List[int]]:
    """Indices of ``mappings`` grouped into load steps: a decoder layer is never split; consecutive units are
    packed while the step stays within ``step_bytes`` (a larger unit gets a step of its own)."""
    units: List[List[int]] = []
    unit_of: Dict[str, int] = {}
    for i, m in enumerate(mappings):
        parts = m.mcore.split(".")
        layer = ".".join(parts[:4]) if m.mcore.startswith("language_model.decoder.layers.") else None
        if layer is not None and layer in unit_of:
            units[unit_of[layer]].append(i)
            continue
        if layer is not None:
            unit_of[layer] = len(units)
        units.append([i])
    steps: List[List[int]] = []
    current: List[int] = []
    current_bytes = 0
    for unit in units:
        size = sum(sizes[i] for i in unit)
        if current and current_bytes + size > step_bytes:
            steps.append(current)
            current, current_bytes = [], 0
        current += unit
        current_bytes += size
    if current:
        steps.append(current)
    return steps


def to_hf(mcore_dir: PathLike, out_dir: PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          dtype: Optional[str] = None, step_bytes: Optional[int] = None, overwrite: bool = False,
          progress: bool = True) -> Path:
    """Convert the Megatron dist checkpoint at ``mcore_dir`` (written by ``from_hf`` or by training, with
    ``write_checkpoint_metadata``) into an HF safetensors checkpoint at ``out_dir``.

    Args:
        max_shard_bytes: largest safetensors shard (default 5 GB, transformers' default).
        dtype: cast to ``fp32`` / ``bf16`` / ``fp16``; None keeps the checkpoint's dtypes.
        step_bytes: how much Megatron data one load step may read (default: 1/16 of the checkpoint, at most
            1 GiB); a decoder layer is never split.

    Raises:
        CheckpointMismatch: missing / unexpected checkpoint tensors or wrong shapes (with the key names), before
        any weight is read.
    """
    from megatron.core import dist_checkpointing

    mcore_dir, out_dir = resolve_checkpoint_dir(mcore_dir), Path(out_dir)
    cast = _dtype(dtype)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    hf_config, meta = read_checkpoint_metadata(mcore_dir)
    transformer_impl = meta.get("transformer_impl", "local")
    with single_process_megatron():
        model = build_meta_model(hf_config, transformer_impl, meta.get("make_vocab_size_divisible_by", 128))
        mappings = model_mappings(model, transformer_impl)
        sharded = model.sharded_state_dict()
        ckpt_metadata = dist_checkpointing.load_tensors_metadata(str(mcore_dir))
        # A training checkpoint also holds the optimizer state: only the model's tensors must match.
        model_metadata = {k: v for k, v in ckpt_metadata.items() if not k.startswith("optimizer.")}
        check_megatron_checkpoint(mcore_dir, sharded, model.vocab_size, model_metadata)
        sizes = [_mapping_bytes(m, sharded, ckpt_metadata) for m in mappings]
        if step_bytes is None:
            step_bytes = min(1 << 30, max(1, sum(sizes) // 16))
        steps = _load_steps(mappings, sizes, step_bytes)
        source = Path(meta["source"]) if meta.get("source") else None
        with HFCheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            bar = _progress(None, len(mappings), "Megatron -> HF tensors", progress)
            for step in steps:
                buffers, request = {}, {}
                for i in step:
                    buffers[i], request[mappings[i].mcore] = _load_request(sharded[mappings[i].mcore], ckpt_metadata)
                # A step reads some layers of each stacked layer tensor: Megatron's access-integrity check (every
                # shard of a global tensor read by some rank) does not apply to a partial read.
                dist_checkpointing.load(request, str(mcore_dir), validate_access_integrity=False)
                del request
                for i in step:
                    m = mappings[i]
                    tensor = buffers.pop(i)  # filled in place
                    for name, t in zip(m.hf, mapping_to_hf(m.kind, [tensor], model.dims, model.vocab_size)):
                        writer.add(name, t.to(cast) if cast is not None else t)
                    del tensor, t
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
            writer.write_text("config.json", _config_text_with_dtype((mcore_dir / "config.json").read_text(), cast))
            sources = [mcore_dir / HF_FILES_DIR] + ([source] if source is not None else [])
            _copy_side_files([s for s in sources if s.is_dir()], writer.staging_dir)
    return out_dir


def _load_request(entry, ckpt_metadata: Dict[str, Any]):
    """(buffer, ShardedTensors that load into it) for one sharded-state-dict entry.

    The buffer is an empty CPU tensor of the entry's local shape and the checkpoint's dtype; a factory (SwiGLU
    fc1) is built on it, so its halves load straight into the two views. Every ShardedTensor is rewritten without
    ``prepend_axis_num`` (the layer axis becomes a real axis of size 1): Megatron 0.16.1 turns prepended-axis
    tensors into torch ShardedTensors whose other shards it places on "rank (r + 1) % world_size", which is this
    very rank in a 1-process group, so a partial read of a stacked tensor fails ("Number of local shards (1) does
    not match ... (2)"); the axis-free form goes through its newer loader, which has no such assumption.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    key = _built(entry)[0].key
    dtype = ckpt_metadata[key].dtype
    buffer = torch.empty(tuple(entry.data.shape), dtype=dtype)
    if isinstance(entry, ShardedTensorFactory):
        pieces = entry.build_fn(entry.key, buffer, entry.replica_id, entry.flattened_range)
    else:
        pieces = [replace(entry, data=buffer, dtype=dtype)]
    return buffer, [_without_prepended_axes(p) for p in pieces]


def _without_prepended_axes(st):
    n = st.prepend_axis_num
    if not n:
        return st
    return replace(st, data=st.data.view((1,) * n + tuple(st.data.shape)), local_shape=(1,) * n + tuple(st.local_shape),
                   prepend_axis_num=0)


def _config_text_with_dtype(text: str, cast: Optional[torch.dtype]) -> str:
    """An HF config.json text, verbatim; with its ``dtype`` updated when the weights were cast."""
    if cast is None:
        return text
    config = json.loads(text)
    config["dtype"] = str(cast).replace("torch.", "")
    config.pop("torch_dtype", None)  # transformers 4.x name of the same field
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# ------------------------------------------------------------------------------------- loading for training
def load_checkpoint_into_model(model, ckpt_dir: PathLike, strict: bool = True) -> None:
    """Load a Megatron dist checkpoint into ``model`` (this rank's ``Qwen2_5_VLMegatronModel`` stage, any TP/PP).

    Checks every key and global shape against the checkpoint's metadata first (``CheckpointMismatch`` with the
    key names; a checkpoint with more tensors than this stage needs is fine), then loads with
    ``dist_checkpointing.load``. Collective over the whole job (every rank calls it).
    """
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict()
    check_megatron_checkpoint(ckpt_dir, sharded, model.vocab_size, allow_unexpected=True)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict:
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointMismatch(f"{ckpt_dir}: after loading, model keys missing {missing}, unexpected "
                                     f"{unexpected}")
