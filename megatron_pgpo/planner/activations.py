"""Activation and logits memory of one micro-batch, in bytes.

Decoder layers: the accounting of Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (MLSys 2023, arXiv 2205.05198), section 4 and Table 2, with 16-bit activations. Per layer, for sequence
length ``s``, micro-batch ``b``, hidden ``h``, heads ``a``, TP size ``t``, their GPT layer stores

    sbh (10 + 24 / t + 5as / (ht))   bytes with TP,        sbh / t (34 + 5as / h)  with TP + sequence parallelism,

where 10sbh (two norm inputs 4, the qkv and fc1 inputs 4, two 1-byte dropout masks 2) is what only sequence
parallelism splits, 24sbh (Q and K 4, V 2, the attention-projection input 2, a 4h GeLU MLP 16) is split by TP, and
5as^2b (softmax output 2, its dropout mask 1, the dropped-out probabilities 2) is the attention-score term. Selective
recompute (Megatron's ``recompute_granularity="selective"``, core attention) drops the score term; full recompute
(``"full"``, uniform, one layer per checkpoint) keeps only each layer's input, 2sbh (/ t with sequence
parallelism), plus one layer's activations while that layer is recomputed in the backward pass.

``layer_activation_bytes`` keeps that accounting and generalises the three places where Qwen2.5-VL differs from
their GPT (with the paper's GPT as a special case, tested): the MLP is SwiGLU of width ``f`` (fc1 output ``2f``
saved for the activation, 4sbf, and the fc2 input, 2sbf: 6sbf instead of 4sbf for GeLU), there is no dropout (no
masks: 8sbh instead of 10sbh, and 2as^2b for the softmax output instead of 5as^2b), and grouped-query attention
stays at 6sbh for Q, K and V because Megatron's local core attention expands K and V to every head before its
batched matmuls.

Pipeline parallelism (1F1B): stage ``i`` of ``p`` keeps the activations of ``min(p - i, micro-batches)``
micro-batches (the first stage holds ``p`` micro-batches of ``layers / p`` layers: one micro-batch of the whole
model), plus each in-flight micro-batch's output sent to the next stage (2sbh, / t with sequence parallelism).
"""
from __future__ import annotations

from typing import Optional

RECOMPUTE_OPTIONS = ("none", "selective", "full")


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE_OPTIONS:
        raise ValueError(f"unknown recompute {recompute!r}; valid: {', '.join(RECOMPUTE_OPTIONS)}")


def paper_gpt_layer_bytes(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                          recompute: str = "none") -> float:
    """Korthikanti et al.'s closed forms for their GPT layer (Table 2), bytes per layer."""
    _check_recompute(recompute)
    scores = 0.0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        return 2 * s * b * h
    if sequence_parallel:
        return s * b * h / t * (34 + scores)
    return s * b * h * (10 + 24 / t + scores / t)


def layer_activation_bytes(seq: int, micro_batch: int, hidden: int, heads: int, ffn: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", gated: bool = True,
                           dropout: bool = False, attention_span: Optional[int] = None,
                           element_bytes: int = 2) -> float:
    """Bytes one decoder layer stores for one micro-batch (see the module docstring).

    Args:
        seq, micro_batch: tokens per sequence ``s`` and sequences ``b``.
        hidden, heads, ffn: ``h``, ``a`` and the MLP width ``f``.
        tp, sequence_parallel: TP size and whether sequence parallelism splits the norm/dropout regions.
        recompute: ``none`` / ``selective`` / ``full`` (the stored part; ``full_recompute_working_bytes`` is the rest).
        gated: SwiGLU (True) or a GeLU MLP (False). ``dropout``: whether dropout masks are stored.
        attention_span: keys each query attends to (default ``seq``: full attention; a window size for windowed
            attention); only the score term depends on it.
        element_bytes: bytes per activation element (2 for bf16/fp16; the paper's numbers assume 2).
    """
    _check_recompute(recompute)
    s, b, h, a, f = seq, micro_batch, hidden, heads, ffn
    unit = element_bytes / 2  # the formulas count 16-bit elements as 2 bytes and masks as 1
    if recompute == "full":
        return 2 * s * b * h * unit / (tp if sequence_parallel else 1)
    span = s if attention_span is None else attention_span
    sp_region = (8 + (2 if dropout else 0)) * h  # norm inputs 4h, qkv/fc1 inputs 4h, dropout masks 2h
    tp_region = 8 * h + (6 if gated else 4) * f  # Q, K, V, proj input 8h; MLP 6f (SwiGLU) or 4f (GeLU)
    scores = 0 if recompute == "selective" else (5 if dropout else 2) * a * span
    per_token = sp_region / (tp if sequence_parallel else 1) + (tp_region + scores) / tp
    return s * b * per_token * unit


def full_recompute_working_bytes(seq: int, micro_batch: int, hidden: int, heads: int, ffn: int, tp: int = 1,
                                 sequence_parallel: bool = False, gated: bool = True, element_bytes: int = 2) -> float:
    """The extra memory of full recompute: one layer's activations, rebuilt during its backward pass."""
    return layer_activation_bytes(seq, micro_batch, hidden, heads, ffn, tp, sequence_parallel, "none", gated,
                                  element_bytes=element_bytes)


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return max(1, min(pp - stage, micro_batches))


def vision_activation_bytes(patches: int, images: int, hidden: int, heads: int, ffn: int, depth: int,
                            full_attention_blocks: int, window_patches: int, element_bytes: int = 2) -> float:
    """Approximate bytes the vision tower (transformers' module, no TP, no recompute) stores for ``images``
    images of ``patches`` patches each in the update pass.

    Per block the layer formula above with ``s = patches``, SwiGLU, no dropout, TP = 1, plus what transformers'
    eager attention adds: the softmax runs in fp32 and is cast back (6 bytes per score instead of 2) and the rotary
    embedding works on fp32 copies of Q and K (8 bytes per patch per hidden unit). ``full_attention_blocks``
    attend over the whole image, the others over windows of ``window_patches``. The merger is not counted.
    """
    total = 0.0
    for block in range(depth):
        span = patches if block < full_attention_blocks else min(window_patches, patches)
        linear = layer_activation_bytes(patches, images, hidden, heads, ffn, recompute="selective",
                                        element_bytes=element_bytes)
        total += linear + images * patches * (6 * heads * span + 8 * hidden)
    return total


def stacked_logits_bytes(rows: int, seq: int, vocab_shard: int, element_bytes: int) -> int:
    """``[rows, seq, V_padded / TP]`` logits in the model dtype."""
    return rows * seq * vocab_shard * element_bytes


def update_logits_bytes(micro_batch: int, seq: int, vocab_shard: int, element_bytes: int) -> int:
    """Last stage, update pass: the flattened logits our log-prob function saves, their gradient and its
    un-flattened copy (3 x ``[b, s, V/TP]`` in the model dtype) at the start of the backward pass."""
    return 3 * stacked_logits_bytes(micro_batch, seq, vocab_shard, element_bytes)


def scoring_logits_bytes(micro_batch: int, seq: int, vocab_shard: int, element_bytes: int, estimator: str,
                         chunk_tokens: int, default_chunk_bytes: int = 4 << 20) -> int:
    """Last stage, scoring pass (no gradient): peak bytes of the stacked image + text-only logits.

    The pass carries ``2b`` rows (``policy._stack_variants``). GPTModel returns ``transpose(0, 1).contiguous()`` of
    its ``[s, 2b, V/TP]`` output, so both exist at once (2 x stacked). The vocab-parallel reductions then copy
    one half at a time (slicing off the last position) and work in fp32 chunks: two ``[chunk, V/TP]`` fp32 buffers,
    ``chunk = algorithm.pgpo.kl_chunk_tokens`` for the exact KL and ~4 MiB per buffer for log-probs / entropy; the
    exact estimator also keeps a re-aligned copy of the text-only half and copies both halves.
    """
    stacked = stacked_logits_bytes(2 * micro_batch, seq, vocab_shard, element_bytes)
    half = stacked // 2
    if estimator == "exact":
        workspace = 2 * min(chunk_tokens, micro_batch * seq) * vocab_shard * 4
        reduction = stacked + 3 * half + workspace
    else:
        workspace = 2 * max(default_chunk_bytes, 4 * 4 * vocab_shard)
        reduction = stacked + half + workspace
    return max(2 * stacked, reduction)


def unchunked_scoring_logits_bytes(micro_batch: int, seq: int, vocab_shard: int, element_bytes: int) -> int:
    """The same pass with a plain fp32 log-softmax of the stacked logits: the logits plus
    ``2 x b x s x V/TP x 4`` bytes (what chunking avoids)."""
    stacked = stacked_logits_bytes(2 * micro_batch, seq, vocab_shard, element_bytes)
    return max(2 * stacked, stacked + stacked_logits_bytes(2 * micro_batch, seq, vocab_shard, 4))
