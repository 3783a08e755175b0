"""`megatron-pgpo check-parity` run as a user runs it, on a tiny checkpoint.

A parity check compares the Megatron model with transformers on the same files, so a perturbed tensor is read
identically by both and still matches. To show the check notices one perturbed tensor, the perturbed copy is
what Megatron loads (``--hf-path``) and the original is what transformers reads (``--reference-path``), the
situation of a converted or exported checkpoint checked against its source.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

EXE = [sys.executable, "-m", "megatron_pgpo.cli", "check-parity"]
PASS_NAMES = ("image pass", "text-only pass (drop form)", "text-only pass (mask form)")


def run(*args, timeout=240):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def result_lines(stdout):
    return {name: line for line in stdout.splitlines() for name in PASS_NAMES if line.startswith(name)}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from megatron_pgpo.models.qwen2_5_vl.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("parity_cli") / "tiny", "tiny", seed=5)


def test_check_parity_passes_at_tp2(tiny_checkpoint):
    proc = run("--hf-path", str(tiny_checkpoint), "--tp", "2")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    lines = result_lines(proc.stdout)
    assert set(lines) == set(PASS_NAMES), proc.stdout
    for line in lines.values():
        assert line.rstrip().endswith("PASS") and "max |logit diff|" in line
    assert "TP=2 PP=1" in proc.stdout
    assert "PASS: Megatron matches transformers" in proc.stdout


def test_check_parity_fails_when_one_tensor_is_perturbed(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    corrupted = tmp_path / "corrupted"
    shutil.copytree(tiny_checkpoint, corrupted)
    tensors = load_file(corrupted / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, corrupted / "model.safetensors", metadata={"format": "pt"})

    proc = run("--hf-path", str(corrupted), "--reference-path", str(tiny_checkpoint), "--tp", "1")
    assert proc.returncode == 1, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    lines = result_lines(proc.stdout)
    assert set(lines) == set(PASS_NAMES), proc.stdout
    for line in lines.values():
        assert line.rstrip().endswith("FAIL")
    assert "FAIL: Megatron differs from transformers" in proc.stdout


def test_check_parity_rejects_a_bad_layout_before_loading(tiny_checkpoint):
    proc = run("--hf-path", str(tiny_checkpoint), "--tp", "3", timeout=120)
    assert proc.returncode == 1
    assert "TP=3 does not divide attention heads (4)" in proc.stderr
    assert not result_lines(proc.stdout)  # nothing was run
