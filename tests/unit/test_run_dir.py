"""Checkpoint directories: atomic saves, a crash mid-save keeps the previous one, pruning, preemption signals;
metrics.jsonl truncation on resume."""
import json
import os
import signal

import pytest

from megatron_pgpo.trainer.metrics import MetricsLogger, read_metrics
from megatron_pgpo.trainer.run_dir import (PreemptionHandler, atomic_save, checkpoint_step, complete_checkpoints,
                                           latest_checkpoint)


def _write(value):
    def write(path):
        (path / "state.json").write_text(json.dumps({"value": value}))
    return write


def test_atomic_save_latest_and_pruning(tmp_path):
    run = str(tmp_path)
    assert latest_checkpoint(run) is None
    for step in (10, 20, 30):
        atomic_save(run, step, _write(step), keep_last=2)
    assert [checkpoint_step(p) for p in complete_checkpoints(run)] == [20, 30]
    assert json.loads((latest_checkpoint(run) / "state.json").read_text()) == {"value": 30}


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    run = str(tmp_path)
    atomic_save(run, 10, _write(10))

    def crashing(path):
        (path / "partial").write_text("half")
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        atomic_save(run, 20, crashing)
    assert checkpoint_step(latest_checkpoint(run)) == 10
    assert [checkpoint_step(p) for p in complete_checkpoints(run)] == [10]
    atomic_save(run, 30, _write(30))  # the next save removes the leftover
    assert not any(".tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoint_step(latest_checkpoint(run)) == 30


def test_latest_pointer_to_missing_dir_falls_back_to_highest_step(tmp_path):
    run = str(tmp_path)
    atomic_save(run, 5, _write(5))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099")
    assert checkpoint_step(latest_checkpoint(run)) == 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_sets_flag_and_restores(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler()
    os.kill(os.getpid(), sig)
    assert handler.requested == sig
    handler.restore()
    assert signal.getsignal(sig) is before


def test_metrics_jsonl_tensorboard_and_resume_truncation(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=True) as log:
        for step in range(1, 6):
            log.log(step, {"reward/mean": step / 10, "actor/loss": float("nan")})
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["reward/mean"] == 0.1 and records[0]["actor/loss"] is None
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    with MetricsLogger(str(tmp_path), tensorboard=False, resume_step=3) as log:
        log.log(4, {"reward/mean": 0.44})
    assert [(r["step"], r["reward/mean"]) for r in read_metrics(str(tmp_path))] == [
        (1, 0.1), (2, 0.2), (3, 0.3), (4, 0.44)]


def test_wandb_offline(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, wandb=True, wandb_mode="offline") as log:
        log.log(1, {"reward/mean": 0.5})
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline run directory missing"
