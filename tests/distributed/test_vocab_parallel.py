"""Vocab-parallel log-probs, entropy, KL and k3 at TP=2 (2 gloo workers) against single-process torch.

Each worker function builds the full logits from a seed, pads the vocabulary Megatron-style with garbage (large
random values that must be ignored), takes its rank's shard and returns its per-rank outputs; the test computes
the reference on the unpadded full logits in this process and compares.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_pgpo.algorithms.visual_dependency import full_vocab_kl, k3_divergence
from megatron_pgpo.parallel.vocab_parallel_math import padded_vocab_size

TP = 2
TOKENS = 24

# (vocab_size, padded vocab, dtype name): 1000 with make_vocab_size_divisible_by=128 at TP=2 pads to 1024.
CONFIGS = {
    "fp32-nopad": (1024, 1024, "float32"),
    "fp32-pad": (1000, padded_vocab_size(1000, 128, TP), "float32"),
    "bf16-pad": (1000, padded_vocab_size(1000, 128, TP), "bfloat16"),
}


# ------------------------------------------------------------------------------------------- shared inputs
def make_inputs(seed: int, vocab_size: int, padded: int, dtype: str, kind: str = "random"):
    """Full padded logits P, Q ``[TOKENS, padded]`` (padding = garbage), targets ``[TOKENS]``, weights ``[TOKENS]``."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(TOKENS, padded, generator=gen) * 3.0
    q = p + torch.randn(TOKENS, padded, generator=gen)
    target = torch.randint(0, vocab_size, (TOKENS,), generator=gen)
    weights = torch.randn(TOKENS, generator=gen)
    if kind == "extreme":  # logits of +-1e4 and -inf at the same places in P and Q
        p = torch.where(torch.rand(TOKENS, padded, generator=gen) < 0.5, 1e4, -1e4)
        p = p + torch.randn(TOKENS, padded, generator=gen)
        q = p + 5.0 * torch.randn(TOKENS, padded, generator=gen)
        holes = torch.rand(TOKENS, padded, generator=gen) < 0.3
        holes[torch.arange(TOKENS), target] = False
        p[holes] = -torch.inf
        q[holes] = -torch.inf
    garbage = (torch.rand(TOKENS, padded - vocab_size, generator=gen) - 0.5) * 4e4
    p[:, vocab_size:] = garbage
    q[:, vocab_size:] = -garbage
    dt = getattr(torch, dtype)
    return p.to(dt), q.to(dt), target, weights


def _shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    width = full.shape[-1] // TP
    return full[:, rank * width:(rank + 1) * width].clone()


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()


# ------------------------------------------------------------------------------------------ worker functions
def _all_quantities(seed, vocab_size, padded, dtype, kind, chunk_tokens):
    """Per rank: log-probs, entropy, KL, k3 and the shard gradients of sum(w * logprob) and sum(w * entropy)."""
    from megatron_pgpo.parallel.vocab_parallel import (
        vocab_parallel_entropy, vocab_parallel_k3, vocab_parallel_kl, vocab_parallel_logprobs)

    group, rank = _tp()
    p, q, target, weights = make_inputs(seed, vocab_size, padded, dtype, kind)
    p_shard, q_shard = _shard(p, rank).requires_grad_(), _shard(q, rank)
    kw = dict(vocab_size=vocab_size, tp_group=group, chunk_tokens=chunk_tokens)
    logprobs = vocab_parallel_logprobs(p_shard, target, **kw)
    (logprobs * weights).sum().backward()
    lp_grad, p_shard.grad = p_shard.grad, None
    entropy = vocab_parallel_entropy(p_shard, **kw)
    (entropy * weights).sum().backward()
    return {
        "logprobs": logprobs.detach(), "logprobs_grad": lp_grad,
        "entropy": entropy.detach(), "entropy_grad": p_shard.grad,
        "kl": vocab_parallel_kl(p_shard.detach(), q_shard, **kw),
        "k3": vocab_parallel_k3(p_shard.detach(), q_shard, target, **kw),
    }


def _kl_special(seed, vocab_size, padded):
    """KL of P with itself, and with a Q that is -inf where P has mass (on rank 1's half)."""
    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_kl

    group, rank = _tp()
    p, _, _, _ = make_inputs(seed, vocab_size, padded, "float32", "extreme")
    column = padded // 2 + 3  # a real token held by rank 1
    p[::2, column] = p[::2, :vocab_size].amax(dim=-1)  # even rows: P has real mass there ...
    q = p.clone()
    q[::2, column] = -torch.inf  # ... and Q none
    kw = dict(vocab_size=vocab_size, tp_group=group)
    return {
        "self": vocab_parallel_kl(_shard(p, rank), _shard(p, rank), **kw),
        "q_hole": vocab_parallel_kl(_shard(p, rank), _shard(q, rank), **kw),
    }


def _all_inf_rows(vocab_size, padded):
    """Rows that are -inf everywhere on both ranks: no NaN anywhere."""
    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprobs

    group, rank = _tp()
    p, _, target, _ = make_inputs(0, vocab_size, padded, "float32")
    p[:3, :vocab_size] = -torch.inf
    shard = _shard(p, rank).requires_grad_()
    kw = dict(vocab_size=vocab_size, tp_group=group)
    logprobs = vocab_parallel_logprobs(shard, target, **kw)
    logprobs[3:].sum().backward()
    return {"logprobs": logprobs.detach(), "grad": shard.grad, "entropy": vocab_parallel_entropy(shard, **kw).detach(),
            "kl": vocab_parallel_kl(shard.detach(), shard.detach(), **kw)}


def _cross_entropy_identity(seed, vocab):
    """Ours (default Megatron TP group) vs -megatron vocab_parallel_cross_entropy, values and gradients."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_logprobs

    _, rank = _tp()
    p, _, target, weights = make_inputs(seed, vocab, vocab, "float32")
    ours_in = _shard(p, rank).requires_grad_()
    ours = vocab_parallel_logprobs(ours_in, target)  # tp_group=None -> Megatron's TP group
    (ours * weights).sum().backward()
    theirs_in = _shard(p, rank).requires_grad_()
    # Megatron's forward overwrites fp32 logits in place with the softmax: hand it a copy.
    theirs = vocab_parallel_cross_entropy(theirs_in.clone().unsqueeze(1), target.unsqueeze(1)).squeeze(1)
    (-theirs * weights).sum().backward()
    return ours.detach(), -theirs.detach(), ours_in.grad, theirs_in.grad


# ------------------------------------------------------------------------------------------- references
def _reference(p, q, target, weights, vocab_size):
    p = p[:, :vocab_size].float().requires_grad_()
    q = q[:, :vocab_size].float()
    log_p = torch.log_softmax(p, dim=-1)
    logprobs = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    (logprobs_grad,) = torch.autograd.grad((logprobs * weights).sum(), p, retain_graph=True)
    entropy = -(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1)  # 0 * log 0 = 0, also in grad
    (entropy_grad,) = torch.autograd.grad((entropy * weights).sum(), p)
    log_q = torch.log_softmax(q, dim=-1)
    return {
        "logprobs": logprobs.detach(), "logprobs_grad": logprobs_grad,
        "entropy": entropy.detach(), "entropy_grad": entropy_grad,
        "kl": full_vocab_kl(p.detach(), q),
        "kl_div": F.kl_div(log_q, log_p.detach(), log_target=True, reduction="none").sum(-1),
        "k3": k3_divergence(logprobs.detach(), log_q.gather(-1, target.unsqueeze(-1)).squeeze(-1)),
    }


def _check(actual, expected, dtype):
    if dtype == "float32":
        torch.testing.assert_close(actual.float(), expected.float(), atol=1e-5, rtol=0)
    else:
        atol = 1e-2 * expected.abs().max().item() + 1e-4
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=1e-2)


def _gathered_grad(per_rank, key, vocab_size):
    full = torch.cat([r[key] for r in per_rank], dim=-1)
    assert torch.all(full[:, vocab_size:] == 0), "padded vocabulary entries got gradient"
    return full[:, :vocab_size]


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("config", list(CONFIGS))
def test_quantities_match_single_process(workers, config):
    vocab_size, padded, dtype = CONFIGS[config]
    per_rank = workers.run(_all_quantities, 1, vocab_size, padded, dtype, "random", None, tp=TP)
    ref = _reference(*make_inputs(1, vocab_size, padded, dtype), vocab_size)
    for key in ("logprobs", "entropy", "kl", "k3"):
        torch.testing.assert_close(per_rank[0][key], per_rank[1][key], atol=0, rtol=0)  # replicated exactly
        _check(per_rank[0][key], ref[key], dtype)
    _check(per_rank[0]["kl"], ref["kl_div"], dtype)
    for key in ("logprobs_grad", "entropy_grad"):
        _check(_gathered_grad(per_rank, key, vocab_size), ref[key], dtype)
    assert per_rank[0]["kl"].min() >= 0 and per_rank[0]["entropy"].min() >= 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_equals_unchunked(workers, dtype):
    vocab_size, padded, _ = CONFIGS["fp32-pad"]
    whole = workers.run(_all_quantities, 2, vocab_size, padded, dtype, "random", None, tp=TP)
    chunked = workers.run(_all_quantities, 2, vocab_size, padded, dtype, "random", 5, tp=TP)
    for key in whole[0]:
        for rank in range(TP):
            torch.testing.assert_close(chunked[rank][key], whole[rank][key], atol=1e-6, rtol=1e-6)


def test_extreme_logits(workers):
    """+-1e4 logits with -inf at the same places in P and Q: finite and equal to the reference (relative)."""
    vocab_size, padded, _ = CONFIGS["fp32-pad"]
    per_rank = workers.run(_all_quantities, 3, vocab_size, padded, "float32", "extreme", 7, tp=TP)
    ref = _reference(*make_inputs(3, vocab_size, padded, "float32", "extreme"), vocab_size)
    for key in ("logprobs", "entropy", "kl", "k3", "logprobs_grad", "entropy_grad"):
        actual = per_rank[0][key] if not key.endswith("grad") else _gathered_grad(per_rank, key, vocab_size)
        assert not torch.isnan(actual).any(), key
        finite = torch.isfinite(ref[key])
        assert torch.equal(torch.isfinite(actual), finite), key
        torch.testing.assert_close(actual[finite], ref[key][finite], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(per_rank[0]["kl"]).all()


def test_kl_identical_is_zero_and_q_hole_is_inf(workers):
    vocab_size, padded, _ = CONFIGS["fp32-pad"]
    per_rank = workers.run(_kl_special, 4, vocab_size, padded, tp=TP)
    for result in per_rank:
        assert torch.all(result["self"] == 0.0)
        assert torch.all(result["q_hole"][::2] == math.inf)
        assert torch.all(torch.isfinite(result["q_hole"][1::2])) and result["q_hole"].min() >= -1e-6


def test_all_inf_rows_give_no_nan(workers):
    vocab_size, padded, _ = CONFIGS["fp32-pad"]
    per_rank = workers.run(_all_inf_rows, vocab_size, padded, tp=TP)
    for result in per_rank:
        assert torch.all(result["logprobs"][:3] == -math.inf) and torch.isfinite(result["logprobs"][3:]).all()
        assert torch.all(result["grad"][:3] == 0) and not torch.isnan(result["grad"]).any()
        assert torch.all(result["entropy"][:3] == 0) and torch.all(result["kl"] == 0)


def test_cross_entropy_identity_with_megatron(workers):
    per_rank = workers.run(_cross_entropy_identity, 5, 1024, tp=TP)
    for ours, theirs, ours_grad, theirs_grad in per_rank:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-6, rtol=0)
