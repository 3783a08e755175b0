"""The clipped surrogate against a hand-computed case with both clip sides active, for both aggregations."""
import math

import pytest
import torch

from megatron_pgpo.algorithms import POLICY_LOSSES, aggregate_loss, clipped_policy_loss, reference_kl

# ratios and advantages, clip range [0.8, 1.28]:
#  (0,0) r=1.5 A=+1: min(-1.5, -1.28) -> loss -1.28, clipped (high)
#  (0,1) r=0.5 A=-1: max(0.5, 0.8)   -> loss  0.80, clipped (low)
#  (0,2) r=1.1 A=+1: inside          -> loss -1.10
#  (1,0) r=0.7 A=-1: max(0.7, 0.8)   -> loss  0.80, clipped (low)
#  (1,1) r=0.5 A=+1: max(-0.5, -0.8) -> loss -0.50, unclipped wins
#  (1,2) padding
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.7, 0.5, 9.0]])
ADV = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 5.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _inputs():
    old = torch.log(torch.tensor([[0.2, 0.4, 0.3], [0.5, 0.6, 0.1]]))
    logp = (old + torch.log(RATIOS)).clone().requires_grad_(True)
    return logp, old


def test_token_mean_hand_computed_with_gradient():
    logp, old = _inputs()
    loss, metrics = clipped_policy_loss(logp, old, ADV, MASK, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.1 + 0.8 - 0.5) / 5, abs=1e-6)
    assert metrics["clip_fraction"].item() == pytest.approx(3 / 5)
    assert metrics["clip_fraction_low"].item() == pytest.approx(2 / 5)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5)
    loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens, 0 where the clipped branch is active or padded.
    expected = torch.tensor([[0.0, 0.0, -1.1 / 5], [0.0, -0.5 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)


def test_seq_mean_token_mean_hand_computed():
    logp, old = _inputs()
    loss, _ = clipped_policy_loss(logp, old, ADV, MASK, aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(((-1.28 + 0.8 - 1.1) / 3 + (0.8 - 0.5) / 2) / 2, abs=1e-6)


def test_approx_kl_is_k3_of_old_vs_new():
    logp, old = _inputs()
    _, metrics = clipped_policy_loss(logp, old, ADV, MASK)
    lr = torch.log(RATIOS)[MASK.bool()]
    assert metrics["approx_kl"].item() == pytest.approx(float((torch.expm1(lr) - lr).mean()), rel=1e-5)


def test_global_denominators_make_micro_batches_sum_to_the_full_batch_loss():
    logp, old = _inputs()
    full, _ = clipped_policy_loss(logp, old, ADV, MASK)
    parts = [clipped_policy_loss(logp[i:i + 1], old[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], global_num_tokens=5)[0]
             for i in range(2)]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-7)
    full_seq, _ = clipped_policy_loss(logp, old, ADV, MASK, aggregation="seq-mean-token-mean")
    parts = [clipped_policy_loss(logp[i:i + 1], old[i:i + 1], ADV[i:i + 1], MASK[i:i + 1],
                                 aggregation="seq-mean-token-mean", global_num_seqs=2)[0] for i in range(2)]
    assert (parts[0] + parts[1]).item() == pytest.approx(full_seq.item(), abs=1e-7)


def test_empty_mask_gives_zero_not_nan():
    logp, old = _inputs()
    loss, metrics = clipped_policy_loss(logp, old, ADV, torch.zeros_like(MASK))
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in metrics.values())


def test_registry_and_errors():
    assert POLICY_LOSSES.get("clipped") is clipped_policy_loss
    with pytest.raises(KeyError, match="valid names: clipped"):
        POLICY_LOSSES.get("ppo2")
    with pytest.raises(KeyError, match="token-mean"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), aggregation="sum")
    logp, old = _inputs()
    with pytest.raises(ValueError, match="clip_low"):
        clipped_policy_loss(logp, old, ADV, MASK, clip_low=1.0)
    with pytest.raises(ValueError, match="shape"):
        clipped_policy_loss(logp, old, ADV[:, :2], MASK)


def test_reference_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    l2 = math.log(2)
    torch.testing.assert_close(reference_kl(logp, ref, "k1"), torch.tensor([l2, -l2]))
    torch.testing.assert_close(reference_kl(logp, ref, "k2"), torch.tensor([l2 * l2 / 2] * 2))
    # k3 = exp(-k1) - 1 + k1: [.5 - 1 + l2, 2 - 1 - l2]
    torch.testing.assert_close(reference_kl(logp, ref, "k3"), torch.tensor([l2 - 0.5, 1 - l2]))
    with pytest.raises(KeyError, match="k1, k2, k3"):
        reference_kl(logp, ref, "k4")


def test_kl_and_entropy_terms_hand_computed_with_gradient():
    """``+ kl_coef * agg k(logp, ref)`` and ``- entropy_coef * agg H`` on top of the clipped loss (verl's actor)."""
    logp, old = _inputs()
    base, _ = clipped_policy_loss(logp.detach(), old, ADV, MASK)
    ref = logp.detach() - torch.tensor([[0.5, 0.0, -0.2], [0.1, 0.3, 7.0]])  # log pi - log pi_ref = these
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]], requires_grad=True)
    loss, metrics = clipped_policy_loss(logp, old, ADV, MASK, ref_logp=ref, kl_coef=0.1, kl_estimator="k1",
                                        entropy=entropy, entropy_coef=0.01)
    k1 = (0.5 + 0.0 - 0.2 + 0.1 + 0.3) / 5  # the padded token's 7.0 and 100.0 never count
    assert loss.item() == pytest.approx(base.item() + 0.1 * k1 - 0.01 * 15 / 5, abs=1e-6)
    assert metrics["kl_ref"].item() == pytest.approx(k1) and metrics["entropy"].item() == pytest.approx(3.0)
    loss.backward()
    torch.testing.assert_close(entropy.grad, -0.01 / 5 * MASK.float())
    k3, _ = clipped_policy_loss(logp.detach(), old, ADV, MASK, ref_logp=ref, kl_coef=1.0, kl_estimator="k3")
    x = torch.tensor([0.5, 0.0, -0.2, 0.1, 0.3])
    assert k3.item() == pytest.approx(base.item() + float((torch.exp(-x) - 1 + x).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        clipped_policy_loss(logp, old, ADV, MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef > 0 needs entropy"):
        clipped_policy_loss(logp, old, ADV, MASK, entropy_coef=0.1)
