"""Make the project's own child processes start with the torchvision shim (see ``site_hook/sitecustomize.py``).

vLLM starts Python children we do not control the entry point of: the model-architecture inspection
(``python -m vllm.model_executor.models.registry``) and, in multiprocess mode, the engine core. Both import
Qwen2.5-VL's module, hence torchvision, before any of our code runs there. ``install_child_hook()`` prepends
the hook directory to ``PYTHONPATH`` in this process's environment, which every child inherits; nothing
installed is edited. The hook itself is lazy (it acts on the first ``import torchvision`` only).
"""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site_hook")


def install_child_hook(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Prepend the hook directory to ``env['PYTHONPATH']`` (default ``os.environ``); idempotent."""
    env = os.environ if env is None else env
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if HOOK_DIR not in parts:
        env["PYTHONPATH"] = os.pathsep.join([HOOK_DIR, *parts])
