"""The console script, run as a user runs it (a subprocess of the installed entry point)."""
import json
import os
import subprocess
import sys

import pytest

EXE = [sys.executable, "-m", "megatron_pgpo.cli"]


def run(*args, check=True):
    proc = subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_help_lists_every_subcommand():
    out = run("--help").stdout
    for cmd in ("demo", "train", "walkthrough", "config", "reward", "convert", "check-parity", "check-sync"):
        assert cmd in out
    assert "algorithm.pgpo.tau=0.3" in out
    assert "--describe" in run("config", "--help").stdout


def test_config_prints_resolved_yaml_and_rejects_typos():
    out = run("config", "algorithm.pgpo.tau=0.25").stdout
    assert "tau: 0.25" in out
    bad = run("config", "algorithm.pgpo.tua=0.25", check=False)
    assert bad.returncode != 0 and "did you mean 'tau'" in bad.stderr
    assert "pgpo" in run("config", "--list-algorithms").stdout
    described = run("config", "--describe").stdout
    assert "algorithm.pgpo.beta" in described and "Optional[str]" in described  # rich markup escaped


def test_walkthrough_runs_and_prints_token_weights():
    out = run("walkthrough", "reward.num_workers=1").stdout
    assert "Per-token PGPO advantages" in out
    assert "clipped loss with pgpo advantages" in out
    # The demo checks Eq. 7's mass conservation on its own batch.
    line = next(l for l in out.splitlines() if "weights sum to response lengths" in l)
    assert float(line.rsplit("=", 1)[1]) < 1e-5


def test_reward_command_scores_jsonl(tmp_path):
    src = tmp_path / "responses.jsonl"
    rows = [
        {"response": "<think>half</think> \\boxed{\\frac{1}{2}}", "answer": "0.5"},
        {"response": "\\boxed{3}", "answer": "4"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    proc = run("reward", str(src), "--out", str(out), "reward.num_workers=1")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["responses"] == 2
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["mean_reward"] == pytest.approx(1.0 / 2)  # (0.9 + 0.1) / 2 + 0 / 2
    scored = [json.loads(l) for l in out.read_text().splitlines()]
    assert [s["score"] for s in scored] == pytest.approx([1.0, 0.0])


def test_reward_command_reports_bad_lines(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"response": "x"}\nnot json\n')
    proc = run("reward", str(src), check=False)
    assert proc.returncode == 2
    assert "bad.jsonl:1: missing key(s) ['answer']" in proc.stderr
    assert "bad.jsonl:2: not valid JSON" in proc.stderr


def test_train_without_a_checkpoint_says_what_to_do():
    proc = run("train", "trainer.total_steps=1", check=False)
    assert proc.returncode != 0 and "model.hf_path is not set" in proc.stderr


def test_train_refuses_options_the_loop_does_not_implement():
    proc = run("train", "model.hf_path=/nonexistent", "model.init_checkpoint=/x", check=False)
    assert proc.returncode != 0 and "model.init_checkpoint" in proc.stderr


def test_train_refuses_to_resume_at_another_tp_before_starting_any_process(tmp_path):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint
    from megatron_pgpo.trainer.run_dir import write_manifest

    hf = save_tiny_checkpoint(tmp_path / "hf", "tiny", seed=0)
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "stream_position": 64, "layout": {"world": 2, "tp": 2, "pp": 1, "dp": 1,
                                                      "distributed_optimizer": True}}))
    write_manifest(step)
    proc = run("train", f"model.hf_path={hf}", f"trainer.run_dir={tmp_path / 'run'}",
               "parallel.tensor_model_parallel_size=1", "--nproc", "2", check=False)
    assert proc.returncode != 0
    assert "resume error: cannot resume" in proc.stderr and "saved at TP=2 PP=1" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
