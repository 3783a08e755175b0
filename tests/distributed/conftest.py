"""Distributed tests: one session-wide pool of gloo worker processes (see ``harness.py``).

    def _my_case(seed):                      # module level, runs on every rank
        from megatron.core import parallel_state as ps
        ...
        return {"rank": ps.get_tensor_model_parallel_rank(), ...}

    def test_something(workers):
        per_rank = workers.run(_my_case, 0, tp=2, pp=1)

``$PGPO_DIST_WORLD`` sets the pool size (default 2); ``$PGPO_DIST_TIMEOUT`` the per-call timeout in seconds.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import WorkerPool


_HERE = Path(__file__).resolve().parent
_pools = []


@pytest.fixture(scope="session")
def workers():
    """The ``WorkerPool`` of the distributed tests: started lazily on the first ``run``, shut down as soon as the
    next test is not a distributed one (below), and restarted lazily if one comes later.

    (``scope="package"`` would not do it: this folder is not a Python package, so pytest falls back to the session,
    and the idle workers, whose gloo threads poll, took half of the 2 cores from the integration tests after them.)
    """
    pool = WorkerPool(world_size=int(os.environ.get("PGPO_DIST_WORLD", "2")))
    _pools.append(pool)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="session")
def single_worker():
    """A one-process pool (world size 1): the single-process side of a comparison with ``workers`` (e.g. a
    checkpoint resumed at DP=1, or a batch split over DP=2 against the same batch on one rank)."""
    pool = WorkerPool(world_size=1)
    _pools.append(pool)
    yield pool
    pool.shutdown()


@pytest.hookimpl(trylast=True)  # after pytest's own teardown, so module fixtures (engines) are finalised first
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or _HERE not in Path(str(nextitem.path)).resolve().parents:
        for pool in _pools:
            pool.shutdown()
