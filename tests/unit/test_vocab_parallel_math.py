"""Vocab-parallel math without a process group: TP=1 public functions, and TP=2 simulated with the pure helpers."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_pgpo.algorithms.visual_dependency import full_vocab_kl, k3_divergence
from megatron_pgpo.parallel import vocab_parallel_math as vpm
from megatron_pgpo.parallel.vocab_parallel import (
    default_tp_group, vocab_parallel_entropy, vocab_parallel_k3, vocab_parallel_kl, vocab_parallel_logprobs)

VOCAB, PADDED, TOKENS = 50, 64, 9


def _inputs(seed=0, dtype=torch.float32, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(TOKENS, PADDED, generator=gen) * scale
    q = p + torch.randn(TOKENS, PADDED, generator=gen)
    p[:, VOCAB:] = 1e4  # garbage padding that would dominate if it were not ignored
    q[:, VOCAB:] = -1e4
    target = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    return p.to(dtype), q.to(dtype), target


def _ref_logprobs(logits, target):
    return torch.log_softmax(logits[:, :VOCAB].double(), -1).gather(-1, target[:, None]).squeeze(-1)


def _ref_entropy(logits):
    log_p = torch.log_softmax(logits[:, :VOCAB].double(), -1)
    return -(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1)


# ----------------------------------------------------------------------------------------------- layout helpers
def test_layout_helpers():
    assert vpm.padded_vocab_size(1000, 128, 2) == 1024
    assert vpm.padded_vocab_size(151655, 128, 8) == 152576 and vpm.padded_vocab_size(1024, 128, 2) == 1024
    assert vpm.shard_vocab_range(512, 1, 2) == (512, 1024)
    assert [vpm.valid_columns(512, r, 1000) for r in range(2)] == [512, 488]
    assert [vpm.valid_columns(100, r, 150) for r in range(4)] == [100, 50, 0, 0]
    assert vpm.chunk_size(10, 1000, 3) == 3 and vpm.chunk_size(100, 1 << 14) == 64 and vpm.chunk_size(100, 1 << 20) == 4
    assert vpm.chunk_size(10, 1 << 14) == 10 and vpm.chunk_size(0, 8) == 1
    assert [(s.start, s.stop) for s in vpm.token_chunks(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError):
        vpm.chunk_size(10, 10, 0)


def test_no_group_without_megatron_state(monkeypatch):
    fake_state = types.SimpleNamespace(model_parallel_is_initialized=lambda: False)
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", fake_state)
    assert default_tp_group() is None  # TP=1: no communication


# ------------------------------------------------------------------------------------------------- TP = 1
@pytest.mark.parametrize("chunk_tokens", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_and_entropy_with_gradients(dtype, chunk_tokens):
    p, _, target = _inputs(1, dtype)
    weights = torch.randn(TOKENS, generator=torch.Generator().manual_seed(9))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    for ours_fn, ref_fn in (
        (
            lambda x: vocab_parallel_logprobs(x, target, VOCAB, chunk_tokens=chunk_tokens),
            lambda x: _ref_logprobs(x, target),
        ),
        (lambda x: vocab_parallel_entropy(x, VOCAB, chunk_tokens=chunk_tokens), _ref_entropy),
    ):
        ours_in, ref_in = p.clone().requires_grad_(), p.clone().requires_grad_()
        ours, ref = ours_fn(ours_in), ref_fn(ref_in)
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(ours.double(), ref, **tol)
        (ours * weights.to(ours.dtype)).sum().backward()
        (ref * weights.double()).sum().backward()
        assert ours_in.grad.dtype == dtype and torch.all(ours_in.grad[:, VOCAB:] == 0)
        torch.testing.assert_close(ours_in.grad.double(), ref_in.grad.double(), **tol)


@pytest.mark.parametrize("chunk_tokens", [None, 2])
def test_kl_and_k3_match_reference(chunk_tokens):
    p, q, target = _inputs(2)
    kl = vocab_parallel_kl(p, q, VOCAB, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(kl, full_vocab_kl(p[:, :VOCAB], q[:, :VOCAB]), atol=1e-5, rtol=0)
    log_p, log_q = torch.log_softmax(p[:, :VOCAB], -1), torch.log_softmax(q[:, :VOCAB], -1)
    kl_div = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, kl_div, atol=1e-5, rtol=0)
    assert not kl.requires_grad and kl.min() >= 0
    k3 = vocab_parallel_k3(p, q, target, VOCAB, chunk_tokens=chunk_tokens)
    ref_k3 = k3_divergence(log_p.gather(-1, target[:, None]).squeeze(-1), log_q.gather(-1, target[:, None]).squeeze(-1))
    torch.testing.assert_close(k3, ref_k3, atol=1e-5, rtol=0)


def test_bf16_kl_accumulates_in_fp32():
    p, q, _ = _inputs(3, torch.bfloat16)
    kl = vocab_parallel_kl(p, q, VOCAB, chunk_tokens=4)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, full_vocab_kl(p[:, :VOCAB].float(), q[:, :VOCAB].float()), atol=1e-5, rtol=1e-5)


def test_leading_dims_kept_and_inputs_untouched():
    p, q, target = _inputs(4)
    p3, q3, t3 = p.view(3, 3, PADDED), q.view(3, 3, PADDED), target.view(3, 3)
    before = p3.clone()
    assert vocab_parallel_logprobs(p3, t3, VOCAB).shape == (3, 3)
    assert vocab_parallel_entropy(p3, VOCAB).shape == (3, 3)
    assert vocab_parallel_kl(p3, q3, VOCAB).shape == (3, 3)
    assert torch.equal(p3, before)  # unlike Megatron's cross entropy, fp32 inputs are not overwritten


def test_argument_errors():
    p, q, target = _inputs(5)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_kl(p, q, PADDED + 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        vocab_parallel_kl(p, q[:, :10])
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_logprobs(p, target[:3])


# ---------------------------------------------------------------------------------------------- edge cases
def test_extreme_and_impossible_entries():
    p, q, target = _inputs(6, scale=1e4)
    holes = torch.rand(TOKENS, PADDED, generator=torch.Generator().manual_seed(1)) < 0.3
    holes[torch.arange(TOKENS), target] = False
    p[holes], q[holes] = -torch.inf, -torch.inf
    kl = vocab_parallel_kl(p, q, VOCAB, chunk_tokens=4)
    assert torch.isfinite(kl).all() and kl.min() >= 0
    torch.testing.assert_close(kl, full_vocab_kl(p[:, :VOCAB], q[:, :VOCAB]), atol=1e-5, rtol=1e-5)
    lp = vocab_parallel_logprobs(p, target, VOCAB).double()
    torch.testing.assert_close(lp, _ref_logprobs(p, target), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vocab_parallel_entropy(p, VOCAB).double(), _ref_entropy(p), atol=1e-5, rtol=1e-5)
    assert torch.all(vocab_parallel_kl(p, p, VOCAB) == 0)
    q_hole = p.clone()
    q_hole[:, 0] = -torch.inf
    p[:, 0] = p[:, :VOCAB].amax(-1)  # P has real mass where Q has none
    assert torch.all(vocab_parallel_kl(p, q_hole, VOCAB) == math.inf)
    lp_text = vocab_parallel_logprobs(q_hole, torch.zeros_like(target), VOCAB)
    assert torch.all(lp_text == -math.inf)
    assert torch.all(vocab_parallel_k3(p, q_hole, torch.zeros_like(target), VOCAB) == math.inf)


def test_all_inf_rows_and_invalid_targets():
    p, _, target = _inputs(7)
    p[:2, :VOCAB] = -torch.inf
    target[2] = VOCAB + 3  # a padding id: not a token
    target[3] = -100  # an ignore index
    x = p.clone().requires_grad_()
    lp = vocab_parallel_logprobs(x, target, VOCAB)
    assert torch.all(lp[:4] == -math.inf) and torch.isfinite(lp[4:]).all()
    lp[4:].sum().backward()
    assert torch.all(x.grad[:4] == 0) and not torch.isnan(x.grad).any()
    y = p.clone().requires_grad_()
    ent = vocab_parallel_entropy(y, VOCAB)
    ent.sum().backward()
    assert torch.all(ent[:2] == 0) and not torch.isnan(y.grad).any()
    assert torch.all(vocab_parallel_kl(p, p, VOCAB)[:2] == 0)


# ------------------------------------------------------------------------ TP = 2 simulated with the helpers
def _simulated_tp_kl(p, q, tp, vocab_size):
    """What the ranks compute, with the two all-reduces written out: MAX over ranks, then SUM over ranks."""
    width = p.shape[-1] // tp
    shards = [(p[:, r * width:(r + 1) * width], q[:, r * width:(r + 1) * width]) for r in range(tp)]
    valid = [(a[:, :vpm.valid_columns(width, r, vocab_size)], b[:, :vpm.valid_columns(width, r, vocab_size)])
             for r, (a, b) in enumerate(shards)]
    maxima = torch.stack([torch.stack([vpm.local_max(a), vpm.local_max(b)]) for a, b in valid]).amax(0)
    shift_p, shift_q = vpm.safe_shift(maxima)
    sums = sum(vpm.local_kl_terms(a, b, shift_p, shift_q) for a, b in valid)
    return vpm.kl_from_stats(*sums)


@given(
    seed=st.integers(0, 2**16), tokens=st.integers(1, 6), vocab_size=st.integers(1, 40),
    tp=st.sampled_from([1, 2, 4]), scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_simulated_tp_kl_matches_reference(seed, tokens, vocab_size, tp, scale):
    padded = vpm.padded_vocab_size(vocab_size, 4, tp)
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(tokens, padded, generator=gen, dtype=torch.float64) * scale
    q = torch.randn(tokens, padded, generator=gen, dtype=torch.float64) * scale
    p[:, vocab_size:], q[:, vocab_size:] = 1e3, -1e3
    kl = _simulated_tp_kl(p, q, tp, vocab_size)
    ref = full_vocab_kl(p[:, :vocab_size], q[:, :vocab_size]).clamp(min=0)
    torch.testing.assert_close(kl, ref, atol=1e-9, rtol=1e-9)
    assert torch.all(_simulated_tp_kl(p, p, tp, vocab_size) == 0)


def test_simulated_tp_logprob_and_entropy_stats():
    p, _, target = _inputs(8, torch.float64)
    tp, width = 4, PADDED // 4
    shards = [p[:, r * width:r * width + vpm.valid_columns(width, r, VOCAB)] for r in range(tp)]
    shift = vpm.safe_shift(torch.stack([vpm.local_max(s) for s in shards]).amax(0))
    sum_exp = sum(vpm.local_sum_exp(s, shift) for s in shards)
    target_logit = sum(vpm.local_target_logit(s, target, r * width) for r, s in enumerate(shards))
    lp = vpm.logprob_from_stats(target_logit, shift, sum_exp, target < VOCAB)
    torch.testing.assert_close(lp, _ref_logprobs(p, target), atol=1e-12, rtol=0)
    terms = sum(vpm.local_entropy_terms(s, shift) for s in shards)
    torch.testing.assert_close(vpm.entropy_from_stats(*terms), _ref_entropy(p), atol=1e-12, rtol=0)
