"""The algorithm core on CUDA equals the CPU float64 computation (device-agnostic code, bf16 inputs)."""
import pytest
import torch

from megatron_pgpo.algorithms import clipped_policy_loss, full_vocab_kl, group_normalized_advantages, pgpo_token_weights

pytestmark = pytest.mark.gpu


def test_pgpo_weights_and_advantages_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 512, generator=gen, dtype=torch.float64) ** 4 * 10
    mask = torch.arange(512)[None] < torch.randint(1, 513, (64, 1), generator=gen)
    ref = pgpo_token_weights(scores, mask)
    got = pgpo_token_weights(scores.cuda().float(), mask.cuda())
    torch.testing.assert_close(got.cpu().double(), ref, atol=1e-4, rtol=1e-4)
    rewards = torch.rand(64, generator=gen)
    groups = torch.arange(64) // 8
    torch.testing.assert_close(group_normalized_advantages(rewards.cuda(), groups.cuda()).cpu(),
                               group_normalized_advantages(rewards, groups), atol=1e-5, rtol=1e-5)


def test_full_vocab_kl_bf16_on_cuda_matches_fp64_cpu():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(256, 152064, generator=gen) * 2
    q = p + 0.5 * torch.randn(256, 152064, generator=gen)
    ref = full_vocab_kl(p.bfloat16().double(), q.bfloat16().double())
    got = full_vocab_kl(p.bfloat16().cuda(), q.bfloat16().cuda()).cpu().double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


def test_clipped_loss_gradient_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(8, 128, generator=gen) * 3
    new = old + 0.3 * torch.randn(8, 128, generator=gen)
    adv = torch.randn(8, 128, generator=gen)
    mask = torch.rand(8, 128, generator=gen) > 0.2
    grads = []
    for device in ("cpu", "cuda"):
        logp = new.to(device).clone().requires_grad_(True)
        loss, _ = clipped_policy_loss(logp, old.to(device), adv.to(device), mask.to(device))
        loss.backward()
        grads.append(logp.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_vocab_parallel_functions_on_cuda_tp1_match_reference():
    from megatron_pgpo.parallel.vocab_parallel import vocab_parallel_kl, vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(3)
    p = torch.randn(512, 152064, generator=gen)
    q = p + 0.3 * torch.randn(512, 152064, generator=gen)
    target = torch.randint(0, 151643, (512,), generator=gen)
    # Qwen's real vocabulary is 151643 + specials < 152064: the padded tail must be ignored.
    ref_kl = full_vocab_kl(p[:, :151665].double(), q[:, :151665].double())
    got_kl = vocab_parallel_kl(p.cuda(), q.cuda(), vocab_size=151665, chunk_tokens=128).cpu().double()
    torch.testing.assert_close(got_kl, ref_kl, atol=1e-5, rtol=1e-4)
    ref_lp = torch.log_softmax(p[:, :151665].double(), -1).gather(-1, target[:, None])[:, 0]
    got_lp = vocab_parallel_logprobs(p.cuda(), target.cuda(), vocab_size=151665).cpu().double()
    torch.testing.assert_close(got_lp, ref_lp, atol=1e-4, rtol=1e-5)
