# Sourced by the sbatch templates in this folder (not run on its own). What every training job does the same way:
#
#   pgpo_setup            cd to the repository, activate the environment, export MASTER_ADDR / MASTER_PORT, print
#                         what runs where (one banner per start, so a requeued job's log shows each restart)
#   pgpo_srun ARGS...     srun ARGS in the background; SIGUSR1 / SIGTERM reaching this batch shell are forwarded to
#                         the ranks as SIGUSR1 (they save a checkpoint at the end of the step and stop). When rank 0
#                         reports that it stopped early after saving (however the signal reached it), the job
#                         requeues itself (PGPO_REQUEUE=0: it stops instead). Returns srun's exit status.
#
# Signals, as measured with Slurm 22.05 (tests/integration/test_slurm.py, slurm/README.md):
# * `#SBATCH --signal=B:USR1@300` signals only this shell; the trap below passes SIGUSR1 to srun, which forwards
#   it to every process of the step (the ranks and their children: the vLLM engine and the reward workers;
#   megatron-pgpo's children ignore it, the ranks save and exit).
# * Never send SIGTERM to srun: srun answers it by killing the step ("forcing job termination") without
#   passing SIGTERM on, so the ranks get no chance to save. That is why the trap forwards SIGUSR1 whatever it got.
# * `scancel --signal=TERM JOBID` (no --batch / --full), a time limit and preemption send SIGTERM straight to every
#   process of the step: the ranks save at the end of the current step, within KillWait / GraceTime.

pgpo_log() { echo "[pgpo $(date '+%F %T')] $*"; }

# The command every task (= rank) runs, given CONFIG.yaml [key=value ...]: the one definition of the training
# command, used by the sbatch templates and read by examples/launch_nemo_run.py (keep it on one line).
pgpo_train_command() { PGPO_CMD=(bash "$PGPO_ROOT/slurm/rank_env.sh" megatron-pgpo train "$@"); }

pgpo_setup() {
    PGPO_ROOT=${PGPO_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$PGPO_ROOT" || { pgpo_log "PGPO_ROOT=$PGPO_ROOT does not exist"; exit 2; }
    [ -f slurm/rank_env.sh ] || { pgpo_log "$PGPO_ROOT is not the megatron-pgpo repository (submit from it or set PGPO_ROOT)"; exit 2; }
    PGPO_LOG_DIR=${PGPO_LOG_DIR:-$PGPO_ROOT/logs}
    export PGPO_ROOT PGPO_LOG_DIR
    if [ -n "${PGPO_ENV_SETUP:-}" ]; then
        eval "$PGPO_ENV_SETUP" || { pgpo_log "PGPO_ENV_SETUP failed: $PGPO_ENV_SETUP"; exit 2; }
    fi
    command -v megatron-pgpo >/dev/null 2>&1 || pgpo_log "warning: megatron-pgpo is not on PATH here; set PGPO_ENV_SETUP (e.g. 'source /path/venv/bin/activate') unless the tasks' environment differs from this shell's"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    # One port per job (the same after a requeue); jobs sharing a node get different ones.
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export MASTER_ADDR MASTER_PORT
    pgpo_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) start $((${SLURM_RESTART_COUNT:-0} + 1)): ${SLURM_NNODES:-1} node(s) $SLURM_JOB_NODELIST, ${SLURM_NTASKS:-?} tasks, master $MASTER_ADDR:$MASTER_PORT, repo $PGPO_ROOT"
}

_pgpo_forward() {  # SIGNAL-NAME
    PGPO_SIGNALLED=$1
    if [ -n "${_PGPO_SRUN_PID:-}" ] && kill -0 "$_PGPO_SRUN_PID" 2>/dev/null; then
        pgpo_log "got SIG$1: asking the ranks to save and stop (SIGUSR1 to srun $_PGPO_SRUN_PID)"
        kill -USR1 "$_PGPO_SRUN_PID" 2>/dev/null || true
    else
        pgpo_log "got SIG$1 (no step running)"
    fi
}

pgpo_srun() {
    PGPO_SIGNALLED=""
    trap '_pgpo_forward USR1' USR1
    trap '_pgpo_forward TERM' TERM
    # Rank 0 writes "preempted STEP" or "finished STEP" here when it returns (megatron_pgpo/trainer/launch.py);
    # it must be on a filesystem the first node shares with this shell (the batch shell runs on the first node).
    export PGPO_STATUS_FILE=${PGPO_STATUS_FILE:-$PGPO_LOG_DIR/pgpo-status-$SLURM_JOB_ID}
    mkdir -p "$(dirname "$PGPO_STATUS_FILE")"
    rm -f "$PGPO_STATUS_FILE"
    srun "$@" &
    _PGPO_SRUN_PID=$!
    local rc=0
    # `wait` returns early whenever a trapped signal arrives: wait again until srun itself has exited.
    while :; do
        rc=0
        wait "$_PGPO_SRUN_PID" || rc=$?
        kill -0 "$_PGPO_SRUN_PID" 2>/dev/null || break
    done
    trap - USR1 TERM
    local status=""
    [ -f "$PGPO_STATUS_FILE" ] && status=$(cat "$PGPO_STATUS_FILE")
    rm -f "$PGPO_STATUS_FILE"
    pgpo_log "srun exited with status $rc${PGPO_SIGNALLED:+ after SIG$PGPO_SIGNALLED}; rank 0 reported: ${status:-nothing (it did not finish cleanly)}"
    case "$status" in
        preempted*)
            if [ "${PGPO_REQUEUE:-1}" = 1 ]; then
                pgpo_log "checkpoint saved at step ${status#preempted }: requeueing job $SLURM_JOB_ID, which resumes from it"
                # Slurm ends this instance right away ("CANCELLED ... DUE TO JOB REQUEUE") and starts the job
                # again after its requeue delay (AuthInfo cred_expire, 120 s by default).
                scontrol requeue "$SLURM_JOB_ID" || pgpo_log "scontrol requeue failed: submit the same command again to resume"
            else
                pgpo_log "checkpoint saved at step ${status#preempted }; PGPO_REQUEUE=0: submit the same command again to resume"
            fi
            ;;
    esac
    return "$rc"
}
