"""Rollouts: the engine interface (``engine``), the vLLM engine (``vllm_engine``, worker side ``vllm_worker``),
and moving trained weights into it (``weight_sync``). Importing this package imports neither vLLM nor Megatron."""
from .engine import EngineUnusable, RolloutEngine, RolloutOutput, RolloutRequest, SamplingConfig

__all__ = ["EngineUnusable", "RolloutEngine", "RolloutOutput", "RolloutRequest", "SamplingConfig"]
