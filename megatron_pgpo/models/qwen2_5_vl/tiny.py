"""Tiny Qwen2.5-VL architectures built from config alone: the CPU demo's model and the test fixtures.

Each preset keeps the real architecture (vision tower + merger, GQA or MHA, qkv bias, SwiGLU, 3-D MRoPE) at a
size that runs on two CPU cores, with ``head_dim = 32`` (vLLM's CPU attention needs >= 32) and a vocabulary of
1000 that Megatron pads (to 1024 at TP=1 and TP=2 with ``make_vocab_size_divisible_by = 128``).

=========  ======  =====  ==========  ======  ====  ============  =====
preset     layers  heads  KV heads    hidden  MLP   embeddings    vocab
=========  ======  =====  ==========  ======  ====  ============  =====
tiny       2       4      2 (GQA)     128     344   untied        1000
tiny-gqa   4       4      2 (GQA)     128     200   tied          1000
tiny-mha   2       4      4 (MHA)     128     344   tied          1000
=========  ======  =====  ==========  ======  ====  ============  =====
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

PRESETS: Dict[str, dict] = {
    "tiny": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=344, tie=False),
    "tiny-gqa": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=200,
                     tie=True),
    "tiny-mha": dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=344,
                     tie=True),
}

VOCAB_SIZE = 1000
# Special tokens at the top of the vocabulary, in Qwen's order.
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = VOCAB_SIZE - 1, VOCAB_SIZE - 2
VISION_START_TOKEN_ID, VISION_END_TOKEN_ID = VOCAB_SIZE - 4, VOCAB_SIZE - 3
BOS_TOKEN_ID = EOS_TOKEN_ID = VOCAB_SIZE - 5


def tiny_hf_config(preset: str = "tiny", vocab_size: int = VOCAB_SIZE):
    """``transformers.Qwen2_5_VLConfig`` of a preset (see the module table)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown tiny preset {preset!r}; valid: {', '.join(PRESETS)}")
    from ...compat.torchvision_ops import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import Qwen2_5_VLConfig

    p = dict(PRESETS[preset])
    tie = p.pop("tie")
    specials = dict(image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
                    vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3)
    text = dict(hidden_size=128, vocab_size=vocab_size, max_position_embeddings=2048, rms_norm_eps=1e-6,
                rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=1e6,
                bos_token_id=vocab_size - 5, eos_token_id=vocab_size - 5, tie_word_embeddings=tie, **p)
    vision = dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=128,
                  fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **specials)


def build_tiny_hf_model(preset: str = "tiny", seed: int = 0, vocab_size: int = VOCAB_SIZE):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (fp32, eval mode, eager attention)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = tiny_hf_config(preset, vocab_size)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Default init leaves the qkv biases and norms at trivial values; make every tensor carry information so a
    # wrong layout cannot pass a parity test by accident.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def save_tiny_checkpoint(path: Union[str, Path], preset: str = "tiny", seed: int = 0) -> Path:
    """Write a tiny random HF checkpoint (config.json + model.safetensors) to ``path``; returns it."""
    path = Path(path)
    build_tiny_hf_model(preset, seed).save_pretrained(path, safe_serialization=True)
    return path
