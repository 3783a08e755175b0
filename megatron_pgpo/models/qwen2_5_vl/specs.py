"""Layer specs: the same Qwen2.5-VL language model built from torch layers (``local``, CPU and tests) or from
Transformer Engine layers (``transformer_engine``, GPUs, FP8).

Transformer Engine is imported only when its spec is asked for; on a machine without a GPU driver its import
raises RuntimeError/OSError rather than ImportError, so both are turned into one clear error.
"""
from __future__ import annotations

import torch


class TransformerEngineUnavailable(RuntimeError):
    """The TE layer spec was requested where Transformer Engine cannot be imported."""


def transformer_engine_available() -> bool:
    """True if ``transformer_engine.pytorch`` imports (needs a CUDA driver)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or RuntimeError/OSError without a driver
        return False
    return True


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` for the local spec that also works under sequence parallelism.

    Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism each TP rank
    normalises its own slice ``[S/TP, B, H]`` of the sequence, so the weight's gradient on a rank is partial;
    tagging the weight ``sequence_parallel=True`` makes Megatron's ``finalize_model_grads`` sum it over the TP
    group (what TE/Apex norms do). Without sequence parallelism it is plain RMSNorm.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def get_block_spec(transformer_impl: str, config, vp_stage=None):
    """What ``GPTModel`` takes as ``transformer_layer_spec``: the layer spec, and for the local spec a block spec
    (this stage's layers plus a final norm that supports sequence parallelism)."""
    layer = get_layer_spec(transformer_impl)
    if transformer_impl != "local":
        return layer
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=SequenceParallelRMSNorm)


def get_layer_spec(transformer_impl: str = "local"):
    """Megatron ``ModuleSpec`` of one Qwen2.5-VL decoder layer.

    ``local``: Megatron's torch layers with RMSNorm as separate modules (``input_layernorm``,
    ``pre_mlp_layernorm``). ``transformer_engine``: TE layers with the norms fused into the following linear
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); required for FP8.
    """
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if transformer_impl == "local":
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = SequenceParallelRMSNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
        return spec
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise TransformerEngineUnavailable(
                "model.transformer_impl=transformer_engine needs Transformer Engine and a CUDA driver "
                "(pip install -e .[gpu]); use model.transformer_impl=local on CPU"
            )
        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"unknown transformer_impl {transformer_impl!r}; valid: local, transformer_engine")
