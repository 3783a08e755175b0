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

import pytest

from harness import WorkerPool


@pytest.fixture(scope="package")
def workers():
    """The ``WorkerPool`` of the distributed tests (started lazily on the first ``run``, shut down after the last
    distributed test, so idle workers do not compete with the rest of the suite for the 2 cores)."""
    pool = WorkerPool(world_size=int(os.environ.get("PGPO_DIST_WORLD", "2")))
    yield pool
    pool.shutdown()
