"""The root config: one field per section, plus the rules that span sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .algorithm import AlgorithmConfig
from .base import Section, require
from .model import ModelConfig, ParallelConfig, RolloutConfig
from .run import CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, RewardConfig, TrainerConfig


@dataclass
class Config(Section):
    PATH: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model: checkpoint, dtype, layer spec."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Training TP/PP (DP follows from the number of processes) and rollout TP."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of responses with vLLM."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """PGPO / DAPO / GRPO: advantages, loss, clipping, KL penalty."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and images: local files or the built-in synthetic task."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Verifiable reward: accuracy and format weights, answer-checking limits."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The training loop: steps, batch sizes, optimizer."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training: benchmarks (or the held-out set), samples per problem, temperature."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, TensorBoard, wandb and metrics.jsonl."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming, preemption, HF export."""

    def validate(self) -> None:
        require(
            self.data.rollout_batch_size % self.trainer.global_batch_size == 0,
            f"data.rollout_batch_size={self.data.rollout_batch_size} must be a multiple of "
            f"trainer.global_batch_size={self.trainer.global_batch_size} (prompts per update)",
        )
        require(
            self.rollout.engine != "transformers" or self.parallel.rollout_tensor_parallel_size == 1,
            "rollout.engine=transformers runs in one process on its owner's device: set "
            f"parallel.rollout_tensor_parallel_size=1 (got {self.parallel.rollout_tensor_parallel_size})",
        )
        require(
            self.rollout.weight_transport != "cuda_ipc" or self.parallel.device != "cpu",
            "rollout.weight_transport=cuda_ipc shares GPU buffers, but parallel.device=cpu: use bytes or auto",
        )
        responses_per_update = self.trainer.global_batch_size * self.rollout.n
        require(
            responses_per_update % self.trainer.micro_batch_size == 0,
            f"trainer.global_batch_size x rollout.n = {responses_per_update} responses per update must be a multiple "
            f"of trainer.micro_batch_size={self.trainer.micro_batch_size}",
        )
