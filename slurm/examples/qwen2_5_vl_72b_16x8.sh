#!/usr/bin/env bash
# Qwen2.5-VL-72B with PGPO (examples/qwen2_5_vl_72b_pgpo.yaml: TP=8, PP=4, 32 GPUs per model replica) on
# 16 nodes x 8 GPUs = 128 ranks, DP=4. Run from the repository root on the submit host; edit the paths first:
#
#   MODEL=/shared/models/Qwen2.5-VL-72B-Instruct DATA=/shared/data/ViRL39K RUNS=/shared/runs \
#   PGPO_ENV_SETUP='source /shared/venvs/pgpo/bin/activate' bash slurm/examples/qwen2_5_vl_72b_16x8.sh
#
# A 72B checkpoint save takes minutes: the preemption warning is raised to 900 s before the time limit
# (a step plus a save must fit in it). VAL_DATA=FILE adds held-out evaluation; extra arguments are config
# overrides.
set -euo pipefail
MODEL=${MODEL:-/shared/models/Qwen2.5-VL-72B-Instruct}
DATA=${DATA:-/shared/data/ViRL39K}
RUNS=${RUNS:-/shared/runs}
export PGPO_ENV_SETUP=${PGPO_ENV_SETUP:-"source $PWD/.venv/bin/activate"}
export PGPO_LOG_DIR=${PGPO_LOG_DIR:-$RUNS/logs}
mkdir -p "$PGPO_LOG_DIR"

sbatch --job-name=pgpo-72b --nodes=16 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --time=48:00:00 \
    --signal=B:USR1@900 --output="$PGPO_LOG_DIR/%x-%j.out" \
    slurm/train.sbatch examples/qwen2_5_vl_72b_pgpo.yaml \
    model.hf_path="$MODEL" data.train_path="$DATA/train.parquet" ${VAL_DATA:+data.val_path="$VAL_DATA"} \
    trainer.run_dir="$RUNS/pgpo-qwen2_5_vl_72b" "$@"
