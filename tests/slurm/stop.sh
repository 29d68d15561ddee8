#!/usr/bin/env bash
# Stop the test cluster tests/slurm/start.sh started, idempotently, and leave the machine as
# it was before start.sh (installed packages excepted):
#   - cancels every job still queued or running and waits (bounded) for them to end;
#   - kills what is left of the cluster's jobs (processes that carry SLURM_JOB_ID and this
#     cluster's SLURM_CONF, e.g. children that detached from the job; slurmstepd);
#   - stops the daemons named by the pid files in the state folder (slurmd, slurmctld,
#     slurmdbd, mariadbd, munged; SIGTERM, then SIGKILL after 20 s);
#   - removes the state folder (configs, job state, accounting database, logs) unless
#     GYMLAUNCH_SLURM_KEEP=1. It only ever removes a folder start.sh marked as its own.
set -euo pipefail

DIR=${GYMLAUNCH_SLURM_DIR:-/tmp/gymlaunch-slurm}
MARKER=.gymlaunch-slurm

log() { echo "[slurm stop] $*" >&2; }

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
    local p env ancestors=" $$ " a=$$
    while [[ $a -gt 1 ]]; do  # never our own ancestors (a caller may itself run inside a job)
        a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null || echo 1)
        ancestors+="$a "
    done
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $ancestors == *" $p "* ]] && continue
        if [[ $(cat "/proc/$p/comm" 2>/dev/null) == slurmstepd ]]; then
            # slurmstepd inherits slurmd's environment, hence our SLURM_CONF
            env=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null) || continue
            grep -qx "SLURM_CONF=$SLURM_CONF" <<<"$env" && echo "$p"
            continue
        fi
        env=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null) || continue
        grep -q '^SLURM_JOB_ID=' <<<"$env" && grep -qx "SLURM_CONF=$SLURM_CONF" <<<"$env" && echo "$p"
    done
    return 0
}

stop_pid() {  # stop_pid NAME PID
    local name=$1 pid=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $name ($pid)"; return 0; }
        sleep 0.2
    done
    log "$name ($pid) ignored SIGTERM for 20 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
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

# 2. daemons, in reverse start order
for spec in slurmd:$RUN/slurmd.pid slurmctld:$RUN/slurmctld.pid slurmdbd:$RUN/slurmdbd.pid \
    mariadbd:$DIR/mysql/mysqld.pid munged:$DIR/munge/munged.pid; do
    name=${spec%%:*} file=${spec#*:}
    if pid=$(pid_of "$file" "$name"); then stop_pid "$name" "$pid"; fi
done

# 3. state
if [[ ${GYMLAUNCH_SLURM_KEEP:-0} == 1 ]]; then
    log "kept $DIR (GYMLAUNCH_SLURM_KEEP=1)"
else
    rm -rf "$DIR"
    log "removed $DIR"
fi
