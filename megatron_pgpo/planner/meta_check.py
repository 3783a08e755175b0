"""Build ranks' shards of a real layout on the meta device and compare them with the planner's formulas.

One process stands in for any rank of a TP x PP (x DP) job (docs/stack.md, "Megatron-Core shards without the
processes"): ``init_process_group("fake", store=FakeStore(), rank=R, world_size=TP*PP*DP)``, then
``parallel_state.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)`` and ``build_model`` under
``torch.device("meta")`` with ``use_cpu_initialization=True, perform_initialization=False`` (what
``build_model(init_weights=False)`` sets; ``pipeline_dtype`` is always set by ``to_transformer_config``). Nothing
is allocated: every parameter must come out on the meta device (checked).

Megatron's parallel state is process-global, so the builds run in a child process (the caller's process keeps no
fake group). Two isolation modes, both measured to give identical shards:

* ``reinit`` (default): one child builds every requested (stage, TP rank), tearing down with
  ``parallel_state.destroy_model_parallel()`` + ``destroy_process_group()`` and re-initialising as the next rank
  in between: imports once (~7 s of CPU), then ~0.1-4 s per shard; a 72B TP=8 PP=8 check takes ~15 s.
* ``process``: one fresh child per shard (~7 s each), for when a state leak is suspected.

The comparison is exact: each shard's tensor names, element counts and ``shared_embedding`` flags against
``model_size.stage_tensors``, and its total against the closed form ``stage_parameter_count`` (padding included).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .model_size import ModelShape, stage_parameter_count, stage_tensors

ISOLATION_MODES = ("reinit", "process")


@dataclass
class ShardCheck:
    """One rank's meta build against the formulas."""

    stage: int
    tp_rank: int
    built: int  # elements in the meta-device build
    predicted: int  # stage_parameter_count
    tensors_match: bool  # names, element counts and shared_embedding flags all equal stage_tensors
    first_difference: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.tensors_match and self.built == self.predicted


# ------------------------------------------------------------------------------------------------ child side
def _build_shards(requests: Sequence[dict]) -> List[dict]:
    """In THIS process: build each request's (stage, tp_rank) shards on the meta device; named tensors of each.

    A request: ``config``, ``tp``, ``pp``, ``dp``, ``shards`` [(stage, tp_rank)], ``dtype``,
    ``make_vocab_size_divisible_by``.
    """
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # private: torch is pinned

    from ..models.qwen2_5_vl.model import build_model
    from ..compat.megatron_cpu import apply_cpu_patches

    apply_cpu_patches(force=True)  # meta builds only: no CUDA call may allocate, on any machine
    from megatron.core import parallel_state as ps

    out = []
    for req in requests:
        tp, pp, dp = req["tp"], req["pp"], req["dp"]
        for stage, tp_rank in req["shards"]:
            rank = stage * tp * dp + tp_rank  # Megatron's default order tp-cp-ep-dp-pp, DP rank 0
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp * dp)
            try:
                ps.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
                where = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
                if where != (stage, tp_rank):
                    raise RuntimeError(f"rank {rank} became (stage, TP rank) {where}, expected {(stage, tp_rank)}")
                with torch.device("meta"):
                    model = build_model(req["config"], tp=tp, pp=pp, dtype=req["dtype"], init_weights=False,
                                        make_vocab_size_divisible_by=req["make_vocab_size_divisible_by"],
                                        first_stage_layers=req["first_stage_layers"],
                                        last_stage_layers=req["last_stage_layers"])
                off_meta = [n for n, p in model.named_parameters() if not p.is_meta]
                if off_meta:
                    raise RuntimeError(f"parameters allocated off the meta device: {off_meta[:3]}")
                out.append({"config": req["config"], "tp": tp, "pp": pp, "stage": stage, "tp_rank": tp_rank,
                            "tensors": [(n, p.numel(), bool(getattr(p, "shared_embedding", False)))
                                        for n, p in model.named_parameters()]})
                del model
            finally:
                ps.destroy_model_parallel()
                dist.destroy_process_group()
    return out


def _run_child(requests: List[dict], timeout_s: float) -> List[dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megatron_pgpo.planner.meta_check", json.dumps(requests)],
                          capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=str(Path(__file__).resolve().parents[2]))
    if proc.returncode != 0:
        raise RuntimeError(f"meta-device build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- parent side
def build_meta_shards(requests: Sequence[dict], isolation: str = "reinit", timeout_s: float = 600.0) -> List[dict]:
    """Meta-device builds of every request's shards (see ``_build_shards`` for a request's keys; ``dp`` defaults to
    1, ``dtype`` to bf16, ``make_vocab_size_divisible_by`` to 128): ``[{"config", "tp", "pp", "stage", "tp_rank",
    "tensors": [(name, numel, shared_embedding), ...]}]``, in one child (``reinit``) or one child per shard."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"unknown isolation {isolation!r}; valid: {', '.join(ISOLATION_MODES)}")
    defaults = dict(dp=1, dtype="bf16", make_vocab_size_divisible_by=128, first_stage_layers=None,
                    last_stage_layers=None)
    full = [{**defaults, **r, "config": str(r["config"]), "shards": [list(x) for x in r["shards"]]} for r in requests]
    if isolation == "reinit":
        return _run_child(full, timeout_s)
    return [built for r in full for shard in r["shards"]
            for built in _run_child([dict(r, shards=[shard])], timeout_s)]


def compare(shape: ModelShape, tp: int, pp: int, built: List[dict], make_vocab_size_divisible_by: int = 128,
            first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None) -> List[ShardCheck]:
    """Each meta build against ``stage_tensors`` / ``stage_parameter_count`` (of the same pipeline split)."""
    checks = []
    split = (first_stage_layers, last_stage_layers)
    for shard in built:
        stage = shard["stage"]
        expected = [(t.name, t.numel, t.shared_embedding)
                    for t in stage_tensors(shape, tp, pp, stage, make_vocab_size_divisible_by, *split)]
        got = [tuple(x) for x in shard["tensors"]]
        difference = None
        if got != expected:
            pairs = list(zip(got, expected))
            i = next((k for k, (a, b) in enumerate(pairs) if a != b), len(pairs))
            difference = (f"tensor {i}: built {got[i] if i < len(got) else None}, "
                          f"formula {expected[i] if i < len(expected) else None}")
        checks.append(ShardCheck(stage=stage, tp_rank=shard["tp_rank"], built=sum(n for _, n, _ in got),
                                 predicted=stage_parameter_count(shape, tp, pp, stage, make_vocab_size_divisible_by,
                                                                 *split),
                                 tensors_match=difference is None, first_difference=difference))
    return checks


def check_layout(config: str, shape: ModelShape, tp: int, pp: int, tp_ranks: Sequence[int] = (0,),
                 stages: Optional[Sequence[int]] = None, make_vocab_size_divisible_by: int = 128,
                 first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None,
                 **kwargs) -> List[ShardCheck]:
    """Build every stage (or ``stages``) at each of ``tp_ranks`` on the meta device and compare."""
    stages = range(pp) if stages is None else stages
    request = dict(config=config, tp=tp, pp=pp, shards=[(s, r) for s in stages for r in tp_ranks],
                   make_vocab_size_divisible_by=make_vocab_size_divisible_by, first_stage_layers=first_stage_layers,
                   last_stage_layers=last_stage_layers, **{k: kwargs.pop(k) for k in ("dp", "dtype") if k in kwargs})
    return compare(shape, tp, pp, build_meta_shards([request], **kwargs), make_vocab_size_divisible_by,
                   first_stage_layers, last_stage_layers)


if __name__ == "__main__":  # the child process
    print(json.dumps(_build_shards(json.loads(sys.argv[1]))))
