"""Save and resume a training run: model and optimizer as a Megatron distributed checkpoint (torch_dist, loadable
at another TP/PP for the model; DP-reshardable for the optimizer), plus trainer state (step, data position, RNG).

Three measured fixes for Megatron-Core 0.16.1 with torch Adam (no Apex/TE), see docs/stack.md: the optimizer is saved
with ``distrib_optim_sharding_type='dp_reshardable'``; ``load_state_dict`` runs under ``no_grad``; and after a
load every parameter gets its own Adam ``step`` tensor (the load shares one, which Adam would then increment once
per parameter, corrupting the bias correction).

Directory layout inside a checkpoint (see ``run_dir.py`` for the atomic rename around it)::

    step_00000050/
      model_optim/          Megatron dist checkpoint (model + optimizer), with config.json, megatron_pgpo.json and
                            the tokenizer/processor files, so `megatron-pgpo convert mcore-to-hf` exports it
      trainer_state.pt      per-rank: step, data position, python/numpy/torch RNG states (one file per rank)
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import torch

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rng_state() -> Dict[str, Any]:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def sharded_state(policy, is_loading: bool) -> dict:
    """Model + optimizer sharded state dict of a ``MegatronPolicy``."""
    model_sd = policy.module.sharded_state_dict()
    optim_sd = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return {"model": model_sd, "optimizer": optim_sd}


def save_training_state(policy, directory: Path, trainer_state: Dict[str, Any]) -> None:
    """Collective: every rank calls it with the same ``directory`` (which must exist)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from ..parallel import collectives

    target = Path(directory) / "model_optim"
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    collectives.barrier()
    _init_fresh_adam_state(policy.optimizer)
    dist_checkpointing.save(sharded_state(policy, is_loading=False), str(target))
    if dist.get_rank() == 0:
        write_export_metadata(policy, target)
    state = dict(trainer_state, rng=_rng_state(), adam_steps=_adam_steps(policy.optimizer))
    torch.save(state, Path(directory) / f"trainer_state_rank{dist.get_rank():05d}.pt")


def write_export_metadata(policy, target: Path) -> None:
    """What ``megatron-pgpo convert mcore-to-hf`` needs beside the tensors: the HF config, the layout metadata and
    the tokenizer / processor files of the run's HF checkpoint (so any training checkpoint exports to HF)."""
    from ..models.qwen2_5_vl.convert import HF_FILES_DIR, _copy_side_files, write_checkpoint_metadata
    from ..models.qwen2_5_vl.hf_config import load_hf_config

    model_cfg = policy.cfg.model
    if model_cfg.hf_path is None:  # a policy built without an HF checkpoint (tests): nothing to describe it by
        return
    hf_dir = Path(model_cfg.hf_path)
    write_checkpoint_metadata(target, load_hf_config(str(hf_dir)), source=str(hf_dir.resolve()),
                              transformer_impl=model_cfg.transformer_impl,
                              make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by,
                              padded_vocab_size=policy.module.padded_vocab_size,
                              config_json=(hf_dir / "config.json").read_text())
    _copy_side_files([hf_dir], target / HF_FILES_DIR)


def load_training_state(policy, directory: Path) -> Dict[str, Any]:
    """Collective: restores model, optimizer and this rank's RNG; returns the saved trainer state."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    _init_fresh_adam_state(policy.optimizer)  # the load needs the state's shapes, and so does the save
    loaded = dist_checkpointing.load(sharded_state(policy, is_loading=True), str(Path(directory) / "model_optim"))
    policy.module.load_state_dict(loaded["model"], strict=False)
    with torch.no_grad():
        policy.optimizer.load_state_dict(loaded["optimizer"])
    state = torch.load(Path(directory) / f"trainer_state_rank{dist.get_rank():05d}.pt", weights_only=False)
    _unshare_adam_steps(policy.optimizer, state.pop("adam_steps", None))
    _set_rng_state(state.pop("rng"))
    return state


def _inner_optimizers(optimizer) -> list:
    """``(Megatron optimizer, its torch optimizer or None)`` for each part of a (possibly chained) optimizer, in
    a fixed order (the saved Adam step counts are matched to them by position)."""
    return [(opt, getattr(opt, "optimizer", None)) for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _init_fresh_adam_state(optimizer) -> None:
    """Before its first step torch Adam has no state, and Megatron's ``state_dict`` (without Apex/TE) asserts that
    every parameter's ``step`` is the same value (``distrib_optimizer.py``: ``assert len(steps) == 1``), so a save
    before any update (e.g. when dynamic sampling dropped every group so far) failed, and a load into a fresh
    optimizer has nothing to load into. Create exactly the state Adam's first step would create (step 0, zero
    moments): no weight moves (unlike Megatron's dummy zero-gradient step, whose weight decay does), and the next
    step proceeds as if the state had been created lazily."""
    for _, torch_opt in _inner_optimizers(optimizer):
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state[param]
                if state:
                    continue
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _adam_steps(optimizer) -> list:
    """The Adam step count of each inner torch optimizer (None where it has no state or is not torch Adam)."""
    out = []
    for _, torch_opt in _inner_optimizers(optimizer):
        steps = ({float(st["step"]) for st in torch_opt.state.values() if "step" in st}
                 if isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)) else set())
        out.append(steps.pop() if len(steps) == 1 else None)
    return out


def _unshare_adam_steps(optimizer, saved_steps=None) -> None:
    """Give every parameter its own Adam ``step`` tensor (see the module docstring), set to the count saved with
    the checkpoint when there is one: Megatron's load does not restore the step of a checkpoint taken before the
    first update (measured: it kept the step of the state it loaded into), which would skew the next bias
    correction."""
    for k, (_, torch_opt) in enumerate(_inner_optimizers(optimizer)):
        if torch_opt is None:
            continue
        saved = saved_steps[k] if saved_steps is not None and k < len(saved_steps) else None
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state.get(param)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(state["step"] if saved is None else saved))
