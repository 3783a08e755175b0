#!/usr/bin/env bash
# One Slurm task = one training rank. Used by every template here and by examples/launch_nemo_run.py:
#
#   srun [...] bash slurm/rank_env.sh megatron-pgpo train CONFIG.yaml [key=value ...]
#
# Maps srun's task variables to the ones torch.distributed and megatron_pgpo/trainer/launch.py read
# (SLURM_PROCID -> RANK, SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK; MASTER_ADDR / MASTER_PORT come
# from the batch script, with the same fallbacks here), runs $PGPO_ENV_SETUP inside the task (so it also works
# when srun starts the task in a container), then execs the command: Python is the task's process, and the
# signals Slurm sends to the step (SIGUSR1 / SIGTERM) reach it directly.
set -eo pipefail
if [ -z "${SLURM_PROCID:-}" ] || [ -z "${SLURM_NTASKS:-}" ]; then
    echo "rank_env.sh: SLURM_PROCID/SLURM_NTASKS are not set: run this under srun (one task per rank)" >&2
    exit 2
fi
if [ -n "${PGPO_ENV_SETUP:-}" ]; then
    eval "$PGPO_ENV_SETUP" || { echo "rank_env.sh: PGPO_ENV_SETUP failed: $PGPO_ENV_SETUP" >&2; exit 2; }
fi
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=${SLURM_LOCALID:-0}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
exec "$@"
