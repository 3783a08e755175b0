"""The learning-rate schedule: Megatron's OptimizerParamScheduler (what the trainer steps) against the hand formula
``schedule.learning_rate``, for every style, with and without warm-up, and set from a step as on resume."""
from __future__ import annotations

import pytest
import torch

from megatron_pgpo.config import load_config
from megatron_pgpo.trainer.schedule import build_scheduler, current_lr, learning_rate, set_step


class _Optimizer:
    """What the scheduler touches of a Megatron optimizer: its param groups (with Megatron's wd_mult)."""

    def __init__(self):
        self.param_groups = [{"params": [torch.zeros(1)], "wd_mult": 1.0}, {"params": [torch.zeros(1)], "wd_mult": 0.0}]


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_megatron_scheduler_follows_the_formula(style, warmup):
    t = load_config(None, [f"trainer.lr_schedule={style}", f"trainer.lr_warmup_steps={warmup}", "trainer.lr=1e-3",
                           "trainer.min_lr=1e-4", "trainer.total_steps=10", "trainer.weight_decay=0.1"]).trainer
    opt = _Optimizer()
    scheduler = build_scheduler(opt, t)
    seen = []
    for _ in range(12):
        seen.append(current_lr(opt))
        scheduler.step(1)
    assert seen == pytest.approx([learning_rate(t, s) for s in range(12)], rel=1e-12, abs=1e-15)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0  # no decay
    if warmup:
        assert seen[0] == 0.0 and seen[warmup] == pytest.approx(1e-3)
    if style == "constant":
        assert seen[warmup:] == pytest.approx([1e-3] * (12 - warmup))
    else:
        assert seen[10] == pytest.approx(1e-4) and seen[11] == pytest.approx(1e-4)  # min_lr from total_steps on
    set_step(scheduler, 5)  # a resume at step 5
    assert current_lr(opt) == pytest.approx(learning_rate(t, 5))


def test_hand_values():
    t = load_config(None, ["trainer.lr_schedule=cosine", "trainer.lr_warmup_steps=2", "trainer.lr=1.0",
                           "trainer.min_lr=0.0", "trainer.total_steps=6"]).trainer
    assert [learning_rate(t, s) for s in range(7)] == pytest.approx([0, 0.5, 1, 0.8535534, 0.5, 0.1464466, 0])
