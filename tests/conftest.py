"""Test-suite wiring: the ``gpu`` marker skips without CUDA; hypothesis profile sized for 2-core CI."""
from __future__ import annotations

import os

import pytest

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
except ImportError:  # hypothesis is in the `test` extra; the GPU machine may lack it
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (run by tools/gpu_check.sh)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU machine")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
