"""Hugging Face Qwen2.5-VL config -> Megatron-Core ``TransformerConfig``, and the checks that must pass before any
weight is read (TP must divide heads, KV groups and the MLP; PP must divide the layers).

The language model maps onto Megatron's GPT building blocks: RMSNorm, SwiGLU (``gated_linear_unit`` + SiLU), GQA
(``num_query_groups``), a bias on q/k/v only (``add_qkv_bias``), no other biases, and multimodal RoPE
(``position_embedding_type="mrope"`` with the checkpoint's ``mrope_section``). The 3B model ties the input
embedding and the output layer; 7B/32B/72B do not.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


class ModelConfigError(ValueError):
    """The checkpoint config or the requested parallel layout cannot be used; the message says why."""


def load_hf_config(source: Union[str, Path, Dict[str, Any], Any]):
    """A ``transformers.Qwen2_5_VLConfig`` from a checkpoint directory, a config.json path, a dict or a config."""
    from ...compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()  # before transformers touches torchvision
    from transformers import Qwen2_5_VLConfig

    if isinstance(source, Qwen2_5_VLConfig):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ModelConfigError(f"no Hugging Face config at {path} (expected a checkpoint dir with config.json)")
        source = json.loads(path.read_text())
    if not isinstance(source, dict):
        raise ModelConfigError(f"cannot read a Qwen2.5-VL config from {type(source).__name__}")
    model_type = source.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"unsupported model_type {model_type!r}; megatron-pgpo supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return Qwen2_5_VLConfig(**source)


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of ``make_vocab_size_divisible_by * tp``."""
    multiple = make_vocab_size_divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class TextDims:
    """The language model's shape, read once from the HF config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple

    @classmethod
    def from_hf(cls, hf_config) -> "TextDims":
        tc = hf_config.text_config
        rope = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
        section = rope.get("mrope_section")
        if not section:
            raise ModelConfigError("the text config has no rope_parameters.mrope_section; not a Qwen2.5-VL config")
        head_dim = tc.hidden_size // tc.num_attention_heads
        if head_dim * tc.num_attention_heads != tc.hidden_size:
            raise ModelConfigError(f"hidden_size {tc.hidden_size} is not divisible by {tc.num_attention_heads} heads")
        if 2 * sum(section) != head_dim:
            raise ModelConfigError(f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        return cls(
            num_layers=tc.num_hidden_layers,
            hidden_size=tc.hidden_size,
            ffn_hidden_size=tc.intermediate_size,
            num_heads=tc.num_attention_heads,
            num_kv_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            vocab_size=tc.vocab_size,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            rms_norm_eps=tc.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(tc, "rope_theta", 1e6))),
            mrope_section=tuple(section),
        )


def stage_layer_counts(num_layers: int, pp: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> List[int]:
    """Language layers on each pipeline stage, Megatron's way (``num_layers_in_first_pipeline_stage`` /
    ``..._last_...``, ``get_transformer_layer_offset``): ``first`` / ``last`` layers on the first / last stage when
    given, the rest split evenly over the other stages. Stage 0 also holds the vision tower and the embedding, so
    giving it fewer layers evens out the stages' memory, and layer counts that PP does not divide become possible
    (28 layers at PP=8 with ``first=1, last=3``: ``[1, 4, 4, 4, 4, 4, 4, 3]``).

    Raises ``ModelConfigError`` when the split does not work out (the message says why).
    """
    if pp < 1:
        raise ModelConfigError(f"PP must be >= 1, got {pp}")
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ModelConfigError("first/last stage layer counts need PP > 1")
        return [num_layers]
    for name, value in (("first", first), ("last", last)):
        if value is not None and not 1 <= value < num_layers:
            raise ModelConfigError(f"{name}-stage layers must be in [1, {num_layers - 1}], got {value}")
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle == 0:
        if rest != 0:
            raise ModelConfigError(f"first + last stage layers ({first} + {last}) must equal the {num_layers} layers "
                                   f"at PP=2")
        return [first, last]
    if rest < middle or rest % middle:
        given = " and ".join(f"{n}={v}" for n, v in (("first", first), ("last", last)) if v is not None)
        raise ModelConfigError(
            f"PP={pp} does not divide the {num_layers} language layers" if not given else
            f"with {given}, the other {middle} stages cannot share the remaining {rest} layers evenly")
    counts = [rest // middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def validate_parallel_layout(dims: TextDims, tp: int, pp: int, first_stage_layers: Optional[int] = None,
                             last_stage_layers: Optional[int] = None) -> None:
    """Raise ``ModelConfigError`` naming every reason the (TP, PP) layout cannot shard this model."""
    problems = []
    for name, value in (("attention heads", dims.num_heads), ("KV groups (num_key_value_heads)", dims.num_kv_heads),
                        ("the MLP intermediate size", dims.ffn_hidden_size)):
        if value % tp:
            problems.append(f"TP={tp} does not divide {name} ({value})")
    try:
        stage_layer_counts(dims.num_layers, pp, first_stage_layers, last_stage_layers)
    except ModelConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ModelConfigError("cannot shard this model: " + "; ".join(problems))


def fused_kernels(on_cuda: bool, transformer_impl: str = "local", available=None) -> Dict[str, bool]:
    """Megatron's fusion flags for this run: off on the CPU; on CUDA each one whose implementation is present.

    * ``bias_activation_fusion``: Megatron's fused SwiGLU (torch.jit / torch.compile only), which keeps the fc1
      output alone for the backward pass instead of five width-f tensors.
    * ``masked_softmax_fusion``: the local spec's attention softmax, with Megatron's / apex's compiled kernels
      (``scaled_masked_softmax_cuda``, ``scaled_upper_triang_masked_softmax_cuda``).
    * ``gradient_accumulation_fusion``: weight gradients accumulated straight into the fp32 main-grad buffer: TE's
      linear layers do it themselves; the local spec needs apex's ``fused_weight_gradient_mlp_cuda``.
    * ``apply_rope_fusion`` stays off: Megatron's fused rope does not take mRoPE in [S, B] batches larger than 1
      (``rope_utils.py``). ``persist_layer_norm`` (apex's LayerNorm) does not apply to RMSNorm.

    ``available(module_name) -> bool`` is injectable for tests (default: importlib's ``find_spec``).
    """
    if available is None:
        import importlib.util

        def available(name: str) -> bool:
            try:
                return importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                return False

    if not on_cuda:
        return dict(bias_activation_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False)
    return dict(
        bias_activation_fusion=True,
        masked_softmax_fusion=available("scaled_masked_softmax_cuda")
        and available("scaled_upper_triang_masked_softmax_cuda"),
        gradient_accumulation_fusion=transformer_impl == "transformer_engine"
        or available("fused_weight_gradient_mlp_cuda"),
    )


def to_transformer_config(
    hf_config,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "fp32",
    sequence_parallel: bool = False,
    recompute: str = "none",
    fp8: Optional[str] = None,
    fp8_recipe: str = "blockwise",
    init_weights: bool = True,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    **overrides: Any,
):
    """Megatron-Core ``TransformerConfig`` for the language model of ``hf_config`` at (TP, PP).

    Dropout is 0 (Qwen2.5-VL trains without it; a parity check in training mode needs it off).
    ``init_weights=False`` skips random init (weights will be loaded; also what the meta-device build uses).
    """
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    dims = TextDims.from_hf(hf_config)
    validate_parallel_layout(dims, tp, pp, first_stage_layers, last_stage_layers)
    params_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    kwargs: Dict[str, Any] = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(dims.mrope_section),
        init_method_std=getattr(hf_config.text_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first_stage_layers if pp > 1 else None,
        num_layers_in_last_pipeline_stage=last_stage_layers if pp > 1 else None,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=True,
        perform_initialization=init_weights,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Pipeline stages exchange activations whose [S, B, H] shape changes per micro-batch (length bucketing,
        # stacked text-only rows), so the schedule must send shapes first. Megatron 0.16 rejects that flag with
        # its default MoE dispatcher even without MoE layers; the dispatcher choice is moot for dense models.
        variable_seq_lengths=pp > 1,
        moe_token_dispatcher_type="alltoall",
    )
    if recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
