"""Worker-side half of the vLLM weight update: mixed into every vLLM worker via ``worker_extension_cls``.

``VLLMEngine`` names ``PGPOWorkerExtension`` in its engine arguments; vLLM then adds these methods to its worker
class and ``collective_rpc("pgpo_...")`` calls them by name (no pickled callables, so no
``VLLM_ALLOW_INSECURE_SERIALIZATION``). Each update is a small transaction with a version handshake:

    pgpo_begin_update(v)                  every later call must carry v; the worker forgets what it received
    pgpo_load_bucket(v, payload) x N      payload: safetensors bytes, a CUDA IPC handle of the owner's GPU buffer
                                          (``cuda_ipc.py``) or [(name, tensor)] (in-process);
                                          ``self.reload_weights`` loads it (vLLM fuses/shards the HF tensors);
                                          returns (names received, CRC32 of the bytes, None for the other two)
    pgpo_commit(v, expected_names)        succeeds only if every expected name arrived in this transaction; then
                                          the worker's committed version becomes v

A worker whose update raised keeps its previous committed version and reports ``pending`` != None: the driver
treats the engine as unusable (the model may hold a mix of versions, or parameters left on the meta device by a
failed reload) until a later transaction commits, after a restart if a reload itself raised.
This module imports only light things at import time: vLLM imports it in the engine process.
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

Payload = Union[bytes, Dict[str, "object"], List[Tuple[str, "object"]]]


def decode_payload(payload: Payload, device=None):
    """``[(name, tensor)]`` from safetensors bytes, a ``cuda_ipc`` payload (opened on ``device``, the worker's GPU)
    or an in-process list."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        from safetensors.torch import load

        return list(load(bytes(payload)).items())
    if isinstance(payload, dict):
        from .cuda_ipc import open_bucket

        return open_bucket(payload, device)
    return list(payload)


#: Modules whose only tensors are buffers derived from the config (rotary tables, the image normalisation
#: constants), never checkpoint weights: on every reload vLLM's layerwise loader warns "<Module>: Failed to load
#: weights" for them and then restores the buffers itself (``reload/layerwise.py``), 3 lines per update.
BUFFER_ONLY_MODULES = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")


class _BufferOnlyReloadFilter:
    """Drops vLLM's "Failed to load weights" warning for ``BUFFER_ONLY_MODULES`` only; any other module's keeps
    reaching the log (there it would mean a weight the update did not carry)."""

    def filter(self, record) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        return record.args[0] not in BUFFER_ONLY_MODULES


class _PartialBucketFilter:
    """Drops vLLM's "Following weights were not loaded from checkpoint" after each ``reload_weights``: an update
    arrives in buckets, so every bucket but a whole-model one leaves most weights for later calls (measured: with
    16 MiB buckets each sync logged one such line per bucket, naming nearly every tensor). Completeness is checked
    once, where it means something: ``pgpo_commit`` refuses an update whose expected names did not all arrive."""

    def filter(self, record) -> bool:
        return record.msg != "Following weights were not loaded from checkpoint: %s"


#: logger name -> the filter it gets (vLLM's reload modules).
_RELOAD_FILTERS = {
    "vllm.model_executor.model_loader.reload.layerwise": _BufferOnlyReloadFilter,
    "vllm.model_executor.model_loader.reload.inplace": _PartialBucketFilter,
}


def quiet_bucketed_reload_warnings() -> None:
    """Install the filters on vLLM's reload loggers (idempotent)."""
    import logging

    for name, cls in _RELOAD_FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


class PGPOWorkerExtension:
    """Methods added to vLLM's worker (see module docstring). State lives in ``self._pgpo``."""

    def _pgpo_state(self) -> Dict:
        state = getattr(self, "_pgpo", None)
        if state is None:
            state = {"version": 0, "pending": None, "received": set()}
            self._pgpo = state
            quiet_bucketed_reload_warnings()
        return state

    def pgpo_begin_update(self, version: int) -> int:
        state = self._pgpo_state()
        state["pending"], state["received"] = int(version), set()
        return state["version"]

    def pgpo_load_bucket(self, version: int, payload: Payload) -> Tuple[int, Optional[int]]:
        state = self._pgpo_state()
        if state["pending"] != version:
            raise RuntimeError(f"bucket for weight version {version} but the open update is {state['pending']}")
        crc = zlib.crc32(payload) if isinstance(payload, (bytes, bytearray)) else None
        named = decode_payload(payload, getattr(self, "device", None))
        self.reload_weights(weights_iterator=named)
        if isinstance(payload, dict):  # the owner frees the shared buffer when this returns: finish reading it first
            import torch

            torch.cuda.current_stream().synchronize()
        state["received"].update(name for name, _ in named)
        return len(named), crc

    def pgpo_commit(self, version: int, expected_names: Sequence[str]) -> int:
        state = self._pgpo_state()
        if state["pending"] != version:
            raise RuntimeError(f"commit of weight version {version} but the open update is {state['pending']}")
        missing = set(expected_names) - state["received"]
        if missing:
            raise RuntimeError(f"update {version} is incomplete: {len(missing)} tensors never arrived, e.g. "
                               f"{sorted(missing)[:3]}")
        self._pgpo_refresh_tied_heads()
        state["version"], state["pending"], state["received"] = int(version), None, set()
        return state["version"]

    def _pgpo_refresh_tied_heads(self) -> None:
        """Re-derive the kernel-side copy of an output head tied to the input embedding.

        With ``tie_word_embeddings`` the checkpoint has no ``lm_head.weight``, so a reload never touches the head
        module; but vLLM's CPU backend packs the head's weight into a separate GEMM handle (oneDNN / packed copy)
        after loading, which then keeps serving the OLD embedding (measured: greedy output diverged at token 0
        for tied tiny presets). Re-running the head's post-load processing rebuilds that handle from the shared,
        already updated weight. A no-op for untied heads.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

        model = self.model_runner.get_model()
        embedding_ptrs = {m.weight.data_ptr() for m in model.modules()
                          if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
        with set_current_vllm_config(self.vllm_config):
            for module in model.modules():
                if isinstance(module, ParallelLMHead) and module.weight.data_ptr() in embedding_ptrs:
                    module.quant_method.process_weights_after_loading(module)

    def pgpo_weight_state(self) -> Dict:
        state = self._pgpo_state()
        return {"version": state["version"], "pending": state["pending"]}
