"""PGPO token weights: hand-computed cases (docs/pgpo_spec.md section 2) and the spec's invariants as properties."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_pgpo.algorithms import ADVANTAGE_SHAPERS, pgpo_advantages, pgpo_token_weights
from megatron_pgpo.algorithms.pgpo import normalized_importance, threshold_gate

E = math.e


def test_hand_computed_three_tokens():
    # S~ = log(1+S) = [0, 1, 2] -> I = [0, .5, 1] -> w = [0, 1 + 2*.1/.6, 1 + 2*.6/.6] = [0, 4/3, 3];
    # sum = 13/3, |o| = 3 -> w~ = [0, 12/13, 27/13].
    scores = torch.tensor([[0.0, E - 1, E**2 - 1]])
    w = pgpo_token_weights(scores, torch.ones(1, 3), tau=0.4, beta=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 12 / 13, 27 / 13]]), atol=1e-5, rtol=0)


def test_hand_computed_suppressed_token_and_padding():
    # S~ = [0, .2, 1, pad] -> I = [0, .2, 1] -> w = [0, .2/.4, 1 + 2*.6/.6] = [0, .5, 3]; sum 3.5, |o| = 3
    # -> w~ = [0, 3/7, 18/7, 0]; the padded score (huge) must not change anything.
    scores = torch.tensor([[0.0, math.exp(0.2) - 1, E - 1, 1e9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = pgpo_token_weights(scores, mask)
    torch.testing.assert_close(w, torch.tensor([[0.0, 3 / 7, 18 / 7, 0.0]]), atol=1e-5, rtol=0)
    adv = pgpo_advantages(torch.tensor([-0.7]), scores, mask)
    torch.testing.assert_close(adv, -0.7 * torch.tensor([[0.0, 3 / 7, 18 / 7, 0.0]]), atol=1e-5, rtol=0)


def test_hand_computed_beta_zero_and_tau_half():
    # S~ = [0, .25, .5, 1], tau=.5, beta=0: I = S~ -> w = [0, .5, 1, 1], sum 2.5, |o| = 4 -> w~ = w * 1.6.
    scores = torch.tensor([[0.0, math.exp(0.25) - 1, math.exp(0.5) - 1, E - 1]])
    w = pgpo_token_weights(scores, torch.ones(1, 4), tau=0.5, beta=0.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.8, 1.6, 1.6]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "scores, mask, expected",
    [
        ([[5.0, 0.0]], [[1, 0]], [[1.0, 0.0]]),  # one-token response: weight 1
        ([[0.3, 0.3, 0.3]], [[1, 1, 1]], [[1.0, 1.0, 1.0]]),  # constant scores: plain GRPO
        ([[0.0, 0.0, 0.0]], [[1, 1, 1]], [[1.0, 1.0, 1.0]]),
        ([[1.0, 2.0, 3.0]], [[0, 0, 0]], [[0.0, 0.0, 0.0]]),  # all padding
        ([[float("nan"), float("nan")]], [[1, 1]], [[1.0, 1.0]]),  # NaN -> 0 -> constant
        ([[float("inf"), 1e30]], [[1, 1]], [[1.0, 1.0]]),  # both clamp to s_max -> constant
        ([[-5.0, 0.0]], [[1, 1]], [[1.0, 1.0]]),  # negatives clamp to 0 -> constant
    ],
)
def test_degenerate_responses(scores, mask, expected):
    w = pgpo_token_weights(torch.tensor(scores), torch.tensor(mask))
    torch.testing.assert_close(w, torch.tensor(expected), atol=0, rtol=0)


def test_inf_score_is_the_largest():
    # inf -> s_max = 1e4; S~ = [log(1e4+1), 0, 0]: the inf token gets all the weight (w = [3, 0, 0] -> [3, 0, 0]).
    w = pgpo_token_weights(torch.tensor([[float("inf"), 0.0, 0.0]]), torch.ones(1, 3))
    torch.testing.assert_close(w, torch.tensor([[3.0, 0.0, 0.0]]), atol=1e-5, rtol=0)


def test_float64_in_float64_out_and_bf16_in_float32_out():
    s = torch.tensor([[0.1, 0.5, 2.0]])
    assert pgpo_token_weights(s.double(), torch.ones(1, 3)).dtype == torch.float64
    assert pgpo_token_weights(s.bfloat16(), torch.ones(1, 3)).dtype == torch.float32


def test_registry_shaper_matches_function_and_requires_scores():
    s = torch.tensor([[0.1, 0.5, 2.0], [1.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(ADVANTAGE_SHAPERS.get("pgpo")(a, m, scores=s, tau=0.3), pgpo_advantages(a, s, m, tau=0.3))
    with pytest.raises(ValueError, match="needs visual-dependency scores"):
        ADVANTAGE_SHAPERS.get("pgpo")(a, m)


@pytest.mark.parametrize("kwargs, match", [({"tau": 1.5}, "tau"), ({"beta": -1.0}, "beta"), ({"eps": 0.0}, "eps")])
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pgpo_token_weights(torch.ones(1, 2), torch.ones(1, 2), **kwargs)


# ---- properties (docs/pgpo_spec.md section 2, "Invariants a test can check") ----

special = st.sampled_from([float("nan"), float("inf"), float("-inf"), -1.0, -1e-7, 0.0, 1e-12, 1e4, 1e30])
score_value = st.one_of(st.floats(min_value=0.0, max_value=50.0), special)


@st.composite
def batches(draw, allow_special=True):
    b = draw(st.integers(1, 4))
    t = draw(st.integers(1, 12))
    value = score_value if allow_special else st.floats(min_value=0.0, max_value=1e3)
    scores = torch.tensor(draw(st.lists(st.lists(value, min_size=t, max_size=t), min_size=b, max_size=b)),
                          dtype=torch.float64)
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    tau = draw(st.floats(0.0, 1.0))
    beta = draw(st.floats(0.0, 5.0))
    return scores, mask, tau, beta


@given(batches())
def test_weights_sum_to_length_and_are_finite(batch):
    scores, mask, tau, beta = batch
    w = pgpo_token_weights(scores, mask, tau=tau, beta=beta)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w.sum(-1), mask.sum(-1).double(), atol=1e-9, rtol=1e-9)


@given(batches(), st.lists(st.floats(-3.0, 3.0), min_size=4, max_size=4))
def test_token_mean_of_reshaped_advantage_equals_sequence_advantage(batch, advs):
    scores, mask, tau, beta = batch
    a = torch.tensor(advs[: scores.shape[0]], dtype=torch.float64)
    adv = pgpo_advantages(a, scores, mask, tau=tau, beta=beta)
    lengths = mask.sum(-1)
    valid = lengths > 0
    token_mean = adv.sum(-1)[valid] / lengths[valid]
    torch.testing.assert_close(token_mean, a[valid], atol=1e-9, rtol=1e-9)
    assert torch.isfinite(adv).all()


@given(batches(allow_special=False))
def test_monotone_in_score_within_a_response(batch):
    scores, mask, tau, beta = batch
    w = pgpo_token_weights(scores, mask, tau=tau, beta=beta)
    for i in range(scores.shape[0]):
        s, wi = scores[i][mask[i]], w[i][mask[i]]
        order = torch.argsort(s, stable=True)
        assert (torch.diff(wi[order]) >= -1e-12).all(), (s, wi)


@given(batches())
def test_gate_tau_one_only_suppresses_and_tau_zero_only_boosts(batch):
    scores, mask, _, beta = batch
    importance = normalized_importance(scores, mask)
    assert (importance >= 0).all() and (importance < 1).all()
    assert (threshold_gate(importance, tau=1.0, beta=beta)[mask] <= 1.0).all()
    assert (threshold_gate(importance, tau=0.0, beta=beta)[mask] >= 1.0).all()


# ------------------------------------------------------------------------------------------ the paper's ablations
ABLATION_CASE = torch.tensor([[0.0, math.exp(0.2) - 1, E - 1, 1e9]]), torch.tensor([[1, 1, 1, 0]])


def test_hand_computed_suppression_only():
    # I = [0, .2, 1]: below tau .4 suppressed (I / .4), at or above: 1 -> [0, .5, 1]; sum 1.5, |o| 3 -> [0, 1, 2]
    scores, mask = ABLATION_CASE
    adv = ADVANTAGE_SHAPERS.get("pgpo_suppression_only")(torch.tensor([2.0]), mask, scores=scores)
    torch.testing.assert_close(adv, 2.0 * torch.tensor([[0.0, 1.0, 2.0, 0.0]]), atol=1e-5, rtol=0)


def test_hand_computed_boosting_only():
    # I = [0, .2, 1]: below tau: 1, at or above boosted 1 + 2 (1 - .4) / .6 = 3 -> [1, 1, 3]; sum 5 -> x 3/5
    scores, mask = ABLATION_CASE
    adv = ADVANTAGE_SHAPERS.get("pgpo_boosting_only")(torch.tensor([1.0]), mask, scores=scores)
    torch.testing.assert_close(adv, torch.tensor([[0.6, 0.6, 1.8, 0.0]]), atol=1e-5, rtol=0)


def test_hand_computed_no_normalization():
    # the full gate [0, .5, 3] used as it is: the response's mean token advantage is no longer A
    scores, mask = ABLATION_CASE
    adv = ADVANTAGE_SHAPERS.get("pgpo_no_normalization")(torch.tensor([-1.0]), mask, scores=scores)
    torch.testing.assert_close(adv, -torch.tensor([[0.0, 0.5, 3.0, 0.0]]), atol=1e-5, rtol=0)
    # degenerate responses still fall back to weight 1
    flat = ADVANTAGE_SHAPERS.get("pgpo_no_normalization")(torch.tensor([1.0]), torch.ones(1, 3),
                                                           scores=torch.zeros(1, 3))
    torch.testing.assert_close(flat, torch.ones(1, 3))


@given(batches(allow_special=False))
def test_ablations_against_a_plain_loop(batch):
    """Each ablation equals a per-token Python computation of Eqs. 4-8 with its branch replaced (tau .4, beta 2)."""
    scores, mask, _, _ = batch
    for name, gate, normalize in (("pgpo", "both", True), ("pgpo_suppression_only", "suppress", True),
                                  ("pgpo_boosting_only", "boost", True), ("pgpo_no_normalization", "both", False)):
        got = ADVANTAGE_SHAPERS.get(name)(torch.ones(scores.shape[0], dtype=torch.float64), mask,
                                          scores=scores.double())
        for b in range(scores.shape[0]):
            valid = [math.log1p(min(max(float(s), 0.0), 1e4)) for s, m in zip(scores[b], mask[b]) if m]
            if not valid:
                continue
            lo, hi = min(valid), max(valid)
            ws = []
            for v in valid:
                i = (v - lo) / (hi - lo + 1e-6)
                low = i / (0.4 + 1e-6) if gate != "boost" else 1.0
                high = 1.0 + 2.0 * (i - 0.4) / (0.6 + 1e-6) if gate != "suppress" else 1.0
                ws.append(low if i < 0.4 else high)
            total = sum(ws)
            if total <= 1e-6:
                ws = [1.0] * len(ws)
            elif normalize:
                ws = [w * len(ws) / total for w in ws]
            want = torch.tensor(ws, dtype=torch.float64)
            torch.testing.assert_close(got[b][mask[b].bool()], want, atol=1e-6, rtol=1e-6)


def test_ablations_are_registered_and_run_the_text_only_pass():
    for name in ("pgpo_suppression_only", "pgpo_boosting_only", "pgpo_no_normalization"):
        assert name in ADVANTAGE_SHAPERS.names() and ADVANTAGE_SHAPERS.get(name).second_view == "text_only"
    with pytest.raises(ValueError, match="gate 'middle': valid: both, suppress, boost"):
        threshold_gate(torch.zeros(2), gate="middle")
