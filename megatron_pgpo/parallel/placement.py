"""Which GPUs each rollout engine runs on: those of the data-parallel replica that owns it, on the owner's node, and
never a GPU of another engine.

    plans = plan_engines(gpus_per_node=8, tp=2, pp=2, dp=2, rollout_tp=4)
    plans[1]   # EnginePlacement(replica=1, owner_rank=2, node=0, local_gpus=(2, 3, 6, 7))

One engine serves each DP replica; its owner is the replica's TP rank 0 of pipeline stage 0
(``weight_sync.is_engine_owner``), which starts it as a child process whose ``CUDA_VISIBLE_DEVICES`` names the
engine's GPUs (``visible_devices``). Without this every engine on a node landed on GPU 0 (vLLM's uniproc executor
uses ``cuda:0`` of what it sees) and the second one failed vLLM's free-memory check.

Rank layout: Megatron-Core's default order ``tp-cp-ep-dp-pp`` (``parallel_state.initialize_model_parallel``):
global rank = ``t + TP * (d + DP * p)`` for TP rank ``t``, DP replica ``d``, stage ``p``; a test checks this against
Megatron's own ``RankGenerator``. Launchers fill nodes in rank order (torchrun, srun's block distribution), so rank
``r`` is GPU ``r % gpus_per_node`` of node ``r // gpus_per_node``. A replica's stages may sit on other nodes (PP
outermost): its engine can only use the replica's GPUs on the owner's node, stage 0's first. Where tasks are bound
to one GPU each (``srun --gpus-per-task=1``) a process cannot reach any other GPU, so the engine gets the owner's.

Layouts that cannot host their engines are refused before any work, with the reason (``EnginePlacementError``).

The same pattern as NeMo-RL's vLLM generation (``nemo_rl/models/generation/vllm/vllm_generation.py``,
``_get_tied_worker_bundle_indices``: one node-local group of GPUs per DP replica, handed to each vLLM instance as
its ``CUDA_VISIBLE_DEVICES`` subset, e.g. ``"4,5"`` at TP 2), and the same mapping of a node-local index to an
entry of the parent's ``CUDA_VISIBLE_DEVICES`` as its ``numa_utils.resolve_visible_gpu_id``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


class EnginePlacementError(ValueError):
    """The parallel layout cannot give every engine its own GPUs; the message says why and what would work."""


def global_rank(t: int, d: int, p: int, tp: int, dp: int) -> int:
    """Global rank of TP rank ``t`` of DP replica ``d`` on stage ``p`` (Megatron's default ``tp-cp-ep-dp-pp``)."""
    return t + tp * (d + dp * p)


def replica_ranks(d: int, tp: int, pp: int, dp: int) -> List[int]:
    """The ranks holding DP replica ``d``: stage 0's TP ranks, then stage 1's, ..."""
    return [global_rank(t, d, p, tp, dp) for p in range(pp) for t in range(tp)]


@dataclass(frozen=True)
class EnginePlacement:
    """Where DP replica ``replica``'s engine runs: started by ``owner_rank`` on ``node``, on the node-local GPU
    indices ``local_gpus`` (the owner's own first)."""

    replica: int
    owner_rank: int
    node: int
    local_gpus: Tuple[int, ...]


def plan_engines(gpus_per_node: int, tp: int, pp: int, dp: int, rollout_tp: int,
                 one_gpu_per_task: bool = False) -> List[EnginePlacement]:
    """One ``EnginePlacement`` per DP replica; raises ``EnginePlacementError`` when a layout cannot host them.

    Args:
        gpus_per_node: training ranks (one GPU each) per node.
        tp, pp, dp: the training layout; ``rollout_tp``: each engine's tensor-parallel size.
        one_gpu_per_task: each rank's process sees only its own GPU (``--gpus-per-task=1``).
    """
    for name, value in (("GPUs per node", gpus_per_node), ("TP", tp), ("PP", pp), ("DP", dp),
                        ("rollout TP", rollout_tp)):
        if value < 1:
            raise EnginePlacementError(f"{name} must be >= 1, got {value}")
    layout = f"TP={tp}, PP={pp}, DP={dp}, {gpus_per_node} GPUs per node"
    if rollout_tp > tp * pp:
        raise EnginePlacementError(
            f"rollout TP={rollout_tp} needs more GPUs than one replica has ({layout}: TP x PP = {tp * pp}); each "
            f"engine runs on its own replica's GPUs: set parallel.rollout_tensor_parallel_size <= {tp * pp}")
    if one_gpu_per_task and rollout_tp > 1:
        raise EnginePlacementError(
            f"rollout TP={rollout_tp} but each task sees only its own GPU (one GPU bound per task), so an engine "
            "can use only its owner's GPU: set parallel.rollout_tensor_parallel_size=1, or launch with all of a "
            "node's GPUs visible to each task (srun --gpus-per-node, torchrun)")
    plans, used = [], set()
    for d in range(dp):
        ranks = replica_ranks(d, tp, pp, dp)
        owner = ranks[0]
        node = owner // gpus_per_node
        on_node = [r % gpus_per_node for r in ranks if r // gpus_per_node == node]
        if len(on_node) < rollout_tp:
            raise EnginePlacementError(
                f"replica {d}'s engine needs {rollout_tp} GPUs on its owner's node {node}, but only {len(on_node)} "
                f"of the replica's GPUs are there ({layout}; its other stages sit on other nodes): set "
                f"parallel.rollout_tensor_parallel_size <= {len(on_node)}")
        gpus = tuple(on_node[:rollout_tp])
        clash = used & {(node, g) for g in gpus}
        if clash:  # cannot happen with disjoint replicas; kept as the invariant the tests check
            raise EnginePlacementError(f"replica {d}'s engine would share GPUs {sorted(clash)} with another engine")
        used |= {(node, g) for g in gpus}
        plans.append(EnginePlacement(d, owner, node, gpus))
    return plans


def engine_visible_devices(tp: int, pp: int, dp: int, rollout_tp: int, replica: int,
                           ranks_per_node: Optional[int] = None) -> Optional[str]:
    """``CUDA_VISIBLE_DEVICES`` for DP replica ``replica``'s engine on this machine (None without CUDA); raises
    ``EnginePlacementError`` for a layout that cannot host its engines. One visible GPU means one GPU bound per
    task; ``ranks_per_node`` defaults to the visible GPU count."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    visible = torch.cuda.device_count()
    one = visible == 1
    plans = plan_engines(ranks_per_node or visible, tp, pp, dp, rollout_tp, one_gpu_per_task=one)
    return visible_devices(plans[replica].local_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), one)


def visible_devices(local_gpus: Sequence[int], parent_visible: Optional[str] = None,
                    one_gpu_per_task: bool = False) -> str:
    """``CUDA_VISIBLE_DEVICES`` for an engine on ``local_gpus``: the entries of the parent's own list when it has
    one (node-local indices are positions in it), else the indices themselves. With one GPU bound per task the
    parent's single entry is the owner's GPU."""
    entries = [e.strip() for e in parent_visible.split(",") if e.strip()] if parent_visible else None
    if one_gpu_per_task:
        return entries[0] if entries else "0"
    if entries is None:
        return ",".join(str(g) for g in local_gpus)
    missing = [g for g in local_gpus if g >= len(entries)]
    if missing:
        raise EnginePlacementError(f"GPUs {missing} of the engine are not in CUDA_VISIBLE_DEVICES={parent_visible!r}")
    return ",".join(entries[g] for g in local_gpus)
