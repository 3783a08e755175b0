"""Log-probs, entropy, exact KL and k3 on tensor-parallel vocabulary shards, never gathering the vocabulary.

Each rank of the TP group holds ``logits_shard`` of shape ``[..., w]`` (``w = V_padded / TP``; rank ``r`` holds
vocabulary entries ``[r * w, (r + 1) * w)``, Megatron's layout). ``vocab_size`` is the REAL vocabulary: entries
at global index ``>= vocab_size`` are Megatron's padding and are treated as logit ``-inf`` (they get no
probability and no gradient), so every result equals the single-process computation on the unpadded
vocabulary, at any TP. Leading dimensions (``[tokens]``, ``[s, b]``, ...) are kept in the outputs.

Communication: only per-token scalars are all-reduced (a MAX of the per-rank maxima, then a SUM of per-rank
partial sums), token chunk by token chunk; the arithmetic is in ``vocab_parallel_math``, working in a workspace
of a few fp32 ``[chunk_tokens, w]`` buffers allocated once per call. The log-prob and
entropy are ``torch.autograd.Function``s in Megatron's cross-entropy style: the forward all-reduces, the
backward is local (it recomputes the softmax chunk by chunk from the saved input and the per-token scalars,
instead of keeping an fp32 softmax of the whole shard). All outputs are float32 (float64 for float64 input).

``tp_group``: the process group of the TP ranks; ``None`` means Megatron's tensor-model-parallel group when
``megatron.core.parallel_state`` has been imported and initialised, otherwise no communication (TP = 1).
Every rank of the group must call with the same token count and ``chunk_tokens``.

Edge cases (tested): logits of +-1e4 are fine; ``-inf`` at the same places in P and Q gives a finite KL;
``-inf`` in Q where P has mass gives ``+inf`` (not NaN); identical P and Q give KL exactly 0; KL and entropy are
clamped at 0. A row that is ``-inf`` everywhere has no distribution: its log-prob is ``-inf`` (gradient 0), its
entropy 0 and its KL 0 (as P) -- no NaN. A target outside ``[0, vocab_size)`` (padding id, ignore index) gets
log-prob ``-inf`` and no gradient. ``+inf`` or NaN logits are not supported (NaN propagates).
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_pgpo.algorithms.visual_dependency import k3_divergence

from . import vocab_parallel_math as vpm

__all__ = ["vocab_parallel_entropy", "vocab_parallel_k3", "vocab_parallel_kl", "vocab_parallel_logprobs"]


# ------------------------------------------------------------------------------------------------ communication
def default_tp_group() -> Any:
    """Megatron's TP group if ``parallel_state`` is imported and initialised, else None (no communication)."""
    ps = sys.modules.get("megatron.core.parallel_state")  # never import megatron just to learn it is unused
    if ps is not None and dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def _rank_and_size(group: Any) -> Tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _all_reduce(tensor: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _layout(shard: torch.Tensor, vocab_size: Optional[int], group: Any) -> Tuple[int, int, int, int]:
    """``(vocab_start, n_valid, shard_width, vocab_size)`` for this rank, validating ``vocab_size``."""
    rank, size = _rank_and_size(group)
    width = shard.shape[-1]
    total = width * size
    vocab_size = total if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= total:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, shard width {width} x TP {size} = {total}]")
    start, _ = vpm.shard_vocab_range(width, rank, size)
    return start, vpm.valid_columns(width, rank, vocab_size), width, vocab_size


def _global_shift(chunks: Tuple[torch.Tensor, ...], group: Any) -> torch.Tensor:
    """``[k, t]`` safe global max of each of the ``k`` ``[t, n]`` chunks (one MAX all-reduce)."""
    maxima = torch.stack([vpm.local_max(c) for c in chunks])
    return vpm.safe_shift(_all_reduce(maxima, dist.ReduceOp.MAX, group))


def _workspace(count: int, chunk: int, valid: torch.Tensor) -> torch.Tensor:
    """Buffers for one call, reused by every chunk: ``[count, chunk, n_valid]``."""
    return vpm.new_workspace(count, chunk, valid.shape[1], valid.dtype, valid.device)


def _flat(shard: torch.Tensor) -> torch.Tensor:
    if shard.dim() < 1:
        raise ValueError("logits shard must have a vocabulary dimension")
    return shard.reshape(-1, shard.shape[-1])


# ------------------------------------------------------------------------------------------------- log-probs
class _VocabParallelLogprobs(torch.autograd.Function):
    """``[T, w], [T] -> [T]`` log-prob of the target; forward all-reduces, backward is local."""

    @staticmethod
    def forward(ctx, logits, target, vocab_size, group, chunk_tokens):
        """``logits [T, w]``, ``target [T]`` int64, ``vocab_size`` int or None, ``group``, ``chunk_tokens``."""
        start, n_valid, width, vocab_size = _layout(logits, vocab_size, group)
        valid = logits[:, :n_valid]
        dtype = vpm.accum_dtype(logits.dtype)
        n = logits.shape[0]
        shift = torch.empty(n, dtype=dtype, device=logits.device)
        sum_exp = torch.empty_like(shift)
        target_logit = torch.empty_like(shift)
        chunk = vpm.chunk_size(n, width, chunk_tokens)
        workspace = _workspace(1, chunk, valid)
        for sl in vpm.token_chunks(n, chunk):
            shift[sl] = _global_shift((valid[sl],), group)[0]
            stats = torch.stack([
                vpm.local_sum_exp(valid[sl], shift[sl], workspace),
                vpm.local_target_logit(valid[sl], target[sl], start),
            ])
            stats = _all_reduce(stats, dist.ReduceOp.SUM, group)
            sum_exp[sl], target_logit[sl] = stats[0], stats[1]
        target_valid = (target >= 0) & (target < vocab_size)
        logprob = vpm.logprob_from_stats(target_logit, shift, sum_exp, target_valid)
        ctx.save_for_backward(logits, target, shift, sum_exp, target_valid & (sum_exp > 0))
        ctx.layout = (start, n_valid, chunk)
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob: torch.Tensor):
        logits, target, shift, sum_exp, keep = ctx.saved_tensors
        start, n_valid, chunk = ctx.layout
        grad = torch.zeros_like(logits)  # padded columns keep 0
        valid = logits[:, :n_valid]
        workspace = _workspace(1, chunk, valid)
        for sl in vpm.token_chunks(logits.shape[0], chunk):
            grad[sl, :n_valid] = vpm.logprob_grad_chunk(
                valid[sl], target[sl], start, shift[sl], sum_exp[sl], keep[sl], grad_logprob[sl], workspace
            )
        return grad, None, None, None, None


def vocab_parallel_logprobs(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    vocab_size: Optional[int] = None,
    tp_group: Any = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Log-probability of ``target`` under ``softmax(logits)`` over the real vocabulary.

    Args:
        logits_shard: ``[..., w]`` this rank's vocabulary shard (any float dtype; gradients flow to it).
        target: ``[...]`` global token ids (int64).
        vocab_size: real vocabulary size (default ``w * TP``: no padding).
        tp_group: see module docstring.
        chunk_tokens: tokens per chunk (default: ``vocab_parallel_math.chunk_size``, ~4 MiB of fp32 per buffer).

    Returns:
        ``[...]`` float32 log-probs, equal to ``-megatron.core.tensor_parallel.vocab_parallel_cross_entropy``
        without padding (which, unlike this function, overwrites fp32 input logits in place).
    """
    group = default_tp_group() if tp_group is None else tp_group
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"target {tuple(target.shape)} must match logits {tuple(logits_shard.shape)}[:-1]")
    out = _VocabParallelLogprobs.apply(_flat(logits_shard), target.reshape(-1), vocab_size, group, chunk_tokens)
    return out.view(target.shape)


# ------------------------------------------------------------------------------------------------- entropy
class _VocabParallelEntropy(torch.autograd.Function):
    """``[T, w] -> [T]`` entropy of the softmax; forward all-reduces, backward is local."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, vocab_size: Optional[int], group: Any, chunk_tokens: Optional[int]):
        _, n_valid, width, _ = _layout(logits, vocab_size, group)
        valid = logits[:, :n_valid]
        n = logits.shape[0]
        shift = torch.empty(n, dtype=vpm.accum_dtype(logits.dtype), device=logits.device)
        terms = torch.empty(2, n, dtype=shift.dtype, device=shift.device)
        chunk = vpm.chunk_size(n, width, chunk_tokens)
        workspace = _workspace(2, chunk, valid)
        for sl in vpm.token_chunks(n, chunk):
            shift[sl] = _global_shift((valid[sl],), group)[0]
            local = vpm.local_entropy_terms(valid[sl], shift[sl], workspace)
            terms[:, sl] = _all_reduce(local, dist.ReduceOp.SUM, group)
        entropy = vpm.entropy_from_stats(terms[0], terms[1])
        ctx.save_for_backward(logits, shift, terms[0].clone(), entropy)
        ctx.layout = (n_valid, chunk)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: torch.Tensor):
        logits, shift, sum_exp, entropy = ctx.saved_tensors
        n_valid, chunk = ctx.layout
        grad = torch.zeros_like(logits)
        valid = logits[:, :n_valid]
        workspace = _workspace(2, chunk, valid)
        for sl in vpm.token_chunks(logits.shape[0], chunk):
            grad[sl, :n_valid] = vpm.entropy_grad_chunk(
                valid[sl], shift[sl], sum_exp[sl], entropy[sl], grad_entropy[sl], workspace
            )
        return grad, None, None, None


def vocab_parallel_entropy(
    logits_shard: torch.Tensor,
    vocab_size: Optional[int] = None,
    tp_group: Any = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Entropy ``-sum_x p(x) log p(x)`` of ``softmax(logits)`` over the real vocabulary, with gradient.

    Args:
        logits_shard: ``[..., w]`` this rank's shard. Other arguments as ``vocab_parallel_logprobs``.

    Returns:
        ``[...]`` float32 entropy, ``>= 0``.
    """
    group = default_tp_group() if tp_group is None else tp_group
    out = _VocabParallelEntropy.apply(_flat(logits_shard), vocab_size, group, chunk_tokens)
    return out.view(logits_shard.shape[:-1])


# ------------------------------------------------------------------------------------------------------- KL
@torch.no_grad()
def vocab_parallel_kl(
    logits_p_shard: torch.Tensor,
    logits_q_shard: torch.Tensor,
    vocab_size: Optional[int] = None,
    tp_group: Any = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Exact per-token KL(P || Q), P = softmax(logits_p), Q = softmax(logits_q), over the real vocabulary.

    With ``x = a - m_p``, ``y = b - m_q`` (logits minus their global max),
    ``KL = [sum_x e^{x} (x - y)] / Z_p + log Z_q - log Z_p``: per chunk of tokens each rank reduces its shard to
    per-token scalars (local max; then ``Z_p``, ``Z_q`` and the weighted difference), with one MAX and one SUM
    all-reduce of ``[2, chunk]`` / ``[3, chunk]`` scalars. Extra memory is one workspace of two fp32
    ``[chunk, w]`` buffers, reused by every chunk; the vocabulary is never gathered and the whole shard is never
    copied to fp32. No gradient: this is the visual-dependency score of the old policy (docs/pgpo_spec.md section 1),
    so it runs under ``torch.no_grad`` and returns a tensor that does not require grad.

    Args:
        logits_p_shard, logits_q_shard: ``[..., w]`` shards of the same shape (bf16/fp16 accumulate in fp32).
        vocab_size, tp_group, chunk_tokens: as ``vocab_parallel_logprobs``.

    Returns:
        ``[...]`` float32 KL, ``>= 0`` (``+inf`` where Q has no mass on P's support).
    """
    if logits_p_shard.shape != logits_q_shard.shape:
        raise ValueError(f"shape mismatch: {tuple(logits_p_shard.shape)} vs {tuple(logits_q_shard.shape)}")
    group = default_tp_group() if tp_group is None else tp_group
    p, q = _flat(logits_p_shard), _flat(logits_q_shard)
    _, n_valid, width, _ = _layout(p, vocab_size, group)
    p, q = p[:, :n_valid], q[:, :n_valid]
    n = p.shape[0]
    kl = torch.empty(n, dtype=vpm.accum_dtype(p.dtype), device=p.device)
    chunk = vpm.chunk_size(n, width, chunk_tokens)
    workspace = _workspace(2, chunk, p)
    for sl in vpm.token_chunks(n, chunk):
        shift_p, shift_q = _global_shift((p[sl], q[sl]), group)
        sums = _all_reduce(vpm.local_kl_terms(p[sl], q[sl], shift_p, shift_q, workspace), dist.ReduceOp.SUM, group)
        kl[sl] = vpm.kl_from_stats(sums[0], sums[1], sums[2])
    return kl.view(logits_p_shard.shape[:-1])


def vocab_parallel_k3(
    logits_image_shard: torch.Tensor,
    logits_text_shard: torch.Tensor,
    target: torch.Tensor,
    vocab_size: Optional[int] = None,
    tp_group: Any = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """k3 estimate of KL(p_image || p_text) at the sampled tokens (``k3_divergence`` of the two log-probs).

    Args:
        logits_image_shard, logits_text_shard: ``[..., w]`` shards of the image-conditioned and text-only passes.
        target: ``[...]`` sampled token ids. Other arguments as ``vocab_parallel_logprobs``.

    Returns:
        ``[...]`` float32, ``>= 0``; differentiable (PGPO uses it without gradient).
    """
    logp_image = vocab_parallel_logprobs(logits_image_shard, target, vocab_size, tp_group, chunk_tokens)
    logp_text = vocab_parallel_logprobs(logits_text_shard, target, vocab_size, tp_group, chunk_tokens)
    return k3_divergence(logp_image, logp_text)
