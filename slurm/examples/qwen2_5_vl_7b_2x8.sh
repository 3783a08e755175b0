#!/usr/bin/env bash
# Qwen2.5-VL-7B with PGPO (examples/qwen2_5_vl_7b_pgpo.yaml: TP=2, PP=1) on 2 nodes x 8 GPUs = 16 ranks, DP=8.
# Run from the repository root on the submit host; edit the paths (or export them) first:
#
#   MODEL=/shared/models/Qwen2.5-VL-7B-Instruct DATA=/shared/data/ViRL39K RUNS=/shared/runs \
#   PGPO_ENV_SETUP='source /shared/venvs/pgpo/bin/activate' bash slurm/examples/qwen2_5_vl_7b_2x8.sh
#
# VAL_DATA=FILE adds held-out evaluation. Extra arguments are config overrides (e.g. trainer.total_steps=50).
set -euo pipefail
MODEL=${MODEL:-/shared/models/Qwen2.5-VL-7B-Instruct}
DATA=${DATA:-/shared/data/ViRL39K}
RUNS=${RUNS:-/shared/runs}
export PGPO_ENV_SETUP=${PGPO_ENV_SETUP:-"source $PWD/.venv/bin/activate"}
export PGPO_LOG_DIR=${PGPO_LOG_DIR:-$RUNS/logs}
mkdir -p "$PGPO_LOG_DIR"

sbatch --job-name=pgpo-7b --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --time=24:00:00 \
    --output="$PGPO_LOG_DIR/%x-%j.out" \
    slurm/train.sbatch examples/qwen2_5_vl_7b_pgpo.yaml \
    model.hf_path="$MODEL" data.train_path="$DATA/train.parquet" ${VAL_DATA:+data.val_path="$VAL_DATA"} \
    trainer.run_dir="$RUNS/pgpo-qwen2_5_vl_7b" "$@"
