"""`tools/gpu_check.sh` in its CPU mode, so the GPU check cannot rot between GPU loans: the same steps on the CPU
at tiny sizes (train + resume with the transformers engine, the policy in bf16 against fp32, weight export), the
CUDA-only measurements reported as SKIP with the reason."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--device", "cpu", "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = re.findall(r"^(PASS|FAIL|SKIP)\s+\((\w)\) (\S+)\s+\[.*?\] (.*)$", proc.stdout, flags=re.M)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    statuses = {letter: status for status, letter, _, _ in lines}
    assert statuses == {"a": "PASS", "b": "PASS", "c": "SKIP", "d": "SKIP", "e": "PASS", "f": "SKIP", "g": "SKIP"}, proc.stdout
    assert "3 passed, 0 failed, 4 skipped" in proc.stdout
    details = {letter: detail for _, letter, _, detail in lines}
    assert "cpu bf16 vs cpu fp32" in details["b"] and "needs CUDA" in details["c"]
