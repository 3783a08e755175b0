"""Persistent gloo worker processes for distributed tests (one pool per pytest session).

``WorkerPool(world_size=2)`` spawns ``world_size`` processes once (``torch.multiprocessing`` "spawn"); each runs
``torch.distributed.init_process_group("gloo")`` on a free localhost port and applies
``megatron_pgpo.compat.megatron_cpu.apply_cpu_patches()``. Then

    results = pool.run(fn, *args, tp=2, pp=1)     # one result per rank, rank order

(re)initialises Megatron's ``parallel_state`` when the (tp, pp) layout differs from the current one (data parallel
is ``world_size / (tp * pp)``; the RNG tracker is re-seeded with 1234 after a change), calls ``fn(*args)`` on
every rank and returns what each returned.

Writing a worker function:

* It must be a module-level function (it travels as module name + qualname + source file, so functions in test
  modules work; the worker imports the module by file if its name is not importable there).
* Get groups and ranks from ``megatron.core.parallel_state`` (or ``torch.distributed``).
* Build inputs inside the function from small arguments (seeds, sizes): arguments and results are pickled
  through a pipe. Return tensors, numbers, dicts -- anything picklable; ``.detach()`` tensors that need grad.

Failure handling: an exception in ``fn`` is re-raised in the parent as ``WorkerError`` carrying every failing
rank's remote traceback. Every receive has a timeout (the pool's ``timeout_s``, default 60 s or
``$PGPO_DIST_TIMEOUT``, plus 30 s; ``run(..., timeout_s=...)`` for a slow call), and a dead worker is noticed
within 0.2 s: the test fails with ``WorkerCrashed`` / ``WorkerTimeout`` naming the rank, and the pool restarts on
the next ``run``. The pool is also restarted when the ranks fail differently (one rank raised while another was
waiting in a collective, which then times out: gloo's collective timeout is the pool's ``timeout_s``, rounded up
to whole minutes for Megatron's groups). Workers exit on ``shutdown()``, at interpreter exit, or when their
parent dies.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import inspect
import os
import pickle
import socket
import sys
import time
import traceback
from typing import Any, Callable, List, Optional, Tuple

DEFAULT_TIMEOUT_S = float(os.environ.get("PGPO_DIST_TIMEOUT", "60"))
_START_TIMEOUT_S = 180.0


class WorkerError(RuntimeError):
    """``fn`` raised on at least one rank; the message holds each failing rank's remote traceback."""


class WorkerCrashed(RuntimeError):
    """A worker process died (segfault, ``os._exit``, OOM kill...)."""


class WorkerTimeout(RuntimeError):
    """A worker did not answer within the timeout (deadlock, mismatched collectives)."""


def free_port() -> int:
    """A TCP port that was free on localhost a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------- worker side
def _resolve(module_name: str, qualname: str, path: Optional[str]) -> Callable:
    module = sys.modules.get(module_name)
    if module is None or (path and os.path.abspath(getattr(module, "__file__", "") or "") != path):
        try:
            module = importlib.import_module(module_name)
            if path and os.path.abspath(module.__file__ or "") != path:
                raise ImportError(f"{module_name} resolves to {module.__file__}, not {path}")
        except ImportError:
            if not path:
                raise
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(rank: int, world_size: int, port: int, conn: Any, timeout_s: float, threads: int) -> None:
    """Entry point of one worker: init, then serve ``("run", ...)`` requests until ``("exit",)``."""
    import torch

    torch.set_num_threads(threads)
    parent = os.getppid()
    try:
        from megatron_pgpo.compat.megatron_cpu import init_cpu_distributed, set_model_parallel_layout

        init_cpu_distributed(rank, world_size, port, tp=1, pp=1, timeout_s=timeout_s)
        conn.send_bytes(pickle.dumps(("ready",)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", "init", traceback.format_exc())))
        return
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # orphaned: the test session is gone
                break
            continue
        try:
            request = pickle.loads(conn.recv_bytes())
        except EOFError:
            break
        if request[0] == "exit":
            break
        _, module_name, qualname, path, args, tp, pp = request
        try:
            set_model_parallel_layout(tp, pp)
            fn = _resolve(module_name, qualname, path)
            reply = pickle.dumps(("ok", fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            reply = pickle.dumps(("error", type(exc).__name__, traceback.format_exc()))
        conn.send_bytes(reply)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------- parent side
class WorkerPool:
    """``world_size`` persistent gloo workers; see the module docstring."""

    def __init__(self, world_size: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S, threads: Optional[int] = None):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.threads = threads or max(1, (os.cpu_count() or 1) // world_size)
        self._procs: List[Any] = []
        self._conns: List[Any] = []
        atexit.register(self.shutdown)

    @property
    def started(self) -> bool:
        return bool(self._procs)

    def start(self) -> None:
        """Spawn the workers and wait until each has joined the gloo group (no-op if running)."""
        if self._procs:
            return
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent_conn, child_conn = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, port, child_conn, self.timeout_s, self.threads),
                name=f"pgpo-dist-worker-{rank}",
            )
            proc.start()
            child_conn.close()
            self._procs.append(proc)
            self._conns.append(parent_conn)
        deadline = time.monotonic() + _START_TIMEOUT_S
        replies = [self._recv(rank, deadline, "starting") for rank in range(self.world_size)]
        failed = [(r, msg) for r, msg in enumerate(replies) if msg[0] != "ready"]
        if failed:
            self.shutdown()
            details = "\n".join(f"--- rank {r} ---\n{msg[-1]}" for r, msg in failed)
            raise WorkerError(f"worker start-up failed:\n{details}")

    def run(self, fn: Callable, *args: Any, tp: int = 1, pp: int = 1, timeout_s: Optional[float] = None) -> List[Any]:
        """Call ``fn(*args)`` on every rank under the ``tp`` x ``pp`` Megatron layout; per-rank results."""
        if self.world_size % (tp * pp):
            raise ValueError(f"tp * pp = {tp * pp} does not divide world size {self.world_size}")
        qualname = getattr(fn, "__qualname__", "")
        if "<" in qualname:
            raise ValueError(f"{qualname}: worker functions must be module-level (no lambdas or local functions)")
        path = inspect.getsourcefile(fn)
        request = pickle.dumps(("run", fn.__module__, qualname, path and os.path.abspath(path), args, tp, pp))
        self.start()
        what = f"running {fn.__module__}.{qualname} (tp={tp}, pp={pp})"
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(request)
            except (BrokenPipeError, ConnectionError, OSError):
                code = self._procs[rank].exitcode
                self.shutdown()
                raise WorkerCrashed(f"worker rank {rank} is gone (exit code {code}) before {what}; pool will restart")
        deadline = time.monotonic() + (timeout_s or self.timeout_s) + 30.0  # let gloo's own timeout fire first
        replies = [self._recv(rank, deadline, what) for rank in range(self.world_size)]
        errors = [(rank, msg) for rank, msg in enumerate(replies) if msg[0] != "ok"]
        if errors:
            if len(errors) < self.world_size or len({msg[1] for _, msg in errors}) > 1:
                self.shutdown()  # ranks diverged (one may have timed out in a collective): start fresh next time
            details = "\n".join(f"--- rank {rank}: {msg[1]} ---\n{msg[2]}" for rank, msg in errors)
            raise WorkerError(f"{what} failed on rank(s) {[r for r, _ in errors]}:\n{details}")
        return [msg[1] for msg in replies]

    def _recv(self, rank: int, deadline: float, what: str) -> Tuple:
        conn, proc = self._conns[rank], self._procs[rank]
        while True:
            try:
                if conn.poll(0.2):
                    return pickle.loads(conn.recv_bytes())
            except (EOFError, ConnectionError, OSError):
                time.sleep(0.2)  # the pipe broke: the process is dying, report it below
            if not proc.is_alive() or conn.closed:
                proc.join(1.0)
                code = proc.exitcode
                self.shutdown()
                raise WorkerCrashed(f"worker rank {rank} died (exit code {code}) while {what}; pool will restart")
            if time.monotonic() > deadline:
                self.shutdown()
                raise WorkerTimeout(f"worker rank {rank} gave no answer in time while {what}; pool will restart")

    def shutdown(self) -> None:
        """Ask the workers to exit, then terminate / kill any that do not (idempotent)."""
        procs, conns = self._procs, self._conns
        self._procs, self._conns = [], []
        for conn in conns:
            try:
                conn.send_bytes(pickle.dumps(("exit",)))
            except Exception:
                pass
        deadline = time.monotonic() + 10.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in conns:
            conn.close()
