"""Run configuration: nested, documented, validated dataclasses loadable from YAML with dotted CLI overrides.

Only stdlib + PyYAML at import time (the algorithm registries are consulted lazily during validation).
"""
from .algorithm import AlgorithmConfig, DAPOConfig, KLConfig, PAPOConfig, PGPOConfig, VPPOConfig
from .base import ConfigError, field_docs
from .loader import apply_overrides, describe, from_dict, load_config, to_dict, to_yaml
from .model import ModelConfig, ParallelConfig, RolloutConfig
from .root import Config
from .run import CheckpointConfig, DataConfig, EvalConfig, LoggingConfig, RewardConfig, TrainerConfig

__all__ = [
    "AlgorithmConfig", "CheckpointConfig", "Config", "ConfigError", "DAPOConfig", "DataConfig", "EvalConfig", "KLConfig",
    "LoggingConfig", "ModelConfig", "PAPOConfig", "PGPOConfig", "VPPOConfig", "ParallelConfig", "RewardConfig", "RolloutConfig",
    "TrainerConfig", "apply_overrides", "describe", "field_docs", "from_dict", "load_config", "to_dict", "to_yaml",
]
