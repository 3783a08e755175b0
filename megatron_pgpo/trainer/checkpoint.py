"""Save and resume a training run: model and optimizer as a Megatron distributed checkpoint (torch_dist), plus the
trainer state (step, data position, layout, Adam step) and each rank's RNG states.

Three measured fixes for Megatron-Core 0.16.1 with torch Adam (no Apex/TE), see docs/stack.md: the optimizer is saved
with ``distrib_optim_sharding_type='dp_reshardable'``; ``load_state_dict`` runs under ``no_grad``; and after a
load every parameter gets its own Adam ``step`` tensor (the load shares one, which Adam would then increment once
per parameter, corrupting the bias correction).

What a checkpoint resumes at (``resume_layout_problem``): the same TP and PP at any DP size (the distributed
optimizer's ``dp_reshardable`` format reshards across DP only; without the distributed optimizer the optimizer state
is per parameter and any TP/PP/DP works). RNG states come back when the layout is the same; after a layout change
each rank keeps the seed it started with (sampling seeds derive from ``trainer.seed`` and the step anyway). A
different TP/PP with the distributed optimizer is refused before any process starts.

Directory layout inside a checkpoint (see ``run_dir.py`` for the atomic rename and the manifest around it)::

    step_00000050/
      model_optim/          Megatron dist checkpoint (model + optimizer), with config.json, megatron_pgpo.json and
                            the tokenizer/processor files, so `megatron-pgpo convert mcore-to-hf` exports it
      trainer_state.json    step, data position, layout (world, TP, PP, DP, distributed optimizer), Adam step
      rng_rank00000.pt      per rank: python/numpy/torch (and CUDA, Megatron RNG tracker) states, tensors and
                            plain types only (loaded with ``weights_only=True``: a checkpoint from elsewhere
                            cannot run code)
      manifest.json         every file's size (and small files' CRC-32)
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import faults

log = logging.getLogger(__name__)

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
STATE_FILE = "trainer_state.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def _rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain Python types (safe for ``weights_only`` loading)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _rng_tracker()
    if tracker is not None and tracker.get_states():  # Megatron's model-parallel RNG streams (dropout on TP ranks)
        state["megatron_tracker"] = dict(tracker.get_states())
    return state


def _rng_tracker():
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker
    except ImportError:  # pragma: no cover - Megatron is a dependency of training
        return None
    return get_cuda_rng_tracker()


def _set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _rng_tracker()
    if "megatron_tracker" in state and tracker is not None:
        tracker.set_states(state["megatron_tracker"])


def current_layout(policy) -> Dict[str, Any]:
    """This run's layout as ``trainer_state.json`` records it (from Megatron's parallel state)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
            "distributed_optimizer": bool(policy.cfg.parallel.use_distributed_optimizer)}


def read_trainer_state(directory: Path) -> Dict[str, Any]:
    """The checkpoint's ``trainer_state.json``.

    Raises:
        ValueError: it is missing or unreadable, naming the file (a checkpoint written before this format keeps
            ``trainer_state_rank*.pt`` files, which only load with pickle: see the message).
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        if any(Path(directory).glob("trainer_state_rank*.pt")):
            raise ValueError(f"{directory} was written by an earlier megatron-pgpo (trainer_state_rank*.pt, which "
                             "only loads with pickle, so it is not loaded). Export its weights with `megatron-pgpo "
                             f"convert mcore-to-hf {directory} OUT` and start a new run from OUT (model.hf_path).")
        raise ValueError(f"{path} is missing: not a complete megatron-pgpo checkpoint")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is unreadable: {exc}") from exc


def read_rank_state(path: Path) -> Dict[str, Any]:
    """A rank's ``rng_rank*.pt``, loaded with ``weights_only=True`` (tensors and plain types: a file from elsewhere
    cannot run code on the rank).

    Raises:
        ValueError: it does not load, naming the file.
    """
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unpickling error of any kind: name the file
        raise ValueError(f"{path} is unreadable: {type(exc).__name__}: {str(exc)[:300]}") from exc


def resume_layout_problem(saved: Dict[str, Any], tp: int, pp: int, world: int) -> Optional[str]:
    """Why a checkpoint saved at layout ``saved`` (``trainer_state.json``'s ``layout``) cannot resume at TP=``tp``,
    PP=``pp`` on ``world`` ranks, or None when it can (any DP size; any TP/PP without the distributed optimizer)."""
    if not saved or not saved.get("distributed_optimizer", True):
        return None
    if (saved["tp"], saved["pp"]) != (tp, pp):
        return (f"it was saved at TP={saved['tp']} PP={saved['pp']} (DP={saved['dp']}) with the distributed "
                f"optimizer, whose optimizer state reshards across DP only; this run is TP={tp} PP={pp} "
                f"(DP={world // (tp * pp)}). Resume at TP={saved['tp']} PP={saved['pp']} (any DP), or export the "
                "weights (`megatron-pgpo convert mcore-to-hf`) and start a new run from them (fresh optimizer)")
    return None


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
    if dist.get_rank() == 0 and faults.fires("kill_in_save"):  # fault injection (faults.py): a crash mid-save
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    steps = _adam_steps(policy.optimizer)
    if dist.get_rank() == 0:
        write_export_metadata(policy, target)
        state = dict(trainer_state, layout=current_layout(policy), adam_steps=steps)
        (Path(directory) / STATE_FILE).write_text(json.dumps(state, indent=1))
    torch.save({"rng": _rng_state(), "adam_steps": steps}, Path(directory) / rng_file(dist.get_rank()))


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
    """Collective: restores model, optimizer and (same layout) this rank's RNG; returns the saved trainer state.

    Raises:
        ValueError: the layout cannot resume this checkpoint (``resume_layout_problem``), or a file of it is
            missing or unreadable (named).
        RuntimeError: the checkpoint does not fill every parameter of the model (the missing names are listed).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    state = read_trainer_state(directory)
    saved, layout = state.pop("layout", None), current_layout(policy)
    problem = resume_layout_problem(saved, layout["tp"], layout["pp"], layout["world"])
    if problem:
        raise ValueError(f"cannot resume {directory}: {problem}")
    _init_fresh_adam_state(policy.optimizer)  # the load needs the state's shapes, and so does the save
    loaded = dist_checkpointing.load(sharded_state(policy, is_loading=True), str(directory / "model_optim"))
    result = policy.module.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]  # TE's fp8 metadata is optional
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{directory / 'model_optim'} does not match the model: missing {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                           f"{' ...' if len(unexpected) > 8 else ''} (was it saved from another model config?)")
    with torch.no_grad():
        policy.optimizer.load_state_dict(loaded["optimizer"])
    same_layout = saved is None or saved == layout
    rank_path = directory / rng_file(dist.get_rank())
    if same_layout and rank_path.is_file():
        per_rank = read_rank_state(rank_path)
        _unshare_adam_steps(policy.optimizer, per_rank.get("adam_steps"))
        _set_rng_state(per_rank["rng"])
    else:
        if dist.get_rank() == 0:
            log.warning("resuming %s, saved at %s, now at %s: RNG states are not restored (each rank keeps the "
                        "seed it started with)", directory.name, saved, layout)
        counts = [c for c in (state.get("adam_steps") or []) if c is not None]  # rank 0's: every step is global
        _unshare_adam_steps(policy.optimizer, uniform=max(counts) if counts else None)
    state.pop("adam_steps", None)
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


def _unshare_adam_steps(optimizer, saved_steps=None, uniform: Optional[float] = None) -> None:
    """Give every parameter its own Adam ``step`` tensor (see the module docstring), set to the count saved with
    the checkpoint when there is one: Megatron's load does not restore the step of a checkpoint taken before the
    first update (measured: it kept the step of the state it loaded into), which would skew the next bias
    correction. ``uniform``: one count for every inner optimizer instead (a resume at another layout, where the
    inner optimizers need not match the saved ones by position)."""
    for k, (_, torch_opt) in enumerate(_inner_optimizers(optimizer)):
        if torch_opt is None:
            continue
        saved = saved_steps[k] if saved_steps is not None and k < len(saved_steps) else uniform
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state.get(param)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(state["step"] if saved is None else saved))
