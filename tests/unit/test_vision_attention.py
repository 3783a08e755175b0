"""The vision tower's attention choices and recompute give eager attention's numbers: features and gradients of
images that exercise both the windowed blocks and the full-attention block (fp32, CPU), and ``auto`` resolves to
what is available."""
from __future__ import annotations

import pytest
import torch

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim before transformers)


def _tower(attention: str, recompute: bool):
    """The tower exactly as the Megatron model builds it (``_build_vision_tower``), seeded."""
    from types import SimpleNamespace

    from megatron_pgpo.models.qwen2_5_vl.model import Qwen2_5_VLMegatronModel
    from megatron_pgpo.models.qwen2_5_vl.tiny import tiny_hf_config

    torch.manual_seed(0)
    owner = SimpleNamespace(hf_config=tiny_hf_config("tiny"), config=SimpleNamespace(params_dtype=torch.float32))
    return Qwen2_5_VLMegatronModel._build_vision_tower(owner, None, attention, recompute).train()


def _features_and_grads(attention: str, recompute: bool):
    tower = _tower(attention, recompute)
    assert tower.config._attn_implementation == attention and tower.is_gradient_checkpointing == recompute
    gen = torch.Generator().manual_seed(1)
    # two images of different sizes, 16 x 24 and 8 x 8 patches: the tiny tower has windows of 16 patches in one
    # block and full attention in the other
    grid = torch.tensor([[1, 16, 24], [1, 8, 8]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 1176, generator=gen, requires_grad=True)
    out = tower(pixels, grid_thw=grid)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    (features * torch.randn(features.shape, generator=gen)).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in tower.parameters()] + [pixels.grad.reshape(-1)])
    return features.detach(), grads


@pytest.mark.parametrize("attention, recompute", [("sdpa", False), ("eager", True), ("sdpa", True)])
def test_attention_and_recompute_match_eager(attention, recompute):
    ref_features, ref_grads = _features_and_grads("eager", False)
    features, grads = _features_and_grads(attention, recompute)
    # fp32: sdpa and eager reduce in different orders (measured max |diff| ~1e-6 on features of O(1))
    torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_auto_resolves_to_what_is_available():
    import importlib.util

    from megatron_pgpo.models.qwen2_5_vl.model import resolve_vision_attention

    assert resolve_vision_attention("auto", torch.device("cpu")) == "sdpa"
    assert resolve_vision_attention("eager") == "eager"
    flash = importlib.util.find_spec("flash_attn") is not None
    assert resolve_vision_attention("auto", torch.device("cuda", 0)) == ("flash_attention_2" if flash else "sdpa")
    if not flash:
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            resolve_vision_attention("flash_attention_2")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_vision_attention("xformers")
