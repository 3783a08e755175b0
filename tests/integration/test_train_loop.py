"""The real training loop, end to end on CPU: `megatron-pgpo train` with 2 processes (TP=2), vLLM rollouts,
rewards, the scoring pass, PGPO updates, weight sync, checkpoints, resume and the HF export."""
import json
import os
import subprocess
import sys

import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from megatron_pgpo.demo_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo_ckpt") / "hf", task="colour")


def _train(run_dir, checkpoint, steps, *extra):
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "train", "examples/tiny_cpu.yaml",
           f"model.hf_path={checkpoint}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={steps}",
           "data.rollout_batch_size=4", "trainer.global_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=12",
           "trainer.micro_batch_size=4", "trainer.eval_every=0", "checkpoint.save_every=1", "reward.num_workers=1",
           "algorithm.dapo.dynamic_sampling=false", "logging.tensorboard=false", "logging.console=false", *extra]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_two_steps_then_resume_and_export(tmp_path, demo_checkpoint):
    run_dir = tmp_path / "run"
    records = _train(run_dir, demo_checkpoint, 2)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["response/length_mean"] > 0
        assert r["actor/skipped_updates"] == 0.0
        assert r["actor/grad_norm"] >= 0.0  # 0 when every group's rewards are equal (zero advantages)
        assert r["vd/score_mean"] >= 0.0 and r["time/sync"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    # Resume: the same command with more steps continues at step 3 from the checkpoint.
    records = _train(run_dir, demo_checkpoint, 3)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    # The HF export loads in transformers and has the trained (changed) weights.
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    exported = run_dir / "hf"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)
    before = load_file(str(demo_checkpoint / "model.safetensors"))
    after = {}
    for f in exported.glob("*.safetensors"):
        after.update(load_file(str(f)))
    assert set(before) == set(after)
    assert any(not (before[k] == after[k]).all() for k in before), "export equals the initial weights"
