#!/usr/bin/env bash
# Stop the test cluster tests/slurm/start.sh started, idempotently, and leave the machine as
# it was before start.sh (installed packages excepted):
#   - cancels every job still queued or running and waits (bounded) for them to end;
#   - kills what is left of the cluster's jobs (processes that carry SLURM_JOB_ID and this
#     cluster's SLURM_CONF, e.g. children that detached from the job; slurmstepd);
#   - stops the daemons named by the pid files in the state folder (slurmd, slurmctld,
#     slurmdbd, then mariadbd, munged; SIGTERM, then SIGKILL after 20 s), and nothing else;
#   - removes the state folder (configs, job state, accounting database, logs) unless
#     GYMLAUNCH_SLURM_KEEP=1. It only ever removes a folder start.sh marked as its own.
set -euo pipefail

DIR=${GYMLAUNCH_SLURM_DIR:-/tmp/gymlaunch-slurm}
MARKER=.gymlaunch-slurm

T0=$EPOCHREALTIME
log() { printf '[slurm stop %5ss] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" "$*" >&2; }

if [[ ! -d $DIR ]]; then
    log "no $DIR: nothing to stop"
    exit 0
fi
if [[ ! -e $DIR/$MARKER ]]; then
    log "ERROR: $DIR was not made by tests/slurm/start.sh; not touching it"
    exit 1
fi
exec 9<"$DIR"
flock -w 300 9 || { log "ERROR: another start/stop holds $DIR"; exit 1; }

export SLURM_CONF=$DIR/etc/slurm.conf
RUN=$DIR/run

pid_of() {  # pid_of PIDFILE COMM: the live pid the file names, if it is that daemon
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]] && echo "$pid"
}

# processes that belong to this cluster's jobs
job_pids() {
    local p comm ancestors=" $$ " a=$$
    while [[ $a -gt 1 ]]; do  # never our own ancestors (a caller may itself run inside a job)
        a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null || echo 1)
        ancestors+="$a "
    done
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $ancestors == *" $p "* ]] && continue
        # slurmstepd inherits slurmd's environment (our SLURM_CONF) but has no SLURM_JOB_ID
        comm=
        { read -r comm <"/proc/$p/comm"; } 2>/dev/null || continue
        if [[ $comm != slurmstepd ]]; then
            grep -qz '^SLURM_JOB_ID=' "/proc/$p/environ" 2>/dev/null || continue
        fi
        grep -qzx "SLURM_CONF=$SLURM_CONF" "/proc/$p/environ" 2>/dev/null && echo "$p"
    done
    return 0
}

stop_pids() {  # stop_pids NAME:PID...: SIGTERM to all, wait, SIGKILL what ignored it for 20 s
    local spec i left
    for spec in "$@"; do kill -TERM "${spec#*:}" 2>/dev/null || true; done
    for ((i = 0; i < 200; i++)); do
        left=()
        for spec in "$@"; do kill -0 "${spec#*:}" 2>/dev/null && left+=("$spec"); done
        ((${#left[@]})) || break
        sleep 0.1
    done
    for spec in "${left[@]}"; do
        log "${spec%%:*} (${spec#*:}) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "${spec#*:}" 2>/dev/null || true
    done
    for spec in "$@"; do log "stopped ${spec%%:*} (${spec#*:})"; done
}

# 1. jobs
if pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do  # KillWait=5: cancelled jobs end within seconds
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi
leftover=$(job_pids)
if [[ -n $leftover ]]; then
    log "killing job processes still alive: $(tr '\n' ' ' <<<"$leftover")"
    # shellcheck disable=SC2086
    kill -KILL $leftover 2>/dev/null || true
fi

# 2. daemons: the slurm ones together, then the database and munged (the slurm daemons use both
#    while they shut down)
for group in "slurmd:$RUN/slurmd.pid slurmctld:$RUN/slurmctld.pid slurmdbd:$RUN/slurmdbd.pid" \
    "mariadbd:$DIR/mysql/mysqld.pid munged:$DIR/munge/munged.pid"; do
    running=()
    for spec in $group; do
        name=${spec%%:*} file=${spec#*:}
        if pid=$(pid_of "$file" "$name"); then running+=("$name:$pid"); fi
    done
    ((${#running[@]})) && stop_pids "${running[@]}"
done

# 3. state
if [[ ${GYMLAUNCH_SLURM_KEEP:-0} == 1 ]]; then
    log "kept $DIR (GYMLAUNCH_SLURM_KEEP=1)"
else
    rm -rf "$DIR"
    log "removed $DIR"
fi
