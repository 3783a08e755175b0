"""The real training loop, end to end on CPU: `megatron-pgpo train` with 2 processes (TP=2 with sequence
parallelism, PP=2, DP=2), vLLM rollouts, rewards, the scoring pass, PGPO updates, weight sync, checkpoints, kill -9
and resume, the HF export, and the per-step plumbing invariants the loop logs as ``check/*``."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo_ckpt") / "hf", task="colour")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_cmd(run_dir, checkpoint, steps, *extra, nproc=None):
    return [sys.executable, "-m", "megatron_pgpo.cli", "train", "examples/tiny_cpu.yaml",
           f"model.hf_path={checkpoint}", f"trainer.run_dir={run_dir}", f"trainer.total_steps={steps}",
           "data.rollout_batch_size=4", "trainer.global_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=12",
           "trainer.micro_batch_size=4", "trainer.eval_every=0", "checkpoint.save_every=1", "reward.num_workers=1",
           "algorithm.dapo.dynamic_sampling=false", "logging.tensorboard=false", "logging.console=false", *extra,
            *(["--nproc", str(nproc)] if nproc else [])]


def _train(run_dir, checkpoint, steps, *extra, nproc=None):
    proc = subprocess.run(_train_cmd(run_dir, checkpoint, steps, *extra, nproc=nproc), cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: The TP=2 runs use sequence parallelism (the PP=2 / DP=2 runs below do not): both code paths run the real loop.
#: They also warm up and decay the learning rate (Megatron's scheduler, set from the step on resume).
TP2_SP = ("parallel.sequence_parallel=true", "trainer.lr_schedule=cosine", "trainer.lr_warmup_steps=1",
          "trainer.min_lr=1e-5")
STEPS = 3


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_checkpoint):
    """Three uninterrupted steps at TP=2 with sequence parallelism, saving every step, then the HF export."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_dir, _train(run_dir, demo_checkpoint, STEPS, *TP2_SP)


def test_train_tp2_sequence_parallel_then_export(reference_run, demo_checkpoint):
    run_dir, records = reference_run
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    from megatron_pgpo.config import load_config
    from megatron_pgpo.trainer.schedule import learning_rate

    t = load_config(os.path.join(ROOT, "examples/tiny_cpu.yaml"), [*TP2_SP, f"trainer.total_steps={STEPS}"]).trainer
    expected = [0.0, t.lr, (t.lr + t.min_lr) / 2]  # warm-up from 0, then cosine from lr to min_lr over 3 steps
    assert [learning_rate(t, s) for s in range(STEPS)] == pytest.approx(expected)
    assert [r["actor/lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    for r in records:
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["response/length_mean"] > 0
        assert r["actor/skipped_updates"] == 0.0
        assert r["actor/grad_norm"] >= 0.0  # 0 when every group's rewards are equal (zero advantages)
        assert r["vd/score_mean"] >= 0.0 and r["time/sync"] > 0
        _assert_plumbing(r)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    # tiny_cpu.yaml's ppo_epochs=2: two passes over the step's two mini-batches (4 prompts / global batch 2) are
    # four optimizer steps per training step, and Adam counted every one of them.
    state = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert t.ppo_epochs == 2 and set(state["adam_steps"]) == {STEPS * t.ppo_epochs * 2}, state
    # The HF export loads in transformers and has the trained (changed) weights.
    import torch
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
    # Any training checkpoint exports through the converter (here: the run dir, i.e. its latest checkpoint, which
    # holds the same weights as the end-of-run export), with the tokenizer and processor files.
    converted = run_dir.parent / "converted"
    proc = subprocess.run([sys.executable, "-m", "megatron_pgpo.cli", "convert", "mcore-to-hf", str(run_dir),
                           str(converted), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = {}
    for f in converted.glob("*.safetensors"):
        again.update(load_file(str(f)))
    assert set(again) == set(after) and all(torch.equal(again[k], after[k]) for k in after)
    assert (converted / "tokenizer.json").is_file() and (converted / "preprocessor_config.json").is_file()


def _deterministic(record):
    """Everything but wall-clock times and throughputs."""
    return {k: v for k, v in record.items() if k != "time" and not k.startswith(("time/", "perf/"))}


def test_kill_9_after_a_checkpoint_then_resume_reproduces_the_uninterrupted_run(tmp_path, demo_checkpoint,
                                                                                 reference_run):
    """Start the same run, SIGKILL the whole process group (ranks and vLLM engine) once step 1's checkpoint is
    complete, run the same command again: it resumes, and every metric of the remaining steps equals the
    uninterrupted run's exactly (CPU, fp32, seeded sampling). The resumed run offloads its training state during
    rollouts (``trainer.offload_during_rollout``), so this is also a run with offloading equal to one without."""
    _, reference = reference_run
    run_dir = tmp_path / "run"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_train_cmd(run_dir, demo_checkpoint, STEPS, *TP2_SP), cwd=ROOT, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.exists() and latest.read_text()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(latest.read_text().split("_")[1])
    assert killed_at < STEPS
    records = _train(run_dir, demo_checkpoint, STEPS, *TP2_SP, "trainer.offload_during_rollout=true")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records[killed_at:], reference[killed_at:]):
        assert _deterministic(got) == _deterministic(want), got["step"]


def _assert_plumbing(record):
    """The loop's own invariants (``Trainer._plumbing_checks``), measured on the step's real batch."""
    assert record["check/group_adv_sum_max"] < 1e-5, record  # advantages sum to zero per group
    assert record["check/token_adv_sum_err"] < 1e-4, record  # PGPO weights sum to each response's length
    # old log-probs of the Megatron scoring pass vs the log-probs vLLM reported while sampling (fp32 both)
    # (measured on demo runs, fp32 on both sides: max 3e-5, mean 6e-7)
    assert record["check/rollout_logp_diff_max"] < 5e-4, record
    assert 0.0 < record["check/rollout_logp_diff_mean"] < 5e-5, record


@pytest.mark.parametrize("layout, nproc, overrides", [
    ("PP=2", None, ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
                    "algorithm.kl.coef=0.05", "algorithm.entropy_coef=0.001"]),
    ("DP=2", 2, ["parallel.tensor_model_parallel_size=1", "rollout.temperature=0.7"]),
], ids=["pp2", "dp2"])
def test_real_loop_plumbing_at_pp2_and_dp2(tmp_path, demo_checkpoint, layout, nproc, overrides):
    """Two steps of the real loop with pipeline stages / two data-parallel replicas (each with its own engine):
    the plumbing numbers hold, and a sample file with per-token S and PGPO weights is written. The PP=2 run adds
    the KL penalty to a frozen reference (a pipelined reference pass) and the entropy bonus. The DP=2 run samples
    at temperature 0.7: the scoring pass's log-probs (of logits / 0.7) must match what vLLM reports at 0.7 within
    the same bounds as at 1.0 (measured: max 1e-6 nats; without the temperature in the trainer, max 0.29, mean
    0.085)."""
    run_dir = tmp_path / "run"
    # This run dir is too deep for vLLM's IPC socket paths, so each engine uses a private /tmp dir: removed at exit.
    private_tmp = set(glob.glob("/tmp/pgpo-vllm-*"))
    records = _train(run_dir, demo_checkpoint, 2, *overrides, "checkpoint.export_hf=false", "logging.samples_every=1",
                     "logging.samples_per_step=4", nproc=nproc)
    assert len(str(run_dir / "vllm" / "tmp")) + 45 > 107
    assert set(glob.glob("/tmp/pgpo-vllm-*")) <= private_tmp, "an engine left its private temp dir behind"
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["actor/skipped_updates"] == 0.0
        _assert_plumbing(r)
    if layout == "PP=2":  # the frozen reference (both stages) against the policy: 0 before the first update
        assert all(r["actor/kl_ref"] >= 0.0 for r in records) and records[-1]["actor/kl_ref"] > 0.0, records
    else:
        assert "actor/kl_ref" not in records[-1]
    from megatron_pgpo.trainer.samples_log import read_sample_records

    rows = read_sample_records(str(run_dir), step=2)
    assert len(rows) == 4
    for row in rows:
        assert len(row["tokens"]) == len(row["scores"]) == len(row["weights"]) == len(row["token_ids"]) > 0
        assert sum(row["weights"]) == pytest.approx(len(row["weights"]), rel=1e-4)
        assert min(row["scores"]) >= 0.0
    # ... and `megatron-pgpo visualize` draws the real run's files (every token of the chosen step counted).
    from megatron_pgpo.visualize import visualize

    result = visualize(str(run_dir), png=False)
    assert result.steps == [2] and result.num_tokens == sum(len(row["tokens"]) for row in rows)
    assert result.html_path.is_file()


def test_papo_loss_with_vppo_advantages_runs_the_masked_image_view(tmp_path, demo_checkpoint):
    """PAPO's loss and VPPO's shaper together (both read the masked-image view of the scoring pass; equalities are
    in tests/unit/test_perception.py and the TP=2 scoring test): two real steps at TP=2, the perception KL logged,
    the plumbing numbers that hold for any shaper (VPPO's token advantages do not sum to L x A by design)."""
    records = _train(tmp_path / "run", demo_checkpoint, 2, "algorithm.advantage=vppo", "algorithm.loss=papo",
                     "algorithm.entropy_penalty=0.03", "checkpoint.export_hf=false")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["actor/skipped_updates"] == 0.0 and r["actor/perception_kl"] >= 0.0
        assert r["check/group_adv_sum_max"] < 1e-5 and r["check/rollout_logp_diff_max"] < 5e-4, r
        assert r["vd/score_mean"] > 0.0  # the masked view's dependency (k3), reported like PGPO's


def test_injected_faults_lose_nothing(tmp_path, demo_checkpoint):
    """Three launches of one run through the CLI, with faults injected (megatron_pgpo/faults.py) where they happen:

    1. a reward worker dies in step 1 (that sample scores 0, counted) and the vLLM engine process is SIGKILLed before
       step 1's weight sync (rebuilt, the sync repeated); the engine is SIGKILLed again before step 2's rollout
       (rebuilt with the current weights, the step retried) and a reward worker hangs in the retry;
       step 3's first update has NaN gradients (skipped, counted) and, with
       ``trainer.max_consecutive_skipped_updates=1``, the run saves step 3 and stops with an error, although the
       step's second update (tiny_cpu.yaml's second pass) is finite: the limit is on the run of skipped updates,
       wherever the step ends;
    2. resumed: rank 0 is SIGKILLed in the middle of step 4's checkpoint;
    3. resumed from step 3 (the partial step-4 checkpoint never used, then removed): it finishes.

    Every step's metrics appear exactly once."""
    run_dir = tmp_path / "run"
    common = ("trainer.global_batch_size=4", "checkpoint.export_hf=false")

    def launch(faults, *extra):
        env = {**os.environ, "MEGATRON_PGPO_FAULTS": faults}
        return subprocess.run(_train_cmd(run_dir, demo_checkpoint, 4, *common, *extra), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)

    first = launch("reward_crash@1,engine_kill_sync@1,engine_kill@2,reward_hang@2,nan_grad@3",
                   "trainer.max_consecutive_skipped_updates=1")
    assert first.returncode != 0
    assert "rebuilding the engines with the current weights, retry 1 of 2" in first.stderr, first.stderr[-3000:]
    assert "1 updates in a row had a non-finite loss" in first.stderr and "saved step 3" in first.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003"

    second = launch("kill_in_save@4")
    assert second.returncode != 0 and (checkpoints / "latest").read_text() == "step_00000003"
    assert (checkpoints / "step_00000004.tmp").is_dir()  # the partial save, left where it died

    third = launch("")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert not list(checkpoints.glob("*.tmp*"))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    by_step = {r["step"]: r for r in records}
    assert by_step[1]["reward/verify_failed"] >= 1 and by_step[1]["rollout/retries"] == 0
    assert by_step[1]["sync/retries"] == 1 and "sync/retries" not in by_step[2]
    assert by_step[2]["rollout/retries"] == 1 and by_step[2]["reward/verify_failed"] >= 1
    assert by_step[3]["actor/skipped_updates"] == 1 and by_step[3]["actor/skipped_in_row"] == 1
    assert by_step[4]["actor/skipped_updates"] == 0 and by_step[4]["reward/verify_failed"] == 0
    _assert_plumbing(by_step[2])  # the rebuilt engine samples with the trained weights (vLLM log-probs match)
