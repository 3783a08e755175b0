"""Starting the ranks of a training run: under torchrun/srun (the environment names rank and world size) or,
locally, by spawning ``TP x PP x DP`` processes on this machine (CPU gloo or one GPU each).

Slurm: ``srun`` sets ``SLURM_PROCID`` / ``SLURM_NTASKS``; the sbatch templates (``slurm/rank_env.sh``) export
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from them, which is what this module
reads. A bare ``srun megatron-pgpo train ...`` (several tasks, no wrapper) gets the same mapping here instead of
every task spawning a run of its own.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Optional

import torch

from ..config import Config

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def datasets_for(cfg: Config):
    """(train, val, skipped): the built-in synthetic task, or local files with ``{reason: rows}`` skipped from the
    training files (``data/files.py``; logged per reason, reported in the run's summary)."""
    if cfg.data.train_path is None:
        from ..data.synthetic import SyntheticTask

        return (SyntheticTask(cfg.data.task, cfg.data.num_train_examples, cfg.trainer.seed, "train"),
                SyntheticTask(cfg.data.task, cfg.data.num_val_examples, cfg.trainer.seed, "val"), {})
    from ..data.files import load_examples

    from .prompts import PromptLength

    limits = dict(prompt_length=PromptLength(cfg.model.hf_path, cfg.data.prompt_template),
                  max_prompt_length=cfg.data.max_prompt_length, max_pixels=cfg.data.max_pixels,
                  min_pixels=cfg.data.min_pixels)
    train, skipped = load_examples(cfg.data.train_path, cfg.data.layout, **limits)
    if skipped.total:
        log.warning("skipped %d training rows: %s", skipped.total, dict(skipped.counts))
    val = load_examples(cfg.data.val_path, cfg.data.layout, **limits)[0] if cfg.data.val_path else None
    return train, val, dict(skipped.counts)


def check_supported(cfg: Config) -> None:
    """Refuse, before any process starts, options the config accepts but the training loop does not implement yet
    (silently training without them would be worse than stopping)."""
    from ..config import ConfigError

    problems = []
    if cfg.model.init_checkpoint is not None:
        problems.append("model.init_checkpoint (start from model.hf_path; a run resumes from its own checkpoints in "
                        "trainer.run_dir)")
    if problems:
        raise ConfigError("not supported by the training loop yet: " + "; ".join(problems))
    if cfg.model.hf_path is not None:  # the layout against the model, before any process starts
        from ..models.qwen2_5_vl.hf_config import (ModelConfigError, TextDims, load_hf_config,
                                                    validate_parallel_layout)

        p = cfg.parallel
        try:
            validate_parallel_layout(TextDims.from_hf(load_hf_config(cfg.model.hf_path)), p.tensor_model_parallel_size,
                                     p.pipeline_model_parallel_size, p.first_stage_layers, p.last_stage_layers)
        except ModelConfigError as exc:
            raise ConfigError(f"{exc} (model.hf_path={cfg.model.hf_path})") from None


class ResumeError(ValueError):
    """The run directory's checkpoints cannot be resumed by this run; the message says why and what to do."""


def check_resumable(cfg: Config, world: int) -> None:
    """Before any process starts: the checkpoint the run would resume from (``run_dir.resumable_checkpoint``) can
    be resumed at this layout (``checkpoint.resume_layout_problem``).

    Raises:
        ResumeError: it cannot (another TP/PP with the distributed optimizer, an unreadable trainer state), or
            every checkpoint of the run is damaged.
    """
    if not cfg.checkpoint.resume:
        return
    from .checkpoint import read_trainer_state, resume_layout_problem
    from .run_dir import resumable_checkpoint

    try:
        found = resumable_checkpoint(cfg.trainer.run_dir)
        if found is None:
            return
        p = cfg.parallel
        problem = resume_layout_problem(read_trainer_state(found).get("layout"), p.tensor_model_parallel_size,
                                        p.pipeline_model_parallel_size, world)
    except (ValueError, RuntimeError) as exc:
        raise ResumeError(str(exc)) from None
    if problem:
        raise ResumeError(f"cannot resume {found}: {problem}")


def init_rank(cfg: Config, rank: int, world_size: int, master_addr: str, master_port: int,
              local_rank: Optional[int] = None, local_world_size: Optional[int] = None,
              shared_visible: bool = False) -> torch.device:
    """Bind the rank's device, start the process group and Megatron's parallel state; returns the device.

    On a GPU: ``torch.cuda.set_device`` first (``parallel/device.py``: LOCAL_RANK with all GPUs visible, or the one
    GPU bound to the task), then a ``cpu:gloo,cuda:nccl`` group (verl's Megatron worker does the same), so CUDA
    tensors go through NCCL and CPU control tensors through gloo. On the CPU: gloo and the Megatron CPU patches.
    Every group gets ``parallel.distributed_timeout_minutes``.
    """
    import torch.distributed as dist

    from ..compat.known_warnings import silence_known_warnings

    silence_known_warnings()  # before Megatron's modules are imported: some warn at import time
    from ..compat.child_processes import install_child_hook
    from ..compat.megatron_cpu import apply_cpu_patches, set_model_parallel_layout
    from ..parallel.device import bind

    # Before any child process starts: children ignore SIGUSR1, the rank's preemption signal, which Slurm delivers
    # to every process of the step (see compat/site_hook/sitecustomize.py).
    install_child_hook()
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    binding = bind(cfg.parallel.device, rank if local_rank is None else local_rank, local_world_size,
                   shared_visible=shared_visible)
    if binding.on_cuda:  # refuse a layout that cannot host its engines before any process group or model exists
        from ..parallel.placement import engine_visible_devices

        p = cfg.parallel
        engine_visible_devices(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                               p.data_parallel_size(world_size), p.rollout_tensor_parallel_size, 0, local_world_size)
    timeout_min = cfg.parallel.distributed_timeout_minutes
    if not dist.is_initialized():
        dist.init_process_group(binding.backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_min))
    if not binding.on_cuda:
        apply_cpu_patches(force=True)  # force: parallel.device=cpu on a machine that has a GPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    cfg.parallel.data_parallel_size(world_size)  # clear error if TP x PP does not divide the world
    set_model_parallel_layout(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                              seed=cfg.trainer.seed, timeout_minutes=timeout_min)
    return binding.device


def _terminate_with_parent() -> None:
    """Linux: deliver SIGTERM to this rank when the process that spawned it dies. Without it, killing the launcher
    (Ctrl-C twice, ``kill``) leaves the ranks and their vLLM engines running; with it they save a checkpoint and
    exit, as on a preemption signal."""
    import signal

    _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG (not Linux/glibc: nothing to do)


def rank_main(rank: int, cfg: Config, world_size: int, master_port: int, result_queue=None) -> None:
    """One rank: init, train, export, report (rank 0 puts a summary on ``result_queue``)."""
    import torch.distributed as dist

    from ..parallel import collectives
    from .loop import Trainer

    _terminate_with_parent()

    device = init_rank(cfg, rank, world_size, "127.0.0.1", master_port, local_rank=rank, local_world_size=world_size,
                       shared_visible=True)
    train, val, skipped = datasets_for(cfg)
    trainer = Trainer(cfg, train, val, device=device)
    try:
        before = trainer.evaluate().get("eval/accuracy") if trainer.step == 0 and cfg.trainer.eval_every else None
        last = trainer.run()
        # The loop's own evaluation of the final step, if it ran one, is the "after" number (no second pass).
        # After a preemption signal the grace time is for the checkpoint: no evaluation, no export.
        after = (last.get("eval/accuracy") if trainer.preempted or "eval/accuracy" in last
                 else trainer.evaluate().get("eval/accuracy"))
        export = None
        if cfg.checkpoint.export_hf and not trainer.preempted:
            export = trainer.export_hf(trainer.run_dir / "hf")
        if rank == 0 and result_queue is not None:
            result_queue.put({"accuracy_before": before, "accuracy_after": after, "last": last,
                              "export": str(export) if export else None, "step": trainer.step,
                              "skipped_rows": skipped})
    finally:
        trainer.close()
        collectives.barrier()
        dist.destroy_process_group()


def adopt_slurm_step_environment(env=os.environ) -> bool:
    """Inside a multi-task ``srun`` step without RANK/WORLD_SIZE: set them (and LOCAL_RANK, MASTER_ADDR/PORT as
    ``slurm/common.sh`` does) from Slurm's task variables. A batch script has SLURM_PROCID too, but no
    SLURM_STEP_ID, so it is left alone (there a local launch is what is meant). Returns whether it set them."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "RANK" in env or "SLURM_STEP_ID" not in env or tasks < 2:
        return False
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    if "MASTER_ADDR" not in env:
        import subprocess

        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True, timeout=30).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            first = nodes.split(",")[0]
            if "[" in first:
                raise RuntimeError(f"cannot find the first host of {nodes!r} (scontrol failed): export MASTER_ADDR "
                                   "or launch through slurm/rank_env.sh") from None
        env["MASTER_ADDR"] = first
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    return True


def launch(cfg: Config, nproc: Optional[int] = None) -> dict:
    """Run training on this machine: under torchrun/srun if their environment is set, else spawn ``nproc``
    processes (default TP x PP). Returns rank 0's summary (local spawn), or this rank's ``preempted`` / ``step``
    (torchrun/srun; rank 0 also writes them to ``$PGPO_STATUS_FILE`` when set, for the sbatch templates)."""
    check_supported(cfg)
    adopt_slurm_step_environment()
    if int(os.environ.get("RANK", "0")) == 0:
        check_resumable(cfg, int(os.environ.get("WORLD_SIZE", nproc or cfg.parallel.model_parallel_size)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from .loop import Trainer

        from ..parallel.device import local_rank_from_env, local_world_size_from_env

        device = init_rank(cfg, rank, world, os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500")),
                           local_rank_from_env(default=rank), local_world_size_from_env())
        train, val, skipped = datasets_for(cfg)
        trainer = Trainer(cfg, train, val, device=device)
        try:
            trainer.run()
            if cfg.checkpoint.export_hf and not trainer.preempted:  # preempted: the grace time is for the save
                trainer.export_hf(trainer.run_dir / "hf")
        finally:
            trainer.close()
        status_file = os.environ.get("PGPO_STATUS_FILE")  # set by slurm/common.sh: requeue or not
        if status_file and rank == 0:
            with open(status_file, "w") as f:
                f.write(f"{'preempted' if trainer.preempted else 'finished'} {trainer.step}\n")
        if skipped and rank == 0:
            log.warning("this run skipped %d training rows: %s", sum(skipped.values()), skipped)
        return {"preempted": trainer.preempted, "step": trainer.step, "skipped_rows": skipped}
    import torch.multiprocessing as mp

    world = nproc or cfg.parallel.model_parallel_size
    cfg.parallel.data_parallel_size(world)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    become_subreaper()
    before = set(_children(os.getpid()))  # the caller's own children are not ours to remove
    context = mp.start_processes(rank_main, args=(cfg, world, free_port(), queue), nprocs=world, join=False,
                                 start_method="spawn")
    try:
        # A rank that dies (an OOM kill, a crash) makes join() stop the others: SIGTERM, then SIGKILL after the
        # grace period. A surviving rank cannot save without the dead one (collectives), so the grace is short.
        while not context.join(grace_period=RANK_GRACE_S):
            pass
    finally:
        kill_orphans(keep=before)
    return queue.get() if not queue.empty() else {}


#: seconds join() gives the surviving ranks after one died, before SIGTERM and again before SIGKILL
RANK_GRACE_S = 5.0


def _prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; False where it failed or there is no glibc."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux/glibc
        return False


def become_subreaper() -> bool:
    """Linux ``PR_SET_CHILD_SUBREAPER``: descendants orphaned by a dying rank (its vLLM engine core and workers,
    its reward verifiers) become this process's children instead of init's, so ``kill_orphans`` finds them."""
    return _prctl(36, 1)


def kill_orphans(keep=(), rounds: int = 20) -> None:
    """SIGKILL the children this (subreaper) launcher still has once the ranks are gone, but ``keep`` (those it had
    before) and multiprocessing's resource tracker: what a killed rank left behind (measured: a vLLM engine core
    outlived its SIGKILLed rank for minutes, holding its memory), and their children as they are handed up."""
    import multiprocessing.resource_tracker as tracker
    import signal
    import time

    keep = set(keep) | {getattr(getattr(tracker, "_resource_tracker", None), "_pid", None)}
    for _ in range(rounds):
        children = [pid for pid in _children(os.getpid()) if pid not in keep]
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError, PermissionError):
                pass
        time.sleep(0.05)  # their own children are reparented to us next


def _children(parent: int) -> list:
    """Live (not zombie) child pids of ``parent`` from /proc (empty where there is no /proc)."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            out.append(int(entry))
    return out
