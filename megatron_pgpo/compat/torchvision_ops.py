"""Make ``import torchvision`` succeed on a CPU torch whose matching torchvision build has unusable compiled ops.

Why: PyPI's torchvision wheels are CUDA-linked; next to torch 2.13.0+cpu their ``_C`` extension does not load,
and ``import torchvision`` then dies registering fake kernels for ``torchvision::nms`` ("operator
torchvision::nms does not exist"). transformers imports torchvision whenever it is installed (Qwen2.5-VL's
processors), and vLLM's Qwen2.5-VL module needs it. Qwen2.5-VL never calls nms, so declaring the two op schemas
that the import registers fake kernels for (no kernels) is enough. Nothing installed is edited.

``ensure_torchvision_importable()`` must run before the first ``import torchvision`` (or ``transformers`` model
import); it is cheap, idempotent, and does nothing when torchvision is absent or its ops load.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_STATE = {"done": False, "library": None, "shimmed": False}

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _compiled_ops_load(package_dir: str) -> bool:
    import torch

    for lib in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> bool:
    """Declare the torchvision op schemas if its compiled ops cannot load. Returns True if it shimmed."""
    if _STATE["done"]:
        return bool(_STATE["shimmed"])
    _STATE["done"] = True
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _compiled_ops_load(list(spec.submodule_search_locations)[0]):
        return False
    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _STATE.update(library=library, shimmed=True)  # keep the Library alive: dropping it removes the schemas
    return True
