"""Parameter counts of Qwen2.5-VL, by formula: transformers' count and Megatron's per (TP rank, PP stage) shard.

Units: parameter counts are numbers of elements (not bytes).

How our model shards (``models/qwen2_5_vl/model.py`` and ``hf_config.py``), which every formula here follows:

* The language model is a Megatron ``GPTModel`` (local or TE layer spec; both hold the same tensors, TE fuses the
  two RMSNorm weights into ``linear_qkv`` / ``linear_fc1`` under other names). Column-parallel weights
  (``linear_qkv`` with its bias, ``linear_fc1``) are split on their output rows, row-parallel ones (``linear_proj``,
  ``linear_fc2``) on their input columns, the norms are replicated on every TP rank. ``validate_parallel_layout``
  requires TP to divide the heads, the KV heads and the MLP width, so every TP rank of a stage holds exactly the
  same count.
* The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by x TP`` (``padded_vocab_size``); the
  embedding and the output layer are vocab-parallel ``[V_padded / TP, H]``.
* PP must divide the layers and Megatron's default split gives every stage ``layers / PP`` decoder layers. The
  first stage holds the word embedding and the vision tower (transformers' module, replicated on every TP rank of
  that stage); the last stage holds the final norm and the output layer. With tied embeddings (3B) and PP = 1 the
  output layer reuses the embedding (no tensor of its own); with PP > 1 the last stage holds its own copy of the
  (padded) embedding, kept equal by Megatron's embedding group, so it is counted on that stage.

``stage_tensors`` lists one rank's tensors in the order of ``model.named_parameters()`` (local spec), which is the
order Megatron's DDP lays them out in its gradient buffer (``buffers.py`` needs it for padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..models.qwen2_5_vl.hf_config import (TextDims, padded_vocab_size, stage_layer_counts,
                                            validate_parallel_layout)


@dataclass(frozen=True)
class VisionDims:
    """The vision tower's shape (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``)."""

    depth: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    out_hidden_size: int
    patch_size: int  # pixels per patch side
    patch_input: int  # channels x temporal_patch_size x patch_size^2: the inputs of one patch
    spatial_merge_size: int
    window_patches: int  # patches in one attention window (window_size / patch_size)^2
    full_attention_blocks: int

    @classmethod
    def from_hf(cls, hf_config) -> "VisionDims":
        v = hf_config.vision_config
        channels = getattr(v, "in_channels", None) or getattr(v, "in_chans", 3)
        side = max(1, v.window_size // v.patch_size)
        return cls(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads,
                   ffn_hidden_size=v.intermediate_size, out_hidden_size=v.out_hidden_size,
                   patch_size=v.patch_size, patch_input=channels * v.temporal_patch_size * v.patch_size ** 2,
                   spatial_merge_size=v.spatial_merge_size, window_patches=side * side,
                   full_attention_blocks=len(getattr(v, "fullatt_block_indexes", []) or []))


@dataclass(frozen=True)
class ModelShape:
    """Everything the planner needs to know about one Qwen2.5-VL config."""

    text: TextDims
    vision: VisionDims

    @classmethod
    def from_hf(cls, hf_config) -> "ModelShape":
        return cls(text=TextDims.from_hf(hf_config), vision=VisionDims.from_hf(hf_config))


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of one rank: its name in ``Qwen2_5_VLMegatronModel``, its element count, and whether
    Megatron marks it ``shared_embedding`` (tied embedding with PP > 1; DDP gives it a bucket of its own)."""

    name: str
    numel: int
    shared_embedding: bool = False

    @property
    def is_vision(self) -> bool:
        return self.name.startswith("vision_model.")


# --------------------------------------------------------------------------------------------- vision tower
def vision_tensors(v: VisionDims) -> List[TensorSpec]:
    """The vision tower's tensors (patch embedding, ``depth`` blocks, merger) in transformers' order."""
    h, f = v.hidden_size, v.ffn_hidden_size
    out = [TensorSpec("vision_model.patch_embed.proj.weight", h * v.patch_input)]
    block = [("norm1.weight", h), ("norm2.weight", h), ("attn.qkv.weight", 3 * h * h), ("attn.qkv.bias", 3 * h),
             ("attn.proj.weight", h * h), ("attn.proj.bias", h), ("mlp.gate_proj.weight", f * h),
             ("mlp.gate_proj.bias", f), ("mlp.up_proj.weight", f * h), ("mlp.up_proj.bias", f),
             ("mlp.down_proj.weight", h * f), ("mlp.down_proj.bias", h)]
    for i in range(v.depth):
        out += [TensorSpec(f"vision_model.blocks.{i}.{name}", n) for name, n in block]
    merged = h * v.spatial_merge_size ** 2
    out += [TensorSpec("vision_model.merger.ln_q.weight", h),
            TensorSpec("vision_model.merger.mlp.0.weight", merged * merged),
            TensorSpec("vision_model.merger.mlp.0.bias", merged),
            TensorSpec("vision_model.merger.mlp.2.weight", v.out_hidden_size * merged),
            TensorSpec("vision_model.merger.mlp.2.bias", v.out_hidden_size)]
    return out


def vision_parameter_count(v: VisionDims) -> int:
    """Closed form of ``sum(vision_tensors)``: patch embedding + depth x block + merger."""
    h, f = v.hidden_size, v.ffn_hidden_size
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (f * h + f) + (h * f + h)
    merged = h * v.spatial_merge_size ** 2
    return h * v.patch_input + v.depth * block + h + merged * merged + merged + v.out_hidden_size * (merged + 1)


# ------------------------------------------------------------------------------------------- language model
def qkv_rows(t: TextDims) -> int:
    """Output rows of the fused q/k/v projection before TP: ``(heads + 2 x KV heads) x head_dim``."""
    return (t.num_heads + 2 * t.num_kv_heads) * t.head_dim


def decoder_layer_tensors(t: TextDims, tp: int, index: int) -> List[TensorSpec]:
    """One decoder layer on one TP rank (local spec names and order; ``index`` is the layer's index on its stage)."""
    h, rows, f = t.hidden_size, qkv_rows(t) // tp, t.ffn_hidden_size // tp
    p = f"language_model.decoder.layers.{index}."
    return [TensorSpec(p + "input_layernorm.weight", h),
            TensorSpec(p + "self_attention.linear_proj.weight", h * (t.num_heads * t.head_dim // tp)),
            TensorSpec(p + "self_attention.linear_qkv.weight", rows * h),
            TensorSpec(p + "self_attention.linear_qkv.bias", rows),
            TensorSpec(p + "pre_mlp_layernorm.weight", h),
            TensorSpec(p + "mlp.linear_fc1.weight", 2 * f * h),
            TensorSpec(p + "mlp.linear_fc2.weight", h * f)]


def decoder_layer_parameter_count(t: TextDims, tp: int = 1) -> int:
    """Closed form of one decoder layer on one TP rank: two norms + qkv (with bias) + proj + fc1 + fc2."""
    h, rows, f = t.hidden_size, qkv_rows(t) // tp, t.ffn_hidden_size // tp
    return 2 * h + rows * (h + 1) + h * t.num_heads * t.head_dim // tp + 3 * f * h


def layers_per_stage(t: TextDims, pp: int, stage: int = 0, first: Optional[int] = None,
                     last: Optional[int] = None) -> int:
    """Decoder layers on ``stage``: Megatron's even split, or the uneven one ``first`` / ``last`` set
    (``hf_config.stage_layer_counts``)."""
    return stage_layer_counts(t.num_layers, pp, first, last)[stage]


def stage_tensors(shape: ModelShape, tp: int, pp: int, stage: int, make_vocab_size_divisible_by: int = 128,
                  first_layers: Optional[int] = None, last_layers: Optional[int] = None) -> List[TensorSpec]:
    """The tensors one rank of pipeline stage ``stage`` holds at (TP, PP), in ``named_parameters()`` order
    (``first_layers`` / ``last_layers``: an uneven split's first- and last-stage layers)."""
    t = shape.text
    validate_parallel_layout(t, tp, pp, first_layers, last_layers)
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} is not in [0, {pp})")
    first, last = stage == 0, stage == pp - 1
    vocab_rows = padded_vocab_size(t.vocab_size, make_vocab_size_divisible_by, tp) // tp
    shared = t.tie_word_embeddings and pp > 1
    out: List[TensorSpec] = vision_tensors(shape.vision) if first else []
    if first:
        out.append(TensorSpec("language_model.embedding.word_embeddings.weight", vocab_rows * t.hidden_size, shared))
    for i in range(layers_per_stage(t, pp, stage, first_layers, last_layers)):
        out += decoder_layer_tensors(t, tp, i)
    if last:
        out.append(TensorSpec("language_model.decoder.final_layernorm.weight", t.hidden_size))
        if not (t.tie_word_embeddings and pp == 1):
            out.append(TensorSpec("language_model.output_layer.weight", vocab_rows * t.hidden_size, shared))
    return out


def stage_parameter_count(shape: ModelShape, tp: int, pp: int, stage: int, make_vocab_size_divisible_by: int = 128,
                          first_layers: Optional[int] = None, last_layers: Optional[int] = None) -> int:
    """Closed form of ``sum(stage_tensors)``: what one rank of ``stage`` holds (padding rows included)."""
    t = shape.text
    validate_parallel_layout(t, tp, pp, first_layers, last_layers)
    vocab_block = padded_vocab_size(t.vocab_size, make_vocab_size_divisible_by, tp) // tp * t.hidden_size
    count = layers_per_stage(t, pp, stage, first_layers, last_layers) * decoder_layer_parameter_count(t, tp)
    if stage == 0:
        count += vision_parameter_count(shape.vision) + vocab_block
    if stage == pp - 1:
        count += t.hidden_size + (0 if t.tie_word_embeddings and pp == 1 else vocab_block)
    return count


def _model_count(shape: ModelShape, vocab_rows: int) -> int:
    t = shape.text
    return (vision_parameter_count(shape.vision) + t.num_layers * decoder_layer_parameter_count(t) + t.hidden_size
            + vocab_rows * t.hidden_size * (1 if t.tie_word_embeddings else 2))


def megatron_parameter_count(shape: ModelShape, tp: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
    """Megatron's model size at TP: the padded vocabulary, tied embeddings once, the vision tower once (the copies
    TP and PP make, replicated norms and the vision tower, a tied head on the last stage, are not counted)."""
    return _model_count(shape, padded_vocab_size(shape.text.vocab_size, make_vocab_size_divisible_by, tp))


def hf_parameter_count(shape: ModelShape) -> int:
    """What ``sum(p.numel() for p in Qwen2_5_VLForConditionalGeneration(config).parameters())`` gives: the real
    vocabulary, a tied head counted once. Equal to ``megatron_parameter_count`` without the padding rows."""
    return _model_count(shape, shape.text.vocab_size)
