"""PAPO and VPPO (``algorithms/perception.py``) against hand-computed cases and plain per-token / per-response
Python loops, and the masked view's black patch against the real image processor."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_pgpo.algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, clipped_policy_loss, second_view
from megatron_pgpo.algorithms.perception import (black_patch_row, clamped_k3, mask_patches, top_fraction_mask,
                                                 trajectory_scales)


def test_black_patch_row_equals_the_processor_on_a_black_image(tmp_path):
    from PIL import Image

    import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim)
    from megatron_pgpo.models.qwen2_5_vl.tiny_tokenizer import save_tiny_processor
    from transformers import AutoImageProcessor

    save_tiny_processor(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixels = processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")["pixel_values"]
    row = black_patch_row(processor.image_mean, processor.image_std, pixels.shape[1])
    torch.testing.assert_close(pixels, row.expand_as(pixels).to(pixels.dtype), atol=1e-5, rtol=0)


def test_mask_patches():
    pv = torch.arange(40.0).reshape(10, 4)
    fill = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    assert torch.equal(mask_patches(pv, 0.0, torch.Generator().manual_seed(0), fill), pv)
    assert torch.equal(mask_patches(pv, 1.0, torch.Generator().manual_seed(0), fill), fill.expand(10, 4))
    a = mask_patches(pv, 0.5, torch.Generator().manual_seed(3), fill)
    b = mask_patches(pv, 0.5, torch.Generator().manual_seed(3), fill)
    assert torch.equal(a, b) and torch.equal(pv, torch.arange(40.0).reshape(10, 4))  # seeded, input untouched
    hit = (a == fill).all(dim=1)
    assert 0 < int(hit.sum()) < 10 and torch.equal(a[~hit], pv[~hit])
    with pytest.raises(ValueError, match="mask ratio"):
        mask_patches(pv, 1.5, torch.Generator(), fill)


def test_clamped_k3_hand_values_and_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    view = torch.tensor([[-1.0, -1.0, -30.0]])
    kl = clamped_k3(logp, view, -10.0, 10.0)
    d = torch.tensor([0.0, 1.0, -20.0])  # view - logp, clamped to [-20, 20]
    torch.testing.assert_close(kl, (torch.expm1(d) - d).clamp(-10, 10)[None])
    kl.sum().backward()  # d/dlogp of exp(d) - d - 1 with d = view - logp: 1 - exp(d); 0 where clamped
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1 - math.e, 0.0]]))


def test_papo_loss_is_clipped_minus_gamma_perception():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 5, generator=gen) * 2
    logp = (old + 0.1 * torch.randn(2, 5, generator=gen)).requires_grad_(True)
    view = old - torch.rand(2, 5, generator=gen)
    adv = torch.randn(2, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    loss, metrics = POLICY_LOSSES.get("papo")(logp, old, adv, mask, view_logp=view, perception_coef=0.02,
                                              entropy_penalty=0.03)
    base, _ = clipped_policy_loss(logp, old, adv, mask)
    kl = [math.expm1(float(v - l)) - float(v - l) for l, v, m in zip(logp.flatten(), view.flatten(), mask.flatten())
          if m]
    nll = [-float(l) for l, m in zip(logp.flatten(), mask.flatten()) if m]
    want = float(base) - 0.02 * sum(kl) / len(kl) + 0.03 * sum(nll) / len(nll)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(metrics["perception_kl"]) == pytest.approx(sum(kl) / len(kl), rel=1e-6)
    assert float(metrics["nll"]) == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    with pytest.raises(ValueError, match="needs view_logp"):
        POLICY_LOSSES.get("papo")(logp, old, adv, mask)


def test_top_fraction_mask_hand_case():
    scores = torch.tensor([[0.1, 5.0, 3.0, 3.0, 9.0], [2.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    # row 0: 4 valid, ceil(0.4 * 4) = 2 -> 5.0 and the earlier 3.0 (the padded 9.0 never); row 1: ceil(0.8) = 1
    assert top_fraction_mask(scores, mask, 0.4).tolist() == [[False, True, True, False, False],
                                                             [True, False, False, False, False]]


def test_trajectory_scales_hand_case():
    scores = torch.tensor([[1.0, 3.0], [0.0, 0.0], [4.0, 4.0]])
    mask = torch.ones(3, 2)
    # means 2, 0, 4 -> n = .5, 0, 1, mean(n) = .5 -> scale = .9 + .1 n / .5 = 1.0, 0.9, 1.1 (mean 1)
    torch.testing.assert_close(trajectory_scales(scores, mask, 0.9), torch.tensor([1.0, 0.9, 1.1], dtype=torch.float64))
    flat = trajectory_scales(torch.ones(3, 2), mask, 0.9)
    assert flat.tolist() == [1.0, 1.0, 1.0]  # no spread: no scaling


@st.composite
def batches(draw):
    b, t = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    scores = torch.tensor(draw(st.lists(st.lists(st.floats(0.0, 20.0), min_size=t, max_size=t), min_size=b,
                                        max_size=b)), dtype=torch.float64)
    lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    adv = torch.tensor(draw(st.lists(st.floats(-2.0, 2.0), min_size=b, max_size=b)), dtype=torch.float64)
    return adv, scores, mask


@given(batches())
def test_vppo_against_a_plain_loop(batch):
    adv, scores, mask = batch
    got = ADVANTAGE_SHAPERS.get("vppo")(adv, mask, scores=scores, vppo_top_fraction=0.4, vppo_beta_min=0.9)
    clean = [[min(float(s), 10.0) for s, m in zip(row, mrow) if m] for row, mrow in zip(scores, mask)]
    means = [sum(r) / len(r) for r in clean if r]
    scales = [1.0] * len(clean)
    if len(means) >= 2 and max(means) - min(means) > 1e-6:
        lo, hi = min(means), max(means)
        ns = [(sum(r) / len(r) - lo) / (hi - lo) if r else 0.0 for r in clean]
        mu = sum(n for n, r in zip(ns, clean) if r) / len(means)
        scales = [0.9 + 0.1 * n / (mu + 1e-8) if r else 1.0 for n, r in zip(ns, clean)]
    for b, row in enumerate(clean):
        k = math.ceil(len(row) * 0.4)
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        want = [adv[b].item() * scales[b] if j in ranked else 0.0 for j in range(len(row))]
        assert got[b][mask[b]].tolist() == pytest.approx(want, abs=1e-9)
        assert not got[b][~mask[b]].any()


def test_second_views():
    pgpo, vppo = ADVANTAGE_SHAPERS.get("pgpo"), ADVANTAGE_SHAPERS.get("vppo")
    papo, clipped, grpo = POLICY_LOSSES.get("papo"), POLICY_LOSSES.get("clipped"), ADVANTAGE_SHAPERS.get("grpo")
    assert second_view(grpo, clipped) is None and second_view(pgpo, clipped) == "text_only"
    assert second_view(grpo, papo) == second_view(vppo, clipped) == second_view(vppo, papo) == "masked_image"
    with pytest.raises(ValueError, match="different second views"):
        second_view(pgpo, papo)
