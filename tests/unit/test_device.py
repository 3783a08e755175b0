"""A rank's device from its launcher: LOCAL_RANK with all GPUs visible, the one GPU bound to a task, or the CPU;
anything else refused with the numbers (pure function, so every case runs on CPU)."""
from __future__ import annotations

import pytest
import torch

from megatron_pgpo.parallel.device import (DeviceError, local_rank_from_env, local_world_size_from_env,
                                           resolve_device)


@pytest.mark.parametrize("choice, local_rank, cuda, visible, local_world, expected", [
    ("auto", 3, True, 8, 8, "cuda:3"),     # torchrun / srun --gpus-per-node=8: all GPUs visible
    ("auto", 3, True, 1, 8, "cuda:0"),     # srun --gpus-per-task=1: LOCAL_RANK 3 sees one GPU, cuda:0
    ("auto", 0, True, 1, None, "cuda:0"),  # a one-GPU machine
    ("auto", 5, False, 0, None, "cpu"),    # no CUDA: the CPU with gloo
    ("cpu", 2, True, 8, 8, "cpu"),         # forced CPU on a GPU machine
    ("cuda", 1, True, 2, 2, "cuda:1"),
])
def test_resolve_device(choice, local_rank, cuda, visible, local_world, expected):
    assert resolve_device(choice, local_rank, cuda, visible, local_world) == torch.device(expected)


def test_refusals_give_the_numbers():
    with pytest.raises(DeviceError, match="LOCAL_RANK=5 but this process sees only 4 GPUs"):
        resolve_device("auto", 5, True, 4)
    with pytest.raises(DeviceError, match="3 ranks on this node but only 2 GPUs"):
        resolve_device("auto", 0, True, 2, local_world_size=3)
    # our local spawn: every rank sees the same single GPU, which two NCCL ranks cannot share
    with pytest.raises(DeviceError, match="2 ranks on this node but only 1 GPUs"):
        resolve_device("auto", 1, True, 1, local_world_size=2, shared_visible=True)
    assert resolve_device("auto", 0, True, 1, local_world_size=1, shared_visible=True) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda", 0, False, 0)
    with pytest.raises(DeviceError, match="choose auto, cpu or cuda"):
        resolve_device("tpu", 0, False, 0)


def test_launcher_variables():
    assert local_rank_from_env({"LOCAL_RANK": "3", "SLURM_LOCALID": "1"}) == 3
    assert local_rank_from_env({"SLURM_LOCALID": "1"}) == 1
    assert local_rank_from_env({}, default=7) == 7
    assert local_world_size_from_env({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert local_world_size_from_env({"SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert local_world_size_from_env({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}) == 8
    assert local_world_size_from_env({"SLURM_TASKS_PER_NODE": "8,8"}) == 8
    assert local_world_size_from_env({"SLURM_TASKS_PER_NODE": "8,4"}) is None  # uneven nodes: unknown
    assert local_world_size_from_env({}) is None
