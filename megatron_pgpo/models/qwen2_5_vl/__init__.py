"""Qwen2.5-VL on Megatron-Core: config mapping, layer specs, the model, the text-only pass and HF conversion.

Importing this package imports neither megatron nor transformers; it does make ``import torchvision`` safe on
CPU torch first (``compat.torchvision_ops``), because transformers' Qwen2.5-VL modules import torchvision.
"""
from ...compat.torchvision_ops import ensure_torchvision_importable

ensure_torchvision_importable()
