"""Run Megatron-Core 0.16.1 on CPU with the gloo backend (tests, the tiny demo, the benchmarks).

Nothing happens at import. ``apply_cpu_patches()`` installs the patches below (idempotent); on a machine where
``torch.cuda.is_available()`` it does nothing unless ``force=True``. ``remove_cpu_patches()`` undoes them.
Every patch targets a private call site of megatron-core 0.16.1, so the installed version is asserted first
(``check_megatron_version``). What was measured with these patches is in ``docs/stack.md``.

Patches and why:

1. ``torch.cuda.current_device()`` returns ``"cpu"``. Megatron passes ``device=torch.cuda.current_device()``
   to ~175 allocations (layers, schedules, optimizer buffers); the string makes them CPU allocations.
2. CUDA RNG -> the CPU default generator. ``model_parallel_cuda_manual_seed`` and the RNG tracker's
   ``add()`` / ``fork()`` read and write the CUDA RNG state, through ``torch.cuda.get_rng_state``,
   ``torch.cuda.manual_seed``, ``torch.cuda.set_rng_state`` and the module-level helpers
   ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``. All are routed to
   ``torch.default_generator``, the generator CPU dropout and init actually draw from, so a forked
   "model-parallel" RNG stream really is a different stream on each TP rank. Consequences: seeding Megatron
   (``model_parallel_cuda_manual_seed(seed)``) re-seeds the CPU generator with ``seed``; and ``fork()``'s
   "CPU RNG state changed within GPU RNG context" warning would fire on every fork that draws random numbers,
   so a logging filter drops exactly that message.
3. ``torch.cuda.synchronize`` is a no-op (pipeline p2p and the dist-checkpoint writer call it).
4. ``CudaToCpuMode``, a ``torch.overrides.TorchFunctionMode`` pushed on the calling thread's mode stack:
   ``device="cuda"`` / ``"cuda:0"`` / ``torch.device("cuda")`` / an int device become ``"cpu"`` in every torch
   function that takes a ``device`` keyword (factories, ``*_like``, ``new_*``) and in ``Tensor.to(...)``;
   ``pin_memory=True`` becomes ``False``; ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor
   itself; ``Tensor.type()`` (no argument) reports ``"torch.cuda.FloatTensor"``-style names, because the
   distributed optimizer and ``clip_grads`` assert ``param.type() == 'torch.cuda.FloatTensor'``, and
   ``Tensor.type("torch.cuda.X")`` converts to the CPU ``torch.X``. The mode lives on the thread that called
   ``apply_cpu_patches``; code running Megatron in another thread wraps it in ``with CudaToCpuMode():``.

``init_cpu_distributed`` / ``set_model_parallel_layout`` are the few lines every CPU test and benchmark needs:
a gloo process group, the patches, and Megatron's parallel state for a (TP, PP) layout, re-initialised only
when the layout changes.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

#: The megatron-core release whose private call sites these patches target.
SUPPORTED_MEGATRON_CORE = "0.16.1"

_RNG_WARNING = "CPU RNG state changed within GPU RNG context"


def megatron_core_version() -> Optional[str]:
    """The installed megatron-core version string, or None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("megatron-core")
    except PackageNotFoundError:
        try:
            from megatron.core.package_info import __version__  # source checkouts without metadata

            return __version__
        except ImportError:
            return None


def check_megatron_version() -> None:
    """Raise ``RuntimeError`` unless megatron-core is exactly ``SUPPORTED_MEGATRON_CORE``."""
    found = megatron_core_version()
    if found != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            "megatron_pgpo.compat.megatron_cpu patches private call sites of "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE}, "
            f"but found megatron-core {found!r}. Install megatron-core=={SUPPORTED_MEGATRON_CORE} (setup.py extra "
            "'cpu') or re-verify every patch in this module against the new release."
        )


# ----------------------------------------------------------------------------------------------- patch 4: the mode
def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_name(name: str) -> str:
    """``'torch.FloatTensor'`` -> ``'torch.cuda.FloatTensor'`` (sparse and already-CUDA names unchanged)."""
    if name.startswith("torch.") and not name.startswith(("torch.cuda.", "torch.sparse.")):
        return "torch.cuda." + name[len("torch."):]
    return name


class CudaToCpuMode(TorchFunctionMode):
    """Torch-function mode that makes CUDA device requests CPU ones (patch 4 in the module docstring)."""

    def __torch_function__(self, func: Callable, types: Any, args: Tuple = (), kwargs: Optional[dict] = None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs.get("dtype"):
                return _cuda_type_name(func(*args, **kwargs))
            if len(args) > 1 and isinstance(args[1], str):
                args = (args[0], args[1].replace("torch.cuda.", "torch."), *args[2:])
            if isinstance(kwargs.get("dtype"), str):
                kwargs["dtype"] = kwargs["dtype"].replace("torch.cuda.", "torch.")
            return func(*args, **kwargs)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


# --------------------------------------------------------------------------------------- patches 1-3: functions
def _cpu_current_device() -> str:
    return "cpu"


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop_synchronize(device: Any = None) -> None:
    return None


class _DropForkRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RNG_WARNING not in record.getMessage()


# ------------------------------------------------------------------------------------------------ apply / remove
_PATCHED: List[Tuple[Any, str, Any]] = []  # (owner, attribute, original), in the order applied
_STATE: dict = {"mode": None, "log_filter": None}


def _set(owner: Any, name: str, value: Any) -> None:
    _PATCHED.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def cpu_patches_applied() -> bool:
    """Whether ``apply_cpu_patches`` is in effect in this process."""
    return bool(_PATCHED)


def apply_cpu_patches(force: bool = False) -> bool:
    """Install the CPU patches (see module docstring). Idempotent.

    Args:
        force: also patch when ``torch.cuda.is_available()`` (normally the call then does nothing).

    Returns:
        True when the patches are in effect after the call, False when skipped because CUDA is available.

    Raises:
        RuntimeError: megatron-core is not exactly ``SUPPORTED_MEGATRON_CORE``.
    """
    if _PATCHED:
        return True
    if torch.cuda.is_available() and not force:
        logging.getLogger(__name__).info("CUDA is available: CPU patches not applied (pass force=True to override)")
        return False
    check_megatron_version()
    from megatron.core.tensor_parallel import random as mcore_random

    _set(torch.cuda, "current_device", _cpu_current_device)
    for owner in (torch.cuda, torch.cuda.random):
        _set(owner, "get_rng_state", _cpu_get_rng_state)
        _set(owner, "set_rng_state", _cpu_set_rng_state)
        _set(owner, "manual_seed", _cpu_manual_seed)
    _set(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _set(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    _set(torch.cuda, "synchronize", _noop_synchronize)

    log_filter = _DropForkRngWarning()
    logging.getLogger(mcore_random.__name__).addFilter(log_filter)
    mode = CudaToCpuMode()
    mode.__enter__()
    _STATE.update(mode=mode, log_filter=log_filter)
    return True


def remove_cpu_patches() -> None:
    """Undo ``apply_cpu_patches`` (must run on the thread that applied them, with no mode pushed since)."""
    if not _PATCHED:
        return
    mode = _STATE["mode"]
    from torch.overrides import _get_current_function_mode

    if _get_current_function_mode() is not mode:
        raise RuntimeError("another TorchFunctionMode was pushed after apply_cpu_patches(); exit it first")
    mode.__exit__(None, None, None)
    from megatron.core.tensor_parallel import random as mcore_random

    logging.getLogger(mcore_random.__name__).removeFilter(_STATE["log_filter"])
    for owner, name, original in reversed(_PATCHED):
        setattr(owner, name, original)
    _PATCHED.clear()
    _STATE.update(mode=None, log_filter=None)


# ------------------------------------------------------------------------------------- process-group helpers
def set_model_parallel_layout(tp: int = 1, pp: int = 1, seed: Optional[int] = 1234, timeout_minutes: int = 2) -> bool:
    """(Re-)initialise Megatron's parallel state for ``tp`` x ``pp`` (data parallel = world / (tp * pp)).

    Does nothing when that layout is already current. Re-seeds Megatron's RNG tracker with
    ``model_parallel_cuda_manual_seed(seed)`` after a change (skip with ``seed=None``).
    Returns True when it re-initialised.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized() and (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
    ) == (tp, pp):
        return False
    destroy_megatron_groups()
    ps.initialize_model_parallel(tp, pp, distributed_timeout_minutes=timeout_minutes)
    if seed is not None:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return True


def destroy_megatron_groups() -> int:
    """``parallel_state.destroy_model_parallel()``, which forgets Megatron's process groups but (except the gloo
    data-parallel ones) leaves them registered with torch.distributed, so each gloo group keeps its threads (3 per
    group) and sockets: a process that switches layouts (the test workers, the planner) grew to 1,500 threads. This
    destroys every group Megatron's globals hold first (local to the process; not a collective). Returns how many."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    def groups(value):
        if isinstance(value, dist.ProcessGroup):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from groups(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from groups(item)

    world = dist.group.WORLD if dist.is_initialized() else None
    registered = dist.distributed_c10d._world.pg_map if dist.is_initialized() else {}
    found = {id(g): g for name, value in vars(ps).items() if name.startswith("_") for g in groups(value)}
    destroyed = 0
    for group in found.values():
        if group is not world and group in registered:
            dist.destroy_process_group(group)
            destroyed += 1
    ps.destroy_model_parallel()
    return destroyed


def init_cpu_distributed(
    rank: int,
    world_size: int,
    master_port: int,
    tp: int = 1,
    pp: int = 1,
    master_addr: str = "127.0.0.1",
    timeout_s: float = 120.0,
    seed: Optional[int] = 1234,
) -> None:
    """Gloo process group + CPU patches + Megatron parallel state, in one call per process.

    Args:
        rank, world_size: this process's place in the default group.
        master_port: a free TCP port on ``master_addr`` (the same on every rank).
        tp, pp: Megatron layout; data parallel is ``world_size / (tp * pp)``.
        timeout_s: collective timeout of the default group (a peer that died makes the others raise instead of
            hanging); Megatron's sub-groups get the same, rounded up to whole minutes.
        seed: passed to ``model_parallel_cuda_manual_seed`` (None: do not seed).
    """
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    apply_cpu_patches()
    set_model_parallel_layout(tp, pp, seed=seed, timeout_minutes=max(1, int(-(-timeout_s // 60))))
