"""The learning-rate schedule: Megatron-Core's ``OptimizerParamScheduler``, stepped once per training step.

``trainer.lr_schedule`` (constant, linear or cosine) after ``trainer.lr_warmup_steps`` of linear warm-up from 0,
decaying to ``trainer.min_lr`` at ``trainer.total_steps``; all counted in training steps (one rollout batch and its
updates each), as verl steps its actor's scheduler once per ``update_actor`` call. Step ``s`` (0-based) trains at
``learning_rate(cfg, s)``: the warm-up starts at 0 on the first step, as Megatron-LM's (``lr_warmup_init`` 0) and
verl's warm-ups do. The scheduler also applies Megatron's per-group weight-decay multipliers (no decay on biases
and norms), as Megatron-LM's training does.

The scheduler's state is the step count alone, so a resumed run sets it from the checkpoint's step.
"""
from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine")


def learning_rate(t, step: int) -> float:
    """The schedule of ``t`` (a ``TrainerConfig``) at 0-based training step ``step``, by hand: what the tests
    compare the logged ``actor/lr`` with (Megatron's ``get_lr`` for these styles)."""
    warmup, total = t.lr_warmup_steps, max(t.total_steps, t.lr_warmup_steps + 1)
    if warmup > 0 and step <= warmup:
        return t.lr * step / warmup
    if t.lr_schedule == "constant":
        return t.lr
    if step > total:
        return t.min_lr
    ratio = (step - warmup) / (total - warmup)
    coeff = 1.0 - ratio if t.lr_schedule == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return t.min_lr + coeff * (t.lr - t.min_lr)


def build_scheduler(optimizer, t):
    """Megatron's scheduler for ``t`` (a ``TrainerConfig``) at training step 0 (``set_step`` moves it)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if t.lr_schedule not in DECAY_STYLES:
        raise ValueError(f"trainer.lr_schedule={t.lr_schedule!r}: valid: {', '.join(DECAY_STYLES)}")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.lr_warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_steps, lr_decay_steps=max(t.total_steps, t.lr_warmup_steps + 1),
        lr_decay_style=t.lr_schedule, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=max(t.total_steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return scheduler


def set_step(scheduler, step: int) -> None:
    """Put ``scheduler`` at training step ``step`` (a resume)."""
    scheduler.num_steps = 0
    scheduler.step(step)


def current_lr(optimizer) -> float:
    """The learning rate the optimizer uses now: its first parameter group's (Megatron's default group)."""
    return float(optimizer.param_groups[0]["lr"])
