"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time (single file or sharded + index).

Nothing here holds a whole checkpoint: ``HFCheckpointReader`` opens the files lazily and hands out tensors by
name, and ``HFCheckpointWriter`` writes each tensor to its shard file as it arrives, so a 72B checkpoint can be
converted or loaded shard by shard on a node that cannot hold it twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointMismatch(ValueError):
    """The checkpoint does not hold what the model needs; the message lists the key names."""


def mismatch_error(where, missing=(), unexpected=(), wrong=()) -> CheckpointMismatch:
    """One error listing (the first ten of) each kind of mismatch between a checkpoint and the model."""
    def show(names):
        names = list(names)
        return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")

    parts = [f"{label}: {show(items)}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    return CheckpointMismatch(f"{where} does not match the model config: " + "; ".join(parts))


class HFCheckpointReader:
    """Lazy name -> tensor access to an HF safetensors checkpoint directory.

    Use as a context manager or call ``close()``; ``tensor(name)`` returns a fresh CPU tensor.
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).is_file():
            from safetensors import safe_open

            with safe_open(self.path / SINGLE_NAME, "pt") as f:
                weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} (not an HF safetensors checkpoint)")
        self.weight_map = weight_map
        self._handles: Dict[str, object] = {}

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, filename: str):
        from safetensors import safe_open

        if filename not in self._handles:
            self._handles[filename] = safe_open(self.path / filename, "pt")
        return self._handles[filename]

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointMismatch(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def read_copy(self, name: str) -> torch.Tensor:
        """``name`` read with plain file reads into fresh memory, not through a memory map.

        ``tensor()`` returns tensors backed by safetensors' memory map: their pages count as resident memory of the
        process once touched (and stay while the file is open). A converter that keeps one copy of a large
        checkpoint reads with this instead, so only that copy is resident.
        """
        if name not in self.weight_map:
            raise CheckpointMismatch(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        filename = self.weight_map[name]
        headers = self.__dict__.setdefault("_headers", {})
        if filename not in headers:
            headers[filename] = read_safetensors_header(self.path / filename)
        data_start, entries = headers[filename]
        entry = entries[name]
        dtype = {code: dt for dt, code in SAFETENSORS_DTYPES.items()}[entry["dtype"]]
        out = torch.empty(entry["shape"], dtype=dtype)
        begin, end = entry["data_offsets"]
        if end - begin != out.numel() * out.element_size():
            raise CheckpointMismatch(f"{self.path / filename}: {name} has {end - begin} bytes for shape "
                                     f"{entry['shape']} {entry['dtype']}")
        if end > begin:
            with open(self.path / filename, "rb") as f:
                f.seek(data_start + begin)
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointMismatch(f"{self.path / filename}: truncated while reading {name}")
                    got += n
        return out

    def shape(self, name: str) -> List[int]:
        return list(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def check_names(self, expected: Iterable[str], allow_extra: Iterable[str] = ()) -> None:
        """Raise ``CheckpointMismatch`` listing missing and unexpected tensor names."""
        expected = set(expected)
        have = set(self.weight_map)
        missing = sorted(expected - have)
        unexpected = sorted(have - expected - set(allow_extra))
        if missing or unexpected:
            raise mismatch_error(self.path, missing, unexpected)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_safetensors_header(path: Union[str, Path]):
    """``(data_start, {name: {"dtype", "shape", "data_offsets"}})`` of one safetensors file (header only)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


# ------------------------------------------------------------------------------------------------------ writing
#: safetensors dtype codes (the header's ``dtype`` field).
SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # what transformers' save_pretrained uses ("5GB")


def shard_file_name(index: int, total: int) -> str:
    """``model-00001-of-00004.safetensors`` (1-based ``index``)."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


class _OpenShard:
    """One safetensors file being written: data goes to disk as tensors arrive; the header is filled in at the end.

    The header of a safetensors file comes before the data and holds every tensor's offsets, which are unknown
    until the shard is complete. So the data starts after ``reserve`` bytes, and ``finish`` writes the header into
    that space, padded with spaces (valid JSON; safetensors pads its own headers the same way). A header that
    does not fit (very many tensors) is handled by copying the data into a new file behind a larger header.
    """

    def __init__(self, path: Path, reserve: int):
        self.path = path
        self.reserve = reserve
        self.file = open(path, "wb")
        self.file.seek(reserve)
        self.entries: Dict[str, dict] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        if size:
            # A byte view of the tensor's own memory: no copy (numpy has no bfloat16, uint8 has no such issue).
            self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [self.nbytes, self.nbytes + size]}
        self.nbytes += size

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        room = self.reserve - 8
        if len(header) <= room:
            self.file.seek(0)
            self.file.write(room.to_bytes(8, "little"))
            self.file.write(header + b" " * (room - len(header)))
            self.file.close()
            return
        # Header larger than the reserved space: rewrite the file (streamed, 64 MiB at a time).
        self.file.close()
        padded = header + b" " * (-(8 + len(header)) % 8)
        moved = self.path.with_name(self.path.name + ".relocate")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(len(padded).to_bytes(8, "little"))
            dst.write(padded)
            src.seek(self.reserve)
            while True:
                chunk = src.read(64 << 20)
                if not chunk:
                    break
                dst.write(chunk)
        os.replace(moved, self.path)


class HFCheckpointWriter:
    """Write an HF safetensors checkpoint tensor by tensor, in shards of at most ``max_shard_bytes``.

    Memory: nothing is buffered; each ``add`` writes the tensor's bytes to the open shard file at once. A shard is
    closed when the next tensor would overflow it (a single larger tensor gets a shard of its own).

    Atomicity: everything goes into ``<out_dir>.tmp``; ``close()`` renames the shards to their final
    ``model-0000i-of-0000N.safetensors`` names (a single shard is ``model.safetensors``, as transformers writes it),
    writes ``model.safetensors.index.json`` (sharded case) and only then renames the directory to ``out_dir``. A
    crash or an exception inside ``with HFCheckpointWriter(...)`` leaves no ``out_dir`` behind.

    Other files of the checkpoint (config.json, tokenizer files) go into ``staging_dir`` before ``close()``, with
    ``write_text`` / ``copy_file``.
    """

    def __init__(self, out_dir: Union[str, Path], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False, header_reserve_bytes: int = 128 << 10):
        self.out_dir = Path(out_dir)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists (pass overwrite=True to replace it)")
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        self.header_reserve_bytes = max(64, (int(header_reserve_bytes) + 7) // 8 * 8)
        self.staging_dir = self.out_dir.with_name(self.out_dir.name + ".tmp")
        if self.staging_dir.exists():  # left over from a crashed run of ours
            import shutil

            shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir(parents=True)
        self._shard: Optional[_OpenShard] = None
        self._shard_paths: List[Path] = []
        self._weight_map: Dict[str, int] = {}  # name -> 0-based shard index
        self.total_bytes = 0
        self.closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (written to disk now; the caller may free it right after)."""
        if self.closed:
            raise RuntimeError("HFCheckpointWriter is closed")
        if name in self._weight_map:
            raise ValueError(f"tensor {name!r} was already written")
        size = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.entries and self._shard.nbytes + size > self.max_shard_bytes:
            self._finish_shard()
        if self._shard is None:
            path = self.staging_dir / f"shard-{len(self._shard_paths) + 1:05d}.safetensors.part"
            self._shard = _OpenShard(path, self.header_reserve_bytes)
            self._shard_paths.append(path)
        self._shard.add(name, tensor)
        self._weight_map[name] = len(self._shard_paths) - 1
        self.total_bytes += size

    def _finish_shard(self) -> None:
        if self._shard is not None:
            self._shard.finish()
            self._shard = None

    def write_text(self, relative_name: str, text: str) -> Path:
        path = self.staging_dir / relative_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def copy_file(self, source: Union[str, Path], relative_name: Optional[str] = None) -> Path:
        import shutil

        source = Path(source)
        path = self.staging_dir / (relative_name or source.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path

    def close(self) -> Path:
        """Finish the last shard, name the shards, write the index, move the directory into place."""
        if self.closed:
            return self.out_dir
        if not self._weight_map:
            raise RuntimeError("no tensors were written")
        self._finish_shard()
        total = len(self._shard_paths)
        names = [SINGLE_NAME] if total == 1 else [shard_file_name(i + 1, total) for i in range(total)]
        for path, name in zip(self._shard_paths, names):
            os.replace(path, self.staging_dir / name)
        if total > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[v] for k, v in sorted(self._weight_map.items())}}
            (self.staging_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.out_dir.exists():  # overwrite=True (checked in __init__)
            import shutil

            shutil.rmtree(self.out_dir)
        os.replace(self.staging_dir, self.out_dir)
        self.closed = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far (no ``out_dir`` is created)."""
        import shutil

        if self._shard is not None:
            self._shard.file.close()
            self._shard = None
        self.closed = True
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def __enter__(self) -> "HFCheckpointWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
