"""Layer specs: the same Qwen2.5-VL language model built from torch layers (``local``, CPU and tests) or from
Transformer Engine layers (``transformer_engine``, GPUs, FP8).

Transformer Engine is imported only when its spec is asked for; on a machine without a GPU driver its import
raises RuntimeError/OSError rather than ImportError, so both are turned into one clear error.
"""
from __future__ import annotations


class TransformerEngineUnavailable(RuntimeError):
    """The TE layer spec was requested where Transformer Engine cannot be imported."""


def transformer_engine_available() -> bool:
    """True if ``transformer_engine.pytorch`` imports (needs a CUDA driver)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or RuntimeError/OSError without a driver
        return False
    return True


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
        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise TransformerEngineUnavailable(
                "model.transformer_impl=transformer_engine needs Transformer Engine and a CUDA driver "
                "(pip install -e .[gpu]); use model.transformer_impl=local on CPU"
            )
        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"unknown transformer_impl {transformer_impl!r}; valid: local, transformer_engine")
