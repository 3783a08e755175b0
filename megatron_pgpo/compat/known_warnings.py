"""Start-up warnings that every rank prints and that say nothing about the run: silenced in the ranks so that a
real warning is not lost among them (``init_rank`` installs the filters).

Each entry is (category, message regex, why it is expected). Anything not listed here still prints.
"""
from __future__ import annotations

import warnings

KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed",
     "CPU ranks (and GPU ranks of the local spec) use Megatron's torch fallbacks on purpose"),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm",
     "same: the local spec's norms are torch's"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                  r"CUDA_DEVICE_MAX_CONNECTIONS",
     "a CUDA stream hint; printed on CPU too"),
    (UserWarning, r"full scope is deprecated",
     "Megatron-Core 0.16.1 warns about its own default cuda_graph_scope"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     "called inside Megatron-Core's distributed optimizer, not by this package"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "Megatron-Core's distributed optimizer zero_grad (optimizer.py, _zero_grad_group_helper) reads .grad of its "
     "fp32 shards, which with fp32 parameters are views into the parameter buffer and never hold a .grad"),
)


def silence_known_warnings() -> None:
    """Install an ignore filter for each ``KNOWN_WARNINGS`` entry (idempotent: ``warnings`` dedups equal filters)."""
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
