"""Launching on a real Slurm: a private single-node cluster (tools/slurm_local.sh: slurmctld + slurmd + munged,
non-default ports, everything under a temp dir) runs slurm/train_cpu_tiny.sbatch (the tiny config, TP=2, 2 tasks).

1. srun's task variables reach the ranks as RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, through
   slurm/rank_env.sh and through the fallback in trainer/launch.py.
2. `scancel --batch --signal=USR1` (what `--signal=B:USR1@N` sends before the time limit) reaches the batch
   script, whose trap passes SIGUSR1 to srun; srun delivers it to the ranks and to their children; children started
   the way the trainer starts them ignore it (a probe job, seconds).
3. SIGTERM to the training step mid-run (`scancel --signal=TERM`: every process of the step gets it, the vLLM
   engine's too): the ranks save a checkpoint at the step they reached and stop; the job requeues itself, and the
   second start resumes from that checkpoint and finishes (metrics continue, the latest checkpoint advances).

Skips only when PGPO_SKIP_SLURM=1 or not root (slurmd runs as root); a missing Slurm is installed with apt-get.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import megatron_pgpo.models.qwen2_5_vl  # noqa: F401  (torchvision shim for the demo checkpoint)

REPO = Path(__file__).resolve().parents[2]
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"

# The integration test's small run: a step takes about a second on 2 cores.
TINY = ["data.rollout_batch_size=4", "trainer.global_batch_size=2", "rollout.n=4", "rollout.max_new_tokens=12",
        "trainer.micro_batch_size=4", "trainer.eval_every=0", "reward.num_workers=1",
        "algorithm.dapo.dynamic_sampling=false", "logging.tensorboard=false", "logging.console=false",
        "checkpoint.export_hf=false"]


def _skip_reason():
    if os.environ.get("PGPO_SKIP_SLURM") == "1":
        return "PGPO_SKIP_SLURM=1 (Slurm tests opted out)"
    if os.geteuid() != 0:
        return "not root: the local Slurm's slurmd must run as root (run the tests as root, or PGPO_SKIP_SLURM=1)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


_TORCH_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(scope="module")
def slurm():
    """A running single-node cluster: the environment for sbatch/srun/squeue (SLURM_CONF). Stopped afterwards."""
    install = subprocess.run(["bash", str(SLURM_LOCAL), "install"], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, f"cannot install Slurm: {install.stderr[-2000:]}"
    state = tempfile.mkdtemp(prefix="slurm.", dir="/tmp")  # short: the munge socket path must fit a Unix socket
    t0 = time.monotonic()
    start = subprocess.run(["bash", str(SLURM_LOCAL), "start", state], capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, f"local Slurm did not start: {start.stdout}{start.stderr}"
    conf = re.search(r"export SLURM_CONF=(\S+)", start.stdout).group(1)
    # Earlier tests in this pytest process may have set torch.distributed's variables (a single-process group
    # exports MASTER_ADDR/MASTER_PORT): sbatch and srun would pass them on, as they pass a login shell's.
    env = {k: v for k, v in os.environ.items() if k not in _TORCH_DIST_VARS and not k.startswith("SLURM_")}
    env.update(SLURM_CONF=conf, PATH=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    print(f"local Slurm up in {time.monotonic() - t0:.1f} s ({state})")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", state], capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    from megatron_pgpo.demo.tiny_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("slurm_demo_ckpt") / "hf", task="colour")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")


def _run(env, *cmd, timeout=60) -> str:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _job_env(slurm, workdir, **extra):
    bindir = str(Path(sys.executable).parent)  # the environment running these tests
    return dict(slurm, PGPO_ENV_SETUP=f"export PATH={shlex.quote(bindir)}:$PATH", PGPO_ROOT=str(REPO),
                PGPO_LOG_DIR=str(workdir / "logs"), **extra)


def _submit(env, workdir, overrides) -> str:
    out = _run(env, "sbatch", "--parsable", f"--output={workdir}/job-%j.out", "slurm/train_cpu_tiny.sbatch",
               *overrides)
    return out.strip().split(";")[0]


def _job(env, job_id) -> dict:
    text = _run(env, "scontrol", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait_job(env, job_id, timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _job(env, job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                             "OUT_OF_MEMORY"):
            return _job(env, job_id)
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def _steps(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _wait_step(env, job_id, run_dir, step, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step in _steps(run_dir):
            return
        if _job(env, job_id)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job_id} ended before step {step}: {_job(env, job_id)}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _checkpoints(run_dir: Path):
    root = run_dir / "checkpoints"
    return (root / "latest").read_text().strip(), sorted(p.name for p in root.glob("step_*"))


def test_srun_task_variables_reach_the_ranks(slurm, workdir):
    env = _job_env(slurm, workdir)
    host = _run(env, "hostname", "-s").strip()
    # The wrapper the templates and nemo-run use.
    out = _run(env, "srun", "--ntasks=2", "--label", "bash", "slurm/rank_env.sh", "bash", "-c",
               'echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT $SLURM_JOB_ID"')
    rows = sorted(line.split(": ", 1)[1].split() for line in out.splitlines() if ": " in line)
    assert [r[:3] for r in rows] == [["0", "2", "0"], ["1", "2", "1"]]
    for r in rows:
        assert r[3] == host and int(r[4]) == 20000 + int(r[5]) % 20000
    # A bare `srun megatron-pgpo train` (no wrapper): trainer/launch.py maps the same variables itself.
    code = ("import os; from megatron_pgpo.trainer.launch import adopt_slurm_step_environment as a; "
            "assert a(); print(*(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')))")
    env_bare = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = _run(env_bare, "srun", "--ntasks=2", sys.executable, "-c", code, timeout=180)
    assert sorted(out.split("\n")[:2]) == [f"0 2 0 {host}", f"1 2 1 {host}"]


PROBE = r"""
import os, signal, subprocess, sys, time
from megatron_pgpo.compat.child_processes import install_child_hook

out = open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.log"), "w", buffering=1)
got = []
signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))  # the rank's handler, as in training
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
bare = subprocess.Popen(sleeper, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
install_child_hook()  # what the trainer does before its children (vLLM engine, reward workers) start
hooked = subprocess.Popen(sleeper)
time.sleep(3)  # both children are up (the hook ran)
out.write("ready\n")
deadline = time.time() + 90
while not got and time.time() < deadline:
    time.sleep(0.1)
time.sleep(1)
out.write(f"rank got {got}; child with the hook {hooked.poll()}; child without {bare.poll()}\n")
hooked.kill(); bare.kill()
"""


def test_usr1_reaches_every_process_of_the_step_and_only_the_ranks_act(slurm, workdir):
    """`--signal=B:USR1@N` signals the batch script; its trap (slurm/common.sh) passes SIGUSR1 to srun, which
    delivers it to every process of the step: the ranks and their children. A child started the way the trainer
    starts them (the hook on PYTHONPATH) ignores it; a plain Python child is killed by it."""
    probe_dir = workdir / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.py").write_text(PROBE)
    (probe_dir / "probe.sbatch").write_text(
        "#!/usr/bin/env bash\n#SBATCH --ntasks=2\nsource \"$PGPO_ROOT/slurm/common.sh\"\npgpo_setup\n"
        f"pgpo_srun --ntasks=2 bash \"$PGPO_ROOT/slurm/rank_env.sh\" python {probe_dir}/probe.py {probe_dir}\n")
    env = _job_env(slurm, workdir)
    job = _run(env, "sbatch", "--parsable", f"--output={probe_dir}/job.out", str(probe_dir / "probe.sbatch")).strip()
    deadline = time.monotonic() + 120
    while sum((probe_dir / f"rank{r}.log").exists() and "ready" in (probe_dir / f"rank{r}.log").read_text()
              for r in (0, 1)) < 2:
        running = _job(env, job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        assert running and time.monotonic() < deadline, (probe_dir / "job.out").read_text()
        time.sleep(0.2)
    _run(env, "scancel", "--batch", "--signal=USR1", job)
    info = _wait_job(env, job, timeout=120)
    log = (probe_dir / "job.out").read_text()
    assert "got SIGUSR1: asking the ranks to save and stop" in log, log
    for r in (0, 1):
        assert (probe_dir / f"rank{r}.log").read_text().splitlines()[-1] == (
            f"rank got [{int(signal.SIGUSR1)}]; child with the hook None; child without -{int(signal.SIGUSR1)}")
    assert info["JobState"] == "COMPLETED", info


def test_sigterm_saves_then_the_job_requeues_itself_and_resumes(slurm, workdir, demo_checkpoint):
    """SIGTERM to the step mid-run (`scancel --signal=TERM`: the ranks and the vLLM engine's processes get it):
    the ranks save the step they reached and stop, rank 0 reports it, the batch script requeues the job, and its
    second start resumes from that checkpoint and finishes the run."""
    run_dir = workdir / "run"
    env = _job_env(slurm, workdir)
    total = 12
    t0 = time.monotonic()
    # checkpoint.save_every=0: no periodic checkpoints, so the one below total_steps comes from the signal.
    job = _submit(env, workdir, [f"model.hf_path={demo_checkpoint}", f"trainer.run_dir={run_dir}",
                                 f"trainer.total_steps={total}", "checkpoint.save_every=0", *TINY])
    _wait_step(env, job, run_dir, 3)
    t_signal = time.monotonic()
    _run(env, "scancel", "--signal=TERM", job)  # the job step only: not the batch script, not srun
    info = _wait_job(env, job, timeout=400)
    log = (workdir / f"job-{job}.out").read_text()
    print(f"job {job}: step 3 after {t_signal - t0:.0f} s; finished {time.monotonic() - t_signal:.0f} s after SIGTERM "
          "(save, requeue, second start)")
    first, _, second = log.partition(" start 2: ")
    assert second, f"the job did not start again:\n{log[-4000:]}"
    saved = int(re.search(r"rank 0 reported: preempted (\d+)", first).group(1))
    assert 3 <= saved < total, first[-3000:]
    assert first.count(f"preemption signal received: saved step {saved}, exiting") == 2, first[-3000:]  # both ranks
    assert f"checkpoint saved at step {saved}: requeueing job {job}" in first
    assert f"rank 0 reported: finished {total}" in second, second[-3000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    # Resumed, not restarted: steps 1..saved were logged by the first start, the rest after the requeue.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, total + 1))
    requeued_at = time.mktime(time.strptime(re.search(r"\[pgpo ([\d-]+ [\d:]+)\] job \d+ \S+ start 2", log).group(1),
                                             "%Y-%m-%d %H:%M:%S"))
    assert all(r["time"] < requeued_at for r in records[:saved]) and all(r["time"] > requeued_at
                                                                        for r in records[saved:])
    latest, kept = _checkpoints(run_dir)
    assert latest == f"step_{total:08d}" and kept == [f"step_{saved:08d}", latest]


@pytest.mark.skipif(os.environ.get("PGPO_NEMO_RUN_ON_SLURM") != "1",
                    reason="opt-in (~2 min, over the suite's time budget): PGPO_NEMO_RUN_ON_SLURM=1 submits through "
                    "nemo-run's SlurmExecutor to the local Slurm")
def test_nemo_run_slurm_executor_trains_on_the_local_slurm(slurm, workdir, demo_checkpoint):
    """examples/launch_nemo_run.py submits for real (LocalTunnel, the checkout as --root, a CPU job): nemo-run's own
    sbatch script runs the templates' per-rank command, which trains and saves like the sbatch template."""
    launch_python = REPO / ".venv-launch" / "bin" / "python"
    if not launch_python.exists():
        pytest.fail("no .venv-launch: run `make launch-venv`")
    run_dir, jobs = workdir / "nemorun_run", workdir / "nemorun_jobs"  # no "/nemo_run" in paths (see the script)
    env = _job_env(slurm, workdir)
    _run(env, str(launch_python), "examples/launch_nemo_run.py", "--config", "examples/tiny_cpu.yaml", "--nodes", "1",
         "--gpus-per-node", "0", "--ntasks-per-node", "2", "--root", str(REPO), "--job-dir", str(jobs),
         "--retries", "0", "--env-setup", env["PGPO_ENV_SETUP"], f"model.hf_path={demo_checkpoint}",
         f"trainer.run_dir={run_dir}", "trainer.total_steps=2", "checkpoint.save_every=0", *TINY, timeout=300)
    job = _run(env, "squeue", "-h", "-o", "%i").split()[-1]
    info = _wait_job(env, job, timeout=400)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert _steps(run_dir) == [1, 2] and _checkpoints(run_dir) == ("step_00000002", ["step_00000002"])
