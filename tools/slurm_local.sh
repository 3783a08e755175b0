#!/usr/bin/env bash
# A throwaway single-node Slurm on this machine (Debian/Ubuntu slurm-wlm), for testing the sbatch templates.
#
#   tools/slurm_local.sh install          apt-get install slurmctld slurmd slurm-client munge where missing (root)
#   tools/slurm_local.sh start DIR        private munged + slurmctld + slurmd, all state/logs/sockets under DIR,
#                                         non-default free ports; waits until `sinfo` shows the node idle, then
#                                         prints `export SLURM_CONF=DIR/slurm.conf` (what sbatch/srun/squeue need)
#   tools/slurm_local.sh stop DIR         cancel this cluster's jobs, stop the three daemons started by `start DIR`
#   tools/slurm_local.sh run DIR -- CMD   start, run CMD with SLURM_CONF set, stop (also on failure); CMD's status
#
# Nothing system-wide is touched besides the package install: the munge key, the munge socket, slurm.conf and
# the daemons' pid files live in DIR (keep DIR short, e.g. `mktemp -d /tmp/slurm.XXXX`: the munge socket path
# must fit a Unix socket name), so a system Slurm or munge on the same machine is left alone. The daemons run
# as root (SlurmUser=root), jobs run as the submitting user. Exit codes: 0 ok, 2 not root / no apt-get (install),
# 3 a daemon did not come up (its log is printed).
set -euo pipefail

die() { echo "slurm_local: $*" >&2; exit "${EXIT:-1}"; }
have_all() { for b in slurmctld slurmd sbatch srun munged mungekey; do command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1; done; }
export PATH="$PATH:/usr/sbin:/sbin"

cmd_install() {
    if have_all; then echo "slurm_local: slurm and munge already installed ($(slurmctld -V))"; return 0; fi
    [ "$(id -u)" = 0 ] || EXIT=2 die "slurm is not installed and installing needs root: apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null 2>&1 || EXIT=2 die "slurm is not installed and apt-get is not available"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurmctld slurmd slurm-client munge >/tmp/slurm_local_apt.log 2>&1; then
        apt-get update -q >>/tmp/slurm_local_apt.log 2>&1 || true
        apt-get install -y -q slurmctld slurmd slurm-client munge >>/tmp/slurm_local_apt.log 2>&1 \
            || { tail -n 20 /tmp/slurm_local_apt.log >&2; EXIT=2 die "apt-get install failed (log above)"; }
    fi
    have_all || EXIT=2 die "installed, but slurmctld/slurmd/sbatch/munged are still missing"
    echo "slurm_local: installed $(slurmctld -V) in $((SECONDS - t0)) s"
}

free_ports() {  # two distinct free TCP ports
    python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_conf() {  # DIR
    local dir=$1 host node ctld_port slurmd_port
    host=$(hostname -s)
    read -r ctld_port slurmd_port < <(free_ports)
    # The hardware line as slurmd itself detects it (CPUs, sockets, cores, memory), so the node is never drained
    # for a mismatch; a little memory is held back for the daemons.
    node=$(slurmd -C | head -n1 | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) { split($i, m, "="); $i = "RealMemory=" int(m[2] * 0.95) } print}')
    cat >"$dir/slurm.conf" <<EOF
# Written by tools/slurm_local.sh start: a private single-node cluster; everything lives in $dir.
ClusterName=pgpo-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s; 10 s here)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# quick passes: a requeued job starts a few seconds after its begin time, not at the next 30-60 s pass
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=30
MinJobAge=600
SlurmdTimeout=300
JobRequeue=1
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {  # seconds
    local deadline=$((SECONDS + $1)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        case "$state" in idle | mixed | allocated) return 0 ;; esac
        sleep 0.5
    done
    echo "slurm_local: node state after $1 s: '${state:-no answer from slurmctld}'" >&2
    return 1
}

show_logs() {
    for f in "$1"/munge/munged.log "$1"/log/slurmctld.log "$1"/log/slurmd.log; do
        [ -f "$f" ] && { echo "---- $f (last 15 lines)" >&2; tail -n 15 "$f" >&2; }
    done
    return 0
}

cmd_start() {
    local dir=${1:?usage: slurm_local.sh start DIR}
    have_all || EXIT=2 die "slurm/munge not installed: run 'tools/slurm_local.sh install' as root"
    [ "$(id -u)" = 0 ] || EXIT=2 die "starting slurmd needs root (it launches jobs as their submitting user)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ -f "$dir/slurmctld.pid" ] && die "$dir already holds a running cluster (tools/slurm_local.sh stop $dir)"
    local t0=$SECONDS
    mkdir -p "$dir"/munge "$dir"/state "$dir"/spool "$dir"/log
    chmod 700 "$dir/munge"
    mungekey --create --keyfile="$dir/munge/munge.key" --force >/dev/null 2>&1 \
        || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$dir/munge/munge.key"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --log-file="$dir/munge/munged.log" \
        || { show_logs "$dir"; EXIT=3 die "munged did not start"; }
    slurmctld -f "$SLURM_CONF" || { show_logs "$dir"; cmd_stop "$dir" >/dev/null 2>&1; EXIT=3 die "slurmctld did not start"; }
    slurmd -f "$SLURM_CONF" || { show_logs "$dir"; cmd_stop "$dir" >/dev/null 2>&1; EXIT=3 die "slurmd did not start"; }
    if ! wait_idle 60; then show_logs "$dir"; cmd_stop "$dir" >/dev/null 2>&1; EXIT=3 die "the node did not become idle"; fi
    echo "slurm_local: cluster up in $((SECONDS - t0)) s ($(sinfo -h -o '%P %D %c cpus %T'))" >&2
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pidfile() {  # FILE NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local file=$1 name=$2 pid i
    [ -f "$file" ] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

cmd_stop() {
    local dir=${1:?usage: slurm_local.sh stop DIR}
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$dir/slurmctld.pid" ] && [ -f "$SLURM_CONF" ]; then
        # Jobs first: slurmd's job steps (slurmstepd and the job's processes) outlive slurmd itself.
        local jobs i
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            scancel $jobs 2>/dev/null || true
            for i in $(seq 1 40); do [ -z "$(squeue -h -o %i 2>/dev/null || true)" ] && break; sleep 0.5; done
        fi
    fi
    stop_pidfile "$dir/slurmd.pid" slurmd
    stop_pidfile "$dir/slurmctld.pid" slurmctld
    stop_pidfile "$dir/munge/munged.pid" munged
    echo "slurm_local: stopped the cluster in $dir" >&2
}

cmd_run() {
    local dir=${1:?usage: slurm_local.sh run DIR -- CMD}
    shift
    [ "${1:-}" = "--" ] && shift
    eval "$(cmd_start "$dir")"
    trap 'cmd_stop "$dir"' EXIT
    local rc=0
    "$@" || rc=$?
    return $rc
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    run) shift; cmd_run "$@" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 1 ;;
esac
