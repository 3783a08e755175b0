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


def _two_checkpoints(tmp_path):
    run = str(tmp_path)
    for step in (1, 2):
        def write(path, step=step):
            (path / "model_optim").mkdir()
            (path / "model_optim" / "shard.distcp").write_bytes(bytes(range(256)) * (100 + step))
            (path / "trainer_state.json").write_text(json.dumps({"step": step}))
        atomic_save(run, step, write)
    return run


def test_a_truncated_newest_checkpoint_is_passed_over_with_a_warning_naming_the_file(tmp_path, caplog):
    from megatron_pgpo.trainer.run_dir import resumable_checkpoint

    run = _two_checkpoints(tmp_path)
    assert checkpoint_step(resumable_checkpoint(run)) == 2  # both intact
    shard = tmp_path / "checkpoints" / "step_00000002" / "model_optim" / "shard.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        assert checkpoint_step(resumable_checkpoint(run)) == 1
    assert "step_00000002 is damaged" in caplog.text and "shard.distcp has 1000 bytes" in caplog.text
    assert "resuming from step_00000001 instead" in caplog.text


def test_an_altered_small_file_fails_its_checksum_and_every_damaged_checkpoint_is_an_error(tmp_path):
    from megatron_pgpo.trainer.run_dir import checkpoint_problem, resumable_checkpoint

    run = _two_checkpoints(tmp_path)
    for step in (1, 2):  # same size, one byte changed
        state = tmp_path / "checkpoints" / f"step_{step:08d}" / "trainer_state.json"
        state.write_text(state.read_text().replace(str(step), "7"))
        assert "trainer_state.json does not match its saved CRC-32" in checkpoint_problem(state.parent)
    (tmp_path / "checkpoints" / "step_00000001" / "model_optim" / "shard.distcp").unlink()
    with pytest.raises(RuntimeError, match="every checkpoint .* is damaged") as err:
        resumable_checkpoint(run)
    assert "shard.distcp is missing" in str(err.value) and "checkpoint.resume=false" in str(err.value)


def test_a_checkpoint_without_a_manifest_is_taken_as_it_is(tmp_path):
    from megatron_pgpo.trainer.run_dir import resumable_checkpoint

    run = _two_checkpoints(tmp_path)
    (tmp_path / "checkpoints" / "step_00000002" / "manifest.json").unlink()
    assert checkpoint_step(resumable_checkpoint(run)) == 2


def test_resume_layouts_any_dp_the_same_tp_pp_with_the_distributed_optimizer():
    from megatron_pgpo.trainer.checkpoint import resume_layout_problem

    saved = {"world": 8, "tp": 2, "pp": 2, "dp": 2, "distributed_optimizer": True}
    assert resume_layout_problem(saved, 2, 2, 16) is None  # DP 2 -> 4
    assert resume_layout_problem(saved, 2, 2, 4) is None  # DP 2 -> 1
    problem = resume_layout_problem(saved, 4, 2, 16)
    assert "saved at TP=2 PP=2" in problem and "this run is TP=4 PP=2" in problem and "mcore-to-hf" in problem
    assert resume_layout_problem(dict(saved, distributed_optimizer=False), 4, 1, 4) is None
    assert resume_layout_problem(None, 4, 1, 4) is None


def test_an_earlier_format_or_missing_trainer_state_is_a_clear_error(tmp_path):
    from megatron_pgpo.trainer.checkpoint import read_trainer_state

    (tmp_path / "trainer_state_rank00000.pt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="earlier megatron-pgpo .* convert mcore-to-hf"):
        read_trainer_state(tmp_path)
    with pytest.raises(ValueError, match="trainer_state.json is missing"):
        read_trainer_state(tmp_path / "elsewhere")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_rank_state_file_cannot_run_code_when_loaded(tmp_path):
    import torch

    from megatron_pgpo.trainer.checkpoint import read_rank_state

    path, marker = tmp_path / "rng_rank00000.pt", tmp_path / "ran"
    torch.save({"rng": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="rng_rank00000.pt is unreadable"):
        read_rank_state(path)
    assert not marker.exists()
    torch.save({"rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}, "adam_steps": [2.0, None]}, path)
    assert read_rank_state(path)["adam_steps"] == [2.0, None]
