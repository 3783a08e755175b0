"""Activation and logits memory of one micro-batch, in bytes.

Method: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (MLSys 2023, arXiv
2205.05198), section 4: list every tensor a layer saves for its backward pass, then divide what tensor parallelism
splits by ``t`` and what only sequence parallelism splits by ``t`` when it is on; selective recompute (core
attention) and full recompute (only each layer's input kept) remove what they recompute. For their GPT layer with
16-bit activations that gives the familiar per-layer closed forms (their Table 2):

    sbh (10 + 24 / t + 5as / (ht))   with TP,    sbh / t (34 + 5as / h)   with TP + sequence parallelism,
    sbh (10 + 24 / t)                 TP + selective,                     2sbh   full recompute.

Our layers are not their GPT, so the same method is applied to what OUR modules save, measured tensor by tensor
with ``torch.autograd.graph.saved_tensors_hooks`` (bf16, tests/distributed/test_planner_bytes.py checks these
formulas against real layers at TP=1 and TP=2 with sequence parallelism). Per token, ``E`` = bytes per activation
element (2 for bf16), ``h`` hidden, ``a`` heads, ``g`` KV heads, ``d`` head_dim, ``f`` MLP width, ``span`` keys
each query sees:

* Megatron decoder layer (local spec, as built by ``to_transformer_config``: RMSNorm, unfused SwiGLU, mrope, no
  dropout). Split by sequence parallelism: the two norm inputs (``E h + 4`` each with a fused norm, TE or Apex:
  the input and the fp32 rstd), the qkv and fc1 inputs (``E h`` each). Split by TP: Q, K and V after K and V are
  expanded to every head (``3 E h``; the local core attention repeats KV groups before its matmuls), the softmax
  output in fp32 and its bf16 copy (``(4 + E) a span``), the attention-projection input (``E h``) and SwiGLU's
  ``5 E f`` (fc1 output 2f, SiLU output f, the linear half plus its offset f, fc2 input f). Not split: the rotary
  cos/sin of q and k (``4 E d``) and one ``[s, s]`` bool causal mask per layer. Selective recompute keeps,
  instead of Q, K, V, the scores and the mask, what its checkpoint saves: q (``E h``), k (``E g d``) and the fused
  qkv output that v views (``E (h + 2 g d)``). Full recompute keeps each layer's input (``E h``, / t with SP)
  and, once per stage, the fp32 rotary frequencies; the last stage also keeps the final norm's input. TE's fused
  attention (GPU) would store less than the local core attention without recompute (no scores, no mask, no
  expanded K/V), so without recompute the formula is an upper bound there; selective recompute checkpoints q, k,
  v either way.
* The vision tower (transformers' module, never TP-split), per patch and block: two norms in fp32
  (``4h + 4 + E h`` each: fp32 input, rstd, normalised bf16), the qkv input, q, k (``E h`` each) and the qkv
  output (``3 E h``), with eager attention its scores ``(4 + E) a span`` (full attention over the image in
  ``fullatt_block_indexes``, windows otherwise), with a fused kernel (SDPA, flash-attention) its output and
  log-sum-exp instead (``E h + 4 a``), the projection and MLP inputs (``E h`` each) and its SwiGLU ``4 E f``; once
  per image: the patch-embedding input, the fp32 rotary cos/sin (``8 d``) and the merger. With
  ``model.vision_recompute`` each block keeps its input only, and one block is rebuilt at a time.
* Pipeline parallelism (1F1B): stage ``i`` of ``p`` keeps the activations of ``min(p - i, micro-batches)``
  micro-batches (the first stage holds ``p`` micro-batches of ``layers / p`` layers, and as many images' vision
  activations), plus each in-flight micro-batch's output sent to the next stage (``E h`` per token, / t with SP).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

RECOMPUTE_OPTIONS = ("none", "selective", "full")


def _check_recompute(recompute: str) -> None:
    if recompute not in RECOMPUTE_OPTIONS:
        raise ValueError(f"unknown recompute {recompute!r}; valid: {', '.join(RECOMPUTE_OPTIONS)}")


def saved_activation_bytes(run: Callable[[], Any], exclude: Iterable[Any] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` executes, each storage once, the storages
    of ``exclude`` (the parameters) left out: the measurement the formulas below are checked against."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())


def layer_activation_bytes(seq: int, micro_batch: int, hidden: int, heads: int, kv_heads: int, ffn: int,
                           tp: int = 1, sequence_parallel: bool = False, recompute: str = "none",
                           element_bytes: int = 2, norm_bytes: Optional[float] = None,
                           fused_swiglu: bool = False) -> float:
    """Bytes one Megatron decoder layer saves for its backward pass, for one micro-batch (module docstring).

    Args:
        seq, micro_batch: tokens per sequence ``s`` and sequences ``b``.
        hidden, heads, kv_heads, ffn: ``h``, ``a``, ``g`` and the MLP width ``f`` (``d = h / a``).
        tp, sequence_parallel: TP size and whether sequence parallelism splits the norm regions.
        recompute: ``none`` / ``selective`` / ``full`` (the stored part; ``full_recompute_working_bytes`` is the
            layer rebuilt during the backward pass).
        element_bytes: bytes per activation element (2 for bf16/fp16, 4 for fp32).
        norm_bytes: bytes one RMSNorm saves per token; default ``E h + 4`` (a fused norm: TE or Apex). Torch's
            fallback norm (CPU, no Apex) saves two fp32 copies: ``8 h + 4``.
        fused_swiglu: Megatron's fused SwiGLU (``bias_activation_fusion``, on with CUDA) keeps the fc1 output
            alone (``2 E f``, plus the fc2 input ``E f``) instead of the unfused ``5 E f`` (measured).
    """
    _check_recompute(recompute)
    s, b, h, a, g, f, e = seq, micro_batch, hidden, heads, kv_heads, ffn, element_bytes
    d = h // a
    sp_split = tp if sequence_parallel else 1
    if recompute == "full":
        return s * b * e * h / sp_split
    norm = e * h + 4 if norm_bytes is None else norm_bytes
    sp_region = 2 * norm + 2 * e * h  # two norm inputs, the qkv and fc1 inputs
    if recompute == "selective":
        attention = e * h + e * g * d + e * (h + 2 * g * d)  # the checkpoint's q, k and the qkv output v views
        mask = 4  # no mask; the checkpoint keeps one int32 scalar
    else:
        attention = 3 * e * h + (4 + e) * a * s  # Q, K, V expanded to every head; fp32 softmax + its bf16 copy
        mask = s * s  # one [s, s] bool causal mask per layer
    swiglu = (3 if fused_swiglu else 5) * e * f
    tp_region = attention + e * h + swiglu  # + the projection input + SwiGLU
    rotary = 4 * e * d
    return s * b * (sp_region / sp_split + tp_region / tp + rotary) + mask


def decoder_block_extra_bytes(seq: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                              sequence_parallel: bool = False, recompute: str = "none", final_norm: bool = False,
                              element_bytes: int = 2, norm_bytes: Optional[float] = None) -> float:
    """What a stage's decoder saves besides its layers: the final norm's input on the last stage
    (``norm_bytes`` per token, split by sequence parallelism) and, with full recompute, the fp32 rotary
    frequencies ``[s, b, 1, d]`` the checkpoints keep (once per stage)."""
    _check_recompute(recompute)
    s, b, h = seq, micro_batch, hidden
    norm = element_bytes * h + 4 if norm_bytes is None else norm_bytes
    extra = s * b * norm / (tp if sequence_parallel else 1) if final_norm else 0.0
    if recompute == "full":
        extra += s * b * (h // heads) * 4
    return extra


VISION_ATTENTION_KINDS = ("eager", "sdpa", "flash_attention_2", "auto")


def vision_block_bytes(span: int, hidden: int, heads: int, ffn: int, element_bytes: int = 2,
                       attention: str = "eager") -> int:
    """Bytes one vision block saves per patch when each patch attends to ``span`` patches (module docstring).

    Eager attention keeps its fp32 softmax and the bf16 copy of it (``(4 + E) a span``); a fused kernel (SDPA on
    CPU and CUDA, flash-attention) keeps its output and an fp32 log-sum-exp per head instead (``E h + 4 a``,
    measured on CPU; ``auto`` plans a GPU run, where it resolves to one of those)."""
    if attention not in VISION_ATTENTION_KINDS:
        raise ValueError(f"unknown vision attention {attention!r}; valid: {', '.join(VISION_ATTENTION_KINDS)}")
    h, a, f, e = hidden, heads, ffn, element_bytes
    norm = 4 * h + 4 + e * h  # fp32 input, rstd, the normalised bf16 the weight multiplies
    scores = (4 + e) * a * span if attention == "eager" else e * h + 4 * a
    return 2 * norm + e * h * (1 + 2 + 3 + 1 + 1) + scores + 4 * e * f


def vision_activation_bytes(patches: int, images: int, hidden: int, heads: int, ffn: int, depth: int,
                            full_attention_blocks: int, window_patches: int, patch_input: int,
                            element_bytes: int = 2, attention: str = "eager", recompute: bool = False) -> int:
    """Bytes the vision tower (transformers' module, no TP) keeps for the backward pass of ``images`` images of
    ``patches`` patches each in the update pass (module docstring; measured exactly on CPU in bf16).

    ``recompute`` (``model.vision_recompute``): each block keeps only its input (``E h`` per patch), and one block
    at a time is rebuilt during the backward pass (the largest, a full-attention block, counted once)."""
    h, a, e = hidden, heads, element_bytes
    spans = [patches if block < full_attention_blocks else min(window_patches, patches) for block in range(depth)]
    blocks = [vision_block_bytes(span, h, a, ffn, e, attention) for span in spans]
    per_patch = depth * e * h + max(blocks) if recompute else sum(blocks)
    norm = 4 * h + 4 + e * h
    rotary = 8 * (h // a)  # fp32 cos and sin, shared by every block
    merger = norm + 3 * e * h  # ln_q, then the inputs of its two linears and its GeLU (p/4 rows of 4h)
    per_patch += e * patch_input + rotary + merger
    return images * patches * per_patch


def full_recompute_working_bytes(seq: int, micro_batch: int, hidden: int, heads: int, kv_heads: int, ffn: int,
                                 tp: int = 1, sequence_parallel: bool = False, element_bytes: int = 2,
                                 fused_swiglu: bool = False) -> float:
    """The extra memory of full recompute: one layer's activations, rebuilt during its backward pass."""
    return layer_activation_bytes(seq, micro_batch, hidden, heads, kv_heads, ffn, tp, sequence_parallel, "none",
                                  element_bytes, fused_swiglu=fused_swiglu)


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return max(1, min(pp - stage, micro_batches))


def update_logits_bytes(tokens: int, vocab_shard: int, element_bytes: int) -> int:
    """Last stage, update pass: the model computes logits only where a response token is predicted (``tokens`` =
    micro-batch x response length, at most), ``[tokens, V_padded / TP]`` in the model dtype; our log-prob function
    saves them (no copy) and the backward pass adds their gradient: 2 x logits."""
    return 2 * tokens * vocab_shard * element_bytes


def _reduction_workspace(tokens: int, vocab_shard: int, estimator: str, chunk_tokens: int, text_only_pass: bool,
                         default_chunk_bytes: int) -> int:
    """fp32 chunk buffers of the vocab-parallel reductions: two ``[chunk, V/TP]``, ~4 MiB each for log-probs and
    entropy, ``chunk = algorithm.pgpo.kl_chunk_tokens`` for the exact KL (they run one after the other)."""
    workspace = 2 * max(default_chunk_bytes, 4 * 4 * vocab_shard)
    if text_only_pass and estimator == "exact":
        workspace = max(workspace, 2 * min(chunk_tokens, tokens) * vocab_shard * 4)
    return workspace


def scoring_logits_bytes(tokens: int, vocab_shard: int, element_bytes: int, estimator: str, chunk_tokens: int,
                         text_only_pass: bool = True, default_chunk_bytes: int = 4 << 20) -> int:
    """Last stage, scoring pass (no gradient): peak bytes of the logits.

    Logits exist only where a response token is predicted (``tokens`` = micro-batch x response length, at most):
    for the image rows and, with the text-only pass (PGPO, or ``algorithm.monitor_visual_dependency``), for the
    same tokens in the text-only rows, ``[2 tokens, V/TP]`` (``[tokens, V/TP]`` for GRPO/DAPO) in the model
    dtype. The vocab-parallel reductions read them in place, plus their fp32 chunk buffers.
    """
    rows = 2 * tokens if text_only_pass else tokens
    return rows * vocab_shard * element_bytes + _reduction_workspace(tokens, vocab_shard, estimator, chunk_tokens,
                                                                     text_only_pass, default_chunk_bytes)


def unchunked_scoring_logits_bytes(tokens: int, vocab_shard: int, element_bytes: int,
                                   text_only_pass: bool = True) -> int:
    """The same pass with a plain fp32 log-softmax of all its rows: the logits plus ``rows x V/TP x 4`` bytes:
    what the chunked reductions avoid."""
    rows = 2 * tokens if text_only_pass else tokens
    return rows * vocab_shard * (element_bytes + 4)
