"""Per-rank arithmetic of the vocab-parallel log-prob, entropy and KL (no communication; testable without a group).

Layout (Megatron's): under tensor parallelism rank ``r`` of ``TP`` holds the logits of vocabulary entries
``[r * w, (r + 1) * w)``, ``w = V_padded / TP``; Megatron pads the vocabulary to a multiple of
``make_vocab_size_divisible_by * TP`` and the padded entries (global index ``>= vocab_size``) are not tokens.
Since the padding is a suffix of the global vocabulary, it is a suffix of each shard: treating padded entries as
logit ``-inf`` is the same as slicing each shard to its first ``valid_columns(...)`` columns, which is what the
callers do (a view, no copy). Every helper below therefore receives ``[t, n]`` chunks of *valid* columns.

Conventions: ``m`` is the global per-token max of the logits after the MAX all-reduce; ``safe_shift(m)`` replaces a
non-finite max (a row that is ``-inf`` everywhere) by 0 so ``exp(a - m)`` never computes ``-inf - (-inf)``.
Sums are accumulated in float32 (float64 for float64 input). Local results are per-token scalars, ready for a
SUM all-reduce; the ``*_from_stats`` functions turn the all-reduced scalars into the final values.

Speed: the helpers write into caller-provided ``workspace`` buffers (``new_workspace``, reused for every chunk
of a call) with in-place / ``out=`` ops only. On CPU a fresh multi-MiB tensor costs more (page faults) than the
arithmetic on it, and chunks of a few MiB stay in cache across the passes (measured: ~4x faster than allocating
per op; ``exp`` is then most of the time, and ``bmm`` row dot products were 5-10x slower than ``mul_`` + ``sum``).
``0 * (-inf)`` (an impossible entry in P) is handled by detecting a NaN row sum and re-summing that chunk with the
impossible entries masked: the common path pays only a ``[t]`` NaN check (a host sync per chunk on GPU).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

#: Default size of one float32 ``[chunk_tokens, w]`` workspace buffer when ``chunk_tokens`` is not given (4 MiB;
#: KL and entropy use two such buffers, log-probs one), but at least ``MIN_CHUNK_TOKENS`` tokens. Measured for the
#: KL on 2 CPU cores (bf16, 512 tokens, V/TP = 32768 / 76032 / 152064): 4 MiB was fastest at every width; 1 MiB
#: chunks were up to 1.45x slower (per-chunk op overhead), 32 MiB ones 1.6-2.5x slower (out of cache).
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_TOKENS = 4


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron's padded vocabulary: ``vocab_size`` rounded up to a multiple of ``divisible_by * tp``."""
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def shard_vocab_range(shard_width: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Global vocabulary range ``[start, end)`` held by ``rank`` (Megatron's ``VocabUtility`` rule)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    return rank * shard_width, (rank + 1) * shard_width


def valid_columns(shard_width: int, rank: int, vocab_size: int) -> int:
    """How many leading columns of ``rank``'s shard are real tokens (the rest is padding); may be 0."""
    start = rank * shard_width
    return max(0, min(shard_width, vocab_size - start))


def chunk_size(n_tokens: int, shard_width: int, chunk_tokens: int | None = None) -> int:
    """Tokens per chunk, at most ``n_tokens``: ``chunk_tokens`` if given, else ``DEFAULT_CHUNK_BYTES`` of fp32 per
    ``[chunk, shard_width]`` buffer (but ``>= MIN_CHUNK_TOKENS``)."""
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_TOKENS, DEFAULT_CHUNK_BYTES // (4 * max(1, shard_width)))
    return max(1, min(chunk_tokens, n_tokens))


def token_chunks(n_tokens: int, chunk: int) -> Iterator[slice]:
    """Slices ``[i, i + chunk)`` covering ``range(n_tokens)``."""
    for begin in range(0, n_tokens, chunk):
        yield slice(begin, min(n_tokens, begin + chunk))


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_workspace(count: int, chunk: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[count, chunk, width]`` uninitialised buffers in the accumulation dtype of ``dtype``, reused per chunk."""
    return torch.empty(count, chunk, width, dtype=accum_dtype(dtype), device=device)


def _buffers(workspace: Optional[torch.Tensor], count: int, chunk: torch.Tensor) -> List[torch.Tensor]:
    """``count`` contiguous ``[t, n]`` views for ``chunk`` (``[t, n]``): from ``workspace`` or freshly allocated."""
    t, n = chunk.shape
    if workspace is None:
        workspace = new_workspace(count, t, n, chunk.dtype, chunk.device)
    if workspace.shape[0] < count or workspace.shape[1] < t or workspace.shape[2] != n:
        raise ValueError(f"workspace {tuple(workspace.shape)} too small for {count} x {tuple(chunk.shape)}")
    return [workspace[i, :t] for i in range(count)]


def _shifted(out: torch.Tensor, chunk: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out = chunk - shift`` (converting to the accumulation dtype), in place in ``out``."""
    return out.copy_(chunk).sub_(shift.unsqueeze(-1))


def local_max(chunk: torch.Tensor) -> torch.Tensor:
    """``[t, n] -> [t]`` max over the valid columns, in the accumulation dtype; ``-inf`` when ``n == 0``."""
    dtype = accum_dtype(chunk.dtype)
    if chunk.shape[-1] == 0:
        return torch.full(chunk.shape[:-1], -torch.inf, dtype=dtype, device=chunk.device)
    return chunk.amax(dim=-1).to(dtype)  # the max is exact in the input dtype: no fp32 copy of the chunk


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """``[t]`` global max with non-finite entries (all ``-inf`` rows; ``+inf`` logits are unsupported) set to 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def local_sum_exp(chunk: torch.Tensor, shift: torch.Tensor, workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[t, n] -> [t]`` ``sum exp(a - shift)`` (one workspace buffer)."""
    (x,) = _buffers(workspace, 1, chunk)
    return _shifted(x, chunk, shift).exp_().sum(dim=-1)


def local_target_logit(chunk: torch.Tensor, target: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """``[t, n], [t] -> [t]`` logit of ``target`` where this shard owns it (valid columns), else 0 (for a SUM)."""
    local = target - vocab_start
    owned = (local >= 0) & (local < chunk.shape[-1])
    out = torch.zeros(target.shape, dtype=accum_dtype(chunk.dtype), device=chunk.device)
    if chunk.shape[-1] == 0:
        return out
    picked = chunk.gather(-1, local.clamp(0, chunk.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(owned, picked.to(out.dtype), out)


def logprob_from_stats(
    target_logit: torch.Tensor, shift: torch.Tensor, sum_exp: torch.Tensor, target_valid: torch.Tensor
) -> torch.Tensor:
    """``[t]`` log-prob ``(a_t - shift) - log sum_exp``; ``-inf`` for invalid targets and all-``-inf`` rows."""
    lp = (target_logit - shift) - torch.log(sum_exp)
    keep = target_valid & (sum_exp > 0)
    return torch.where(keep, lp, torch.full_like(lp, -torch.inf))


def logprob_grad_chunk(
    chunk: torch.Tensor,
    target: torch.Tensor,
    vocab_start: int,
    shift: torch.Tensor,
    sum_exp: torch.Tensor,
    keep: torch.Tensor,
    grad_out: torch.Tensor,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[t, n]`` gradient of ``sum(grad_out * logprob)`` w.r.t. the valid columns: ``g * (onehot - softmax)``.

    Rows where ``keep`` is False (invalid target, all ``-inf`` row) get 0. Returned in the accumulation dtype,
    in a workspace buffer (copy it out before the next chunk).
    """
    (grad,) = _buffers(workspace, 1, chunk)
    g = torch.where(keep, grad_out.to(sum_exp.dtype), torch.zeros_like(sum_exp))
    scale = torch.where(sum_exp > 0, g / sum_exp, torch.zeros_like(g))
    _shifted(grad, chunk, shift).exp_().mul_(-scale.unsqueeze(-1))
    local = target - vocab_start
    owned = (local >= 0) & (local < chunk.shape[-1])
    rows = torch.nonzero(owned, as_tuple=True)[0]
    grad[rows, local[rows]] += g[rows]
    return grad


def local_entropy_terms(
    chunk: torch.Tensor, shift: torch.Tensor, workspace: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``[t, n] -> [2, t]`` ``(sum e, sum e * (a - shift))`` with ``e = exp(a - shift)``; ``e = 0`` entries add 0.

    Uses two workspace buffers.
    """
    centred, e = _buffers(workspace, 2, chunk)
    _shifted(centred, chunk, shift)
    sum_e = torch.exp(centred, out=e).sum(dim=-1)
    product = centred.mul_(e)
    weighted = product.sum(dim=-1)
    if torch.isnan(weighted).any():  # 0 * (-inf) at impossible entries: they add 0
        weighted = product.masked_fill_(e == 0, 0.0).sum(dim=-1)
    return torch.stack([sum_e, weighted])


def entropy_from_stats(sum_exp: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """``[t]`` entropy ``log Z - sum e (a - shift) / Z``, clamped at 0; 0 for all-``-inf`` rows."""
    ent = torch.log(sum_exp) - weighted / sum_exp
    ent = torch.where(sum_exp > 0, ent, torch.zeros_like(ent))
    return ent.clamp(min=0.0)


def entropy_grad_chunk(
    chunk: torch.Tensor,
    shift: torch.Tensor,
    sum_exp: torch.Tensor,
    entropy: torch.Tensor,
    grad_out: torch.Tensor,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[t, n]`` gradient of ``sum(grad_out * H)``: ``dH/da_x = -p_x (log p_x + H)``; 0 where ``p_x = 0``.

    Uses two workspace buffers; the result lives in the first.
    """
    grad, p = _buffers(workspace, 2, chunk)
    positive = sum_exp > 0
    log_z = torch.log(torch.where(positive, sum_exp, torch.ones_like(sum_exp)))
    g = torch.where(positive, grad_out.to(sum_exp.dtype), torch.zeros_like(sum_exp))
    _shifted(grad, chunk, shift)
    torch.exp(grad, out=p).div_(torch.where(positive, sum_exp, torch.ones_like(sum_exp)).unsqueeze(-1))
    grad.sub_((log_z - entropy).unsqueeze(-1)).mul_(p)  # p * (log p + H)
    if torch.isnan(grad).any():
        grad.masked_fill_(p == 0, 0.0)
    return grad.mul_(-g.unsqueeze(-1))


def local_kl_terms(
    p_chunk: torch.Tensor,
    q_chunk: torch.Tensor,
    shift_p: torch.Tensor,
    shift_q: torch.Tensor,
    workspace: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[t, n] x 2 -> [3, t]``: ``(Z_p, Z_q, S)`` with ``x = a - shift_p``, ``y = b - shift_q``,
    ``Z_p = sum e^x``, ``Z_q = sum e^y``, ``S = sum_{e^x > 0} e^x (x - y)``.

    ``x - y = +inf`` (Q impossible where P has mass) makes ``S = +inf``; entries where ``e^x == 0`` add 0 (so
    ``-inf`` at the same places in P and Q is harmless). Uses two workspace buffers; the two ``exp`` passes are
    most of the cost.
    """
    e, diff = _buffers(workspace, 2, p_chunk)
    sum_q = _shifted(e, q_chunk, shift_q).exp_().sum(dim=-1)
    diff.copy_(p_chunk).sub_(q_chunk).sub_((shift_p - shift_q).unsqueeze(-1))  # x - y
    e_p = _shifted(e, p_chunk, shift_p).exp_()
    product = diff.mul_(e_p)
    weighted = product.sum(dim=-1)
    if torch.isnan(weighted).any():  # 0 * (+-inf or NaN) where P is impossible: those entries add 0
        weighted = product.masked_fill_(e_p == 0, 0.0).sum(dim=-1)
    return torch.stack([e_p.sum(dim=-1), sum_q, weighted])


def kl_from_stats(sum_p: torch.Tensor, sum_q: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """``[t]`` KL(P || Q) = ``S / Z_p + log Z_q - log Z_p``, clamped at 0.

    With ``x``, ``y`` the logits shifted by their own global max, ``log p = x - log Z_p`` and
    ``log q = y - log Z_q``, so ``sum p (log p - log q) = S / Z_p - log Z_p + log Z_q``. Identical P and Q give
    exactly 0 (``S = 0`` and ``Z_p == Z_q`` bit for bit). ``Z_q = 0`` where ``Z_p > 0`` gives ``+inf``; a P row that
    is ``-inf`` everywhere (no distribution) gives 0. NaN inputs stay NaN.
    """
    kl = weighted / sum_p + (torch.log(sum_q) - torch.log(sum_p))
    kl = torch.where(sum_q > 0, kl, torch.full_like(kl, torch.inf))
    kl = torch.where(sum_p > 0, kl, torch.zeros_like(kl))
    return kl.clamp(min=0.0)
