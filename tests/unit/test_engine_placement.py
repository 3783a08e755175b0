"""Engine placement: every DP replica's engine on GPUs of its own replica, on its owner's node, no GPU shared;
layouts that cannot host their engines refused with the reason. Checked on the example layouts (8 GPUs per node,
TP 1/2/4/8, PP 1/2/4, rollout TP up to TP x PP) and against Megatron's own rank generator."""
from __future__ import annotations

import itertools

import pytest

from megatron_pgpo.parallel.placement import (EnginePlacementError, plan_engines, replica_ranks,
                                              visible_devices)

GPUS = 8
LAYOUTS = [(tp, pp, dp) for tp, pp, dp in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4)) if tp * pp * dp <= 64]


@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 2), (8, 4, 2), (1, 4, 4), (4, 1, 4)])
def test_replica_ranks_are_megatrons_model_parallel_groups(tp, pp, dp):
    from megatron.core.parallel_state import RankGenerator

    groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("tp-pp")
    ours = [replica_ranks(d, tp, pp, dp) for d in range(dp)]
    assert sorted(map(sorted, ours)) == sorted(map(sorted, groups))
    # the owner (our replica's first rank) is TP rank 0 of stage 0: the first rank of Megatron's pp group
    pp_groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp").get_ranks("pp")
    assert {r[0] for r in ours} <= {g[0] for g in pp_groups}


@pytest.mark.parametrize("tp, pp, dp", LAYOUTS)
def test_every_engine_fits_or_the_layout_is_refused_with_the_reason(tp, pp, dp):
    for rollout_tp in (r for r in (1, 2, 4, 8, 16, 32) if r <= tp * pp):
        try:
            plans = plan_engines(GPUS, tp, pp, dp, rollout_tp)
        except EnginePlacementError as exc:
            # refused only when the owner's node holds fewer of the replica's GPUs than the engine needs
            replicas = [replica_ranks(d, tp, pp, dp) for d in range(dp)]
            on_node = min(sum(1 for r in ranks if r // GPUS == ranks[0] // GPUS) for ranks in replicas)
            assert on_node < rollout_tp, (tp, pp, dp, rollout_tp, str(exc))
            assert "rollout_tensor_parallel_size <=" in str(exc)
            continue
        assert len(plans) == dp
        seen = set()
        for plan in plans:
            ranks = replica_ranks(plan.replica, tp, pp, dp)
            assert plan.owner_rank == ranks[0]
            assert len(plan.local_gpus) == rollout_tp
            assert plan.local_gpus[0] == plan.owner_rank % GPUS  # the owner's own GPU first
            own = {(r // GPUS, r % GPUS) for r in ranks}
            for g in plan.local_gpus:
                assert (plan.node, g) in own  # a GPU of its own replica, on the owner's node
                assert (plan.node, g) not in seen  # never another engine's
                seen.add((plan.node, g))


def test_hand_computed_layouts():
    # 7B recipe, 2 nodes: TP=4, PP=1, DP=4: two engines per node on disjoint halves
    plans = plan_engines(8, tp=4, pp=1, dp=4, rollout_tp=4)
    assert [(p.node, p.local_gpus) for p in plans] == [(0, (0, 1, 2, 3)), (0, (4, 5, 6, 7)),
                                                        (1, (0, 1, 2, 3)), (1, (4, 5, 6, 7))]
    # one node, TP=2, PP=2, DP=2: a replica spans ranks 0,1 (stage 0) and 4,5 (stage 1)
    assert plan_engines(8, 2, 2, 2, 4)[1].local_gpus == (2, 3, 6, 7)
    # 72B recipe TP=8, PP=4: stage 0 fills a node; the engine can use that node only
    assert plan_engines(8, 8, 4, 2, 8)[1].local_gpus == tuple(range(8))
    with pytest.raises(EnginePlacementError, match="only 8 of the replica's GPUs are there"):
        plan_engines(8, 8, 4, 2, 16)


def test_refusals_name_the_setting():
    with pytest.raises(EnginePlacementError, match="TP x PP = 2"):
        plan_engines(8, 2, 1, 4, 4)
    with pytest.raises(EnginePlacementError, match="one GPU bound per task"):
        plan_engines(8, 2, 1, 4, 2, one_gpu_per_task=True)
    assert plan_engines(8, 2, 1, 4, 1, one_gpu_per_task=True)[3].local_gpus == (6,)
    with pytest.raises(EnginePlacementError, match="must be >= 1"):
        plan_engines(0, 1, 1, 1, 1)


def test_visible_devices():
    assert visible_devices((2, 3)) == "2,3"
    assert visible_devices((0, 1), parent_visible="4,5,6,7") == "4,5"  # node-local index -> the parent's entries
    assert visible_devices((0,), parent_visible="GPU-aa,GPU-bb") == "GPU-aa"
    assert visible_devices((3,), parent_visible="5", one_gpu_per_task=True) == "5"
    with pytest.raises(EnginePlacementError, match="not in CUDA_VISIBLE_DEVICES"):
        visible_devices((2,), parent_visible="0,1")


@pytest.mark.parametrize("name, gpus", [("qwen2_5_vl_3b_pgpo", 8), ("qwen2_5_vl_7b_pgpo", 16),
                                        ("qwen2_5_vl_32b_pgpo", 16), ("qwen2_5_vl_72b_pgpo", 64)])
def test_example_configs_host_their_engines(name, gpus):
    from pathlib import Path

    from megatron_pgpo.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "examples" / f"{name}.yaml"), [])
    p = cfg.parallel
    dp = p.data_parallel_size(gpus)
    plans = plan_engines(GPUS, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, dp,
                         p.rollout_tensor_parallel_size)
    assert len(plans) == dp and all(len(pl.local_gpus) == p.rollout_tensor_parallel_size for pl in plans)
