"""GRPO/DAPO advantages against a plain numpy computation, DAPO's group filter and overlong handling."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_pgpo.algorithms import ADVANTAGE_SHAPERS, dapo_keep_groups, group_normalized_advantages
from megatron_pgpo.algorithms.dapo import overlong_filter_mask, overlong_soft_penalty


def numpy_grpo(rewards, group_ids, eps=1e-6, scale_by_std=True):
    rewards, group_ids = np.asarray(rewards, dtype=np.float64), np.asarray(group_ids)
    out = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        idx = np.where(group_ids == g)[0]
        if len(idx) < 2:
            continue  # a group of one has advantage 0
        r = rewards[idx]
        centred = r - r.mean()
        out[idx] = centred / (r.std(ddof=1) + eps) if scale_by_std else centred
    return out


def test_hand_computed_group():
    # rewards [1, 0, 0, 1]: mean .5, sample std sqrt(1/3) -> A = +-.5 / .57735 = +-0.866025
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([7, 7, 7, 7]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.866025, -0.866025, -0.866025, 0.866025]), atol=1e-6, rtol=0)


@given(
    st.lists(st.tuples(st.floats(-10, 10), st.integers(-3, 5)), min_size=1, max_size=40),
    st.booleans(),
)
def test_matches_numpy(pairs, scale_by_std):
    rewards = [p[0] for p in pairs]
    groups = [p[1] for p in pairs]
    got = group_normalized_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(groups),
                                      scale_by_std=scale_by_std)
    np.testing.assert_allclose(got.numpy(), numpy_grpo(rewards, groups, scale_by_std=scale_by_std), atol=1e-9)


def test_groups_of_one_get_zero_and_integer_rewards_give_float32():
    adv = group_normalized_advantages(torch.tensor([1, 0, 5]), torch.tensor([0, 0, 1]))
    assert adv.dtype == torch.float32
    assert adv[2].item() == 0.0
    assert adv[0].item() > 0 > adv[1].item()


def test_advantages_sum_to_zero_per_group():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=gen)
    groups = torch.arange(24) % 3
    adv = group_normalized_advantages(rewards, groups)
    for g in range(3):
        assert abs(adv[groups == g].sum().item()) < 1e-5


def test_dapo_keep_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert dapo_keep_groups(rewards, groups).tolist() == [False, False, True, True, False, False, False]


def test_grpo_shaper_broadcasts_over_valid_tokens():
    out = ADVANTAGE_SHAPERS.get("grpo")(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_shape_errors():
    with pytest.raises(ValueError, match="equal shape"):
        group_normalized_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="response_mask"):
        ADVANTAGE_SHAPERS.get("grpo")(torch.zeros(2), torch.ones(3, 4))


def test_overlong_soft_penalty_hand_computed():
    # L_max 20, buffer 4: penalty starts after 16 tokens; 18 -> -.5, 20 -> -1, 25 -> -1 (capped).
    got = overlong_soft_penalty(torch.tensor([10, 16, 18, 20, 25]), max_response_length=20, buffer_length=4)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError):
        overlong_soft_penalty(torch.tensor([1]), 10, 0)
    assert overlong_filter_mask(torch.tensor([True, False])).tolist() == [0.0, 1.0]
