"""Reading Hugging Face safetensors checkpoints one tensor at a time (single file or sharded with an index).

Nothing here loads a whole checkpoint: ``HFCheckpointReader`` opens the files lazily and hands out tensors by
name, so a 72B checkpoint can be converted or loaded shard by shard on a node that cannot hold it twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Union

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointMismatch(ValueError):
    """The checkpoint does not hold what the model needs; the message lists the key names."""


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

    def shape(self, name: str) -> List[int]:
        return list(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def check_names(self, expected: Iterable[str], allow_extra: Iterable[str] = ()) -> None:
        """Raise ``CheckpointMismatch`` listing missing and unexpected tensor names."""
        expected = set(expected)
        have = set(self.weight_map)
        missing = sorted(expected - have)
        unexpected = sorted(have - expected - set(allow_extra))
        if missing or unexpected:
            def show(names):
                return ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")

            parts = []
            if missing:
                parts.append(f"missing: {show(missing)}")
            if unexpected:
                parts.append(f"unexpected: {show(unexpected)}")
            raise CheckpointMismatch(f"{self.path} does not match the model config: " + "; ".join(parts))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
