"""Start-up hook for the child processes megatron-pgpo starts (vLLM's engine core, its model inspection).

This directory is put first on ``PYTHONPATH`` by ``megatron_pgpo.compat.child_processes.install_child_hook``;
Python then imports this module at start-up. It installs a ``sys.meta_path`` finder that runs
``ensure_torchvision_importable()`` the moment something first imports ``torchvision``, so processes that never
touch torchvision pay nothing (not even ``import torch``). Afterwards it hands over to any other
``sitecustomize`` further down ``sys.path``, so an environment's own hook keeps working.

It also makes these children ignore SIGUSR1. Slurm delivers a job step's signals to every process of the step
(measured: ``srun`` forwarding, ``scancel --signal``), so the preemption warning meant for the training rank also
reaches vLLM's engine core and workers and the reward verifiers, and SIGUSR1's default action would kill them in
the middle of a rollout. The rank handles it (save at the end of the step, then shut its children down).
"""
import importlib.abc
import importlib.util
import os
import signal
import sys


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Runs the shim before the first ``import torchvision``, then steps aside (finds nothing itself)."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or self._busy:
            return None
        type(self)._busy = True
        try:
            sys.meta_path.remove(self)
            from megatron_pgpo.compat.torchvision_ops import ensure_torchvision_importable

            ensure_torchvision_importable()
        except Exception:  # never break the child's start-up; the import then fails as it would anyway
            pass
        finally:
            type(self)._busy = False
        return None


def _chain_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _TorchvisionShimFinder())
try:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows) or not the main thread
    pass
_chain_next_sitecustomize()
