"""``megatron-pgpo eval`` end to end: the demo's tiny model on a generated benchmark (the synthetic colour task in
Geo3k's published layout), k=4 samples through a real vLLM engine; then the saved responses judged again give the
same numbers, and an interrupted run (its sample file cut mid-line, as a crash leaves it) resumes without
regenerating what was saved."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

K, PROBLEMS = 4, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_pgpo.data.synthetic import make_example
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    root = tmp_path_factory.mktemp("eval")
    ckpt = build_demo_checkpoint(root / "hf", task="colour")
    import datasets

    rows = []
    for i in range(PROBLEMS):
        e = make_example("colour", i, seed=5, split="val")
        rows.append({"problem": "<image>" + e.question, "answer": e.answer, "images": [e.image]})
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    (root / "data/geo3k/data").mkdir(parents=True)
    ds.to_parquet(str(root / "data/geo3k/data/test-00000-of-00001.parquet"))
    return root, ckpt


def run_eval(root, ckpt, *extra):
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "eval", str(ckpt), "--benchmarks", "geo3k", "--data-dir",
           str(root / "data"), "--k", str(K), "--max-new-tokens", "12", "--max-prompt-length", "256",
           "--out", str(root / "out"), "--verifier-workers", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((root / "out/results.json").read_text()), proc.stdout


def test_eval_writes_the_table_rescores_identically_and_resumes(setup):
    root, ckpt = setup
    first, stdout = run_eval(root, ckpt)
    bench = first["benchmarks"]["geo3k"]
    assert bench["problems"] == PROBLEMS and bench["samples"] == PROBLEMS * K
    assert bench["generated"] == PROBLEMS * K and bench["cached"] == 0
    assert 0.0 <= bench[f"avg@{K}"] <= bench[f"pass@{K}"] <= 1.0
    assert sum(bench["reasons"].values()) == PROBLEMS * K
    assert first["average"][f"avg@{K}"] == bench[f"avg@{K}"]
    table = (root / "out/results.md").read_text()
    assert "| geo3k | 6 |" in table and "**average** (1 benchmarks)" in table and "| geo3k | 6 |" in stdout
    samples = root / "out/samples/geo3k.jsonl"
    lines = samples.read_text().splitlines()
    assert len(lines) == PROBLEMS * K

    rescored, _ = run_eval(root, ckpt, "--rescore")  # no engine: the saved responses judged again
    for key in (f"avg@{K}", "std", f"pass@{K}", "problems", "samples", "reasons"):
        assert rescored["benchmarks"]["geo3k"][key] == bench[key], key
    assert sorted(samples.read_text().splitlines()) == sorted(lines)

    kept = lines[:10]
    samples.write_text("\n".join(kept) + "\n" + lines[10][: len(lines[10]) // 2])  # a crash mid-line
    resumed, _ = run_eval(root, ckpt)
    after = resumed["benchmarks"]["geo3k"]
    assert after["cached"] == 10 and after["generated"] == PROBLEMS * K - 10
    assert after["problems"] == PROBLEMS and after["samples"] == PROBLEMS * K
    assert samples.read_text().splitlines()[:10] == kept  # what was saved is kept, not regenerated


def test_other_settings_are_refused_against_saved_samples(setup):
    root, ckpt = setup
    cmd = [sys.executable, "-m", "megatron_pgpo.cli", "eval", str(ckpt), "--benchmarks", "geo3k", "--data-dir",
           str(root / "data"), "--k", "2", "--out", str(root / "out"), "--max-prompt-length", "256", "--rescore"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds samples made with other settings" in proc.stderr + proc.stdout
    assert "k: 4 there, 2 now" in proc.stderr + proc.stdout
