"""Fault injection (``megatron_pgpo/faults.py``) and what the reward verifier does with the faults it injects: a
hung or dead verifier worker costs that one sample (scored 0, counted as failed), never the batch."""
import pytest

from megatron_pgpo import faults


def test_fault_plans_parse_and_fire_once_per_step(monkeypatch):
    assert faults.parse("nan_grad@3, kill_in_save@4,nan_grad@5") == {"nan_grad": [3, 5], "kill_in_save": [4]}
    for bad in ("nan_grad", "nan_grad@0", "nan_grad@x", "melt@3"):
        with pytest.raises(ValueError, match="NAME@STEP .* nan_grad, kill_in_save"):
            faults.parse(bad)
    monkeypatch.setenv(faults.ENV, "nan_grad@3")
    faults.set_step(2)
    assert not faults.fires("nan_grad")
    faults.set_step(3)
    assert faults.fires("nan_grad") and not faults.fires("nan_grad")  # once
    monkeypatch.delenv(faults.ENV)
    faults.set_step(5)
    assert faults.reward_fault_text("x") == "x"


@pytest.mark.parametrize("fault, failure", [("reward_hang", "timed_out"), ("reward_crash", "worker died")])
def test_a_hung_or_dead_verifier_worker_fails_only_its_sample(monkeypatch, fault, failure):
    from megatron_pgpo.rewards import RewardScorer

    monkeypatch.setenv(faults.ENV, f"{fault}@7")
    faults.set_step(7)
    good = "<think> ok </think> \\boxed{x^2+1}"
    texts = [faults.reward_fault_text(good), good, good]
    assert texts[0] != good and texts[1] == good  # the fault fires once, on the first response
    with RewardScorer(num_workers=2, timeout_s=1.0) as scorer:
        results = scorer.score_batch(texts, ["1+x^2"] * 3)
    assert results[0].failed and results[0].accuracy == 0.0
    assert (results[0].timed_out if failure == "timed_out" else results[0].error == failure)
    assert [r.accuracy for r in results[1:]] == [1.0, 1.0] and not any(r.failed for r in results[1:])


def test_what_a_killed_rank_leaves_behind_does_not_outlive_the_launcher():
    """The local launcher is a child subreaper: a grandchild orphaned by its dead parent (an engine core whose rank
    was SIGKILLed) becomes the launcher's child, and ``kill_orphans`` removes it, but not the children the caller
    had before. Run in a subprocess: the subreaper flag would otherwise stay on pytest."""
    import subprocess
    import sys

    code = """
import os, subprocess, time
from megatron_pgpo.trainer.launch import become_subreaper, kill_orphans, _children
assert become_subreaper()
mine = subprocess.Popen(["sleep", "300"])
before = set(_children(os.getpid()))
rank = subprocess.Popen(["bash", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True)
orphan = int(rank.stdout.readline()); rank.wait(); time.sleep(0.2)
assert orphan in _children(os.getpid())
kill_orphans(keep=before)
assert orphan not in _children(os.getpid()) and mine.poll() is None
mine.kill()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
