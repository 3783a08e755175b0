"""Fault injection for the fault tests and ``benchmarks/soak.py``: off unless ``MEGATRON_PGPO_FAULTS`` is set.

    MEGATRON_PGPO_FAULTS="nan_grad@3,kill_in_save@4,reward_hang@2,reward_crash@5,engine_kill@6,engine_kill_sync@7"

Each entry ``name@step`` fires at training step ``step`` (1-based: the step being trained, or saved), once per
process that reaches it. The faults are the real events, caused where they would happen:

====================  ===========================================================================================
``nan_grad``          every gradient of the step's first update is NaN (as after an overflow): the update is skipped
``kill_in_save``      rank 0 SIGKILLs itself after the model/optimizer files are written, before the checkpoint is
                      complete (the launcher then stops the other ranks)
``reward_hang``       the first response of the step makes its reward worker process hang (past
                      ``reward.timeout_s``; needs ``reward.num_workers`` > 0)
``reward_crash``      the first response of the step kills its reward worker process (twice: the sample is retried once)
``engine_kill``       the engine owners SIGKILL their vLLM engine-core processes just before the step's rollout
``engine_kill_sync``  the same just before the step's weight sync (the engine died after sampling)
====================  ===========================================================================================

Steps reach this module through ``set_step`` (the training loop calls it at the start of every step); the reward
faults reach the verifier's worker processes as a marker in the answer they are sent.
"""
from __future__ import annotations

import os
from typing import Dict, List

ENV = "MEGATRON_PGPO_FAULTS"
NAMES = ("nan_grad", "kill_in_save", "reward_hang", "reward_crash", "engine_kill", "engine_kill_sync")
#: what a reward worker finds at the start of a response text when a reward fault fires (never produced by a model:
#: it starts with a NUL character)
REWARD_MARKER = "\x00megatron-pgpo-fault:"

_step = 0
_fired: set = set()


def parse(spec: str) -> Dict[str, List[int]]:
    """``"nan_grad@3,kill_in_save@4"`` -> ``{"nan_grad": [3], "kill_in_save": [4]}``.

    Raises:
        ValueError: an unknown fault name or a malformed entry (the valid names are listed).
    """
    out: Dict[str, List[int]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, _, step = entry.partition("@")
        if name not in NAMES or not step.isdigit() or int(step) < 1:
            raise ValueError(f"{ENV}: bad entry {entry!r}: expected NAME@STEP with STEP >= 1 and NAME one of "
                             f"{', '.join(NAMES)}")
        out.setdefault(name, []).append(int(step))
    return out


def planned() -> Dict[str, List[int]]:
    return parse(os.environ.get(ENV, ""))


def set_step(step: int) -> None:
    """The training step now running (1-based)."""
    global _step
    _step = step


def fires(name: str) -> bool:
    """True once per process when fault ``name`` is planned for the current step."""
    if name not in NAMES:
        raise ValueError(f"unknown fault {name!r}: valid: {', '.join(NAMES)}")
    if ENV not in os.environ or (name, _step) in _fired or _step not in planned().get(name, []):
        return False
    _fired.add((name, _step))
    return True


def reward_fault_text(text: str) -> str:
    """``text`` ending in a boxed answer that carries the marker of a planned reward fault of this step (else
    unchanged): the answer no cheap rule decides, so it goes to a verifier worker process, which acts on it."""
    for name in ("reward_hang", "reward_crash"):
        if fires(name):
            return text + " \\boxed{" + REWARD_MARKER + name + "}"
    return text


def act_on_reward_marker(answer: str) -> None:
    """In a reward worker process (never in the trainer's): hang or die when ``answer`` carries a fault marker."""
    if not answer.startswith(REWARD_MARKER):
        return
    if answer[len(REWARD_MARKER):].startswith("reward_hang"):
        import time

        time.sleep(3600)
    os._exit(17)
