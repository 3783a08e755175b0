"""k3 and full-vocabulary KL against hand values and torch's own KL; score sanitising."""
import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_pgpo.algorithms import full_vocab_kl, k3_divergence, sanitize_scores

INF = float("inf")


def test_k3_hand_values():
    # r = p_text / p_image. r = .5: (.5 - 1) - log .5 = .193147; r = 2: 1 - log 2 = .306853; r = 1: 0.
    logp_image = torch.tensor([math.log(0.4), math.log(0.2), math.log(0.3)])
    logp_text = torch.tensor([math.log(0.2), math.log(0.4), math.log(0.3)])
    torch.testing.assert_close(k3_divergence(logp_image, logp_text), torch.tensor([0.193147, 0.306853, 0.0]),
                               atol=1e-6, rtol=0)


def test_k3_edge_cases():
    got = k3_divergence(torch.tensor([-1.0, -INF, -INF, -1e-9]), torch.tensor([-INF, -1.0, -INF, -1e-9]))
    assert got.tolist() == [INF, INF, 0.0, 0.0]


@given(st.floats(-30, 0), st.floats(-30, 0))
def test_k3_nonnegative_and_matches_definition(a, b):
    got = k3_divergence(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()
    r = math.exp(b - a)
    assert got >= 0
    assert math.isclose(got, (r - 1) - math.log(r), rel_tol=1e-9, abs_tol=1e-12)


def test_full_vocab_kl_matches_torch_kl_div():
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.randn(3, 5, 97, generator=gen, dtype=torch.float64) * 3
    q_logits = torch.randn(3, 5, 97, generator=gen, dtype=torch.float64) * 3
    ref = torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1)
    torch.testing.assert_close(full_vocab_kl(p_logits, q_logits), ref, atol=1e-12, rtol=1e-10)


def test_full_vocab_kl_hand_value_and_edge_cases():
    # P = [.5, .5, 0], Q = [.25, .25, .5]: KL = 2 * .5 * log 2 = log 2; -inf in P contributes 0.
    p = torch.tensor([[0.0, 0.0, -INF]])
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    torch.testing.assert_close(full_vocab_kl(p, q), torch.tensor([math.log(2)]), atol=1e-6, rtol=0)
    assert full_vocab_kl(q, torch.tensor([[0.0, -INF, 0.0]])).item() == INF  # Q has no mass where P does
    same = torch.randn(4, 50)
    assert (full_vocab_kl(same, same).abs() <= 1e-6).all()
    assert full_vocab_kl(same.bfloat16(), same.bfloat16()).dtype == torch.float32


def test_sanitize_scores_counts_changes_in_valid_positions():
    raw = torch.tensor([[float("nan"), -1e-7, 3.0, INF], [2e4, 0.5, float("nan"), 1.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    clean, n = sanitize_scores(raw, mask, s_max=1e4)
    assert clean.tolist() == [[0.0, 0.0, 3.0, 1e4], [1e4, 0.5, 0.0, 1.0]]
    assert n.item() == 4  # nan, -1e-7, inf, 2e4 (the masked nan does not count)
