# Shared by the test clusters' scripts: sourced, never run. start.sh/stop.sh run the single-node
# cluster, start-multinode.sh/stop-multinode.sh the multi-node one; both kinds keep every piece of
# state under one folder of their own and run their own munged, MariaDB, slurmdbd and slurmctld
# (so either kind can be started and stopped while the other runs).
#
# The caller sets LOG_LABEL ("slurm start") before sourcing, and before calling the functions:
# DIR (the state folder, absolute), DIR_KNOB (the variable that moves it, for messages), MARKER
# (the file that marks DIR as made by its start script; each kind has its own, so one kind's stop
# never removes the other's folder). Start scripts also: CLUSTER, PORT_BASE, TIMEOUT_S, CPUS and
# GPUS (per node), MEMORY_MB_ASKED (a node's RealMemory in MB; empty: what `slurmd -C` measures),
# NODELIST (Slurm hostlist of the cluster's nodes), NODE_COUNT, SLURMD_PIDFILES (array: one pid
# file per slurmd).

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

T0=$EPOCHREALTIME
log() { printf '[%s %5ss] %s\n' "$LOG_LABEL" "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# alive PIDFILE COMM: the pid file names a live process whose command name is COMM
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]]
}

# pid_of PIDFILE COMM: the live pid the file names, if it is that daemon
pid_of() {
    alive "$1" "$2" && tr -dc 0-9 <"$1"
}

# --- starting ---------------------------------------------------------------------------------

# Root, the packages (installed when missing), the state folder claimed and locked (fd 9: concurrent
# start/stop calls of one cluster queue up), its subfolders, and the variables the rest uses.
start_cluster_state() {
    [[ $(id -u) == 0 ]] || die "must run as root (installs packages, runs the daemons, makes device nodes)"
    case "$DIR" in /*) ;; *) die "$DIR_KNOB must be an absolute path: $DIR" ;; esac

    "$(dirname "${BASH_SOURCE[0]}")/../debian-packages.sh" "${PACKAGES[@]}" || die "could not install ${PACKAGES[*]}"

    if [[ -e $DIR && ! -e $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR" 2>/dev/null) ]]; then
        die "$DIR exists, is not empty and was not made by this script; set $DIR_KNOB elsewhere"
    fi
    mkdir -p "$DIR"
    chmod 755 "$DIR"   # mysqld (user mysql) must traverse it
    touch "$DIR/$MARKER"
    exec 9<"$DIR"
    flock -w 300 9 || die "another start/stop holds $DIR"

    ETC=$DIR/etc RUN=$DIR/run LOGS=$DIR/log
    mkdir -p "$ETC" "$RUN" "$LOGS" "$DIR/state" "$DIR/spool" "$DIR/dev" "$DIR/munge" "$DIR/mysql"
    chmod 755 "$DIR/munge"   # munged wants its socket folder traversable by all; the key stays 0600
    SLURM_CONF=$ETC/slurm.conf
    export SLURM_CONF
    MUNGE_SOCKET=$DIR/munge/munge.socket.2
    MYSQL_SOCKET=$DIR/mysql/mysqld.sock
    # slurmdbd's MySQL client library connects to "localhost" through this socket.
    export MYSQL_UNIX_PORT=$MYSQL_SOCKET
    changed=0
    started=()

    if [[ -n $MEMORY_MB_ASKED ]]; then
        MEMORY_MB=$MEMORY_MB_ASKED
    elif [[ -s $ETC/memory_mb ]]; then
        MEMORY_MB=$(cat "$ETC/memory_mb")   # measured once, so restarts rewrite the same config
    else
        MEMORY_MB=$(env -u SLURM_CONF slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
        [[ -n $MEMORY_MB ]] || die "slurmd -C printed no RealMemory"
    fi
    echo "$MEMORY_MB" >"$ETC/memory_mb"
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds; on timeout the daemons' log tails
wait_for() {
    local limit=$1 what=$2 f
    shift 2
    local deadline=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= deadline)); then
            log "timed out after ${limit}s waiting for $what"
            for f in "$DIR/munge/munged.log" "$DIR/mysql/mysqld.log" "$LOGS"/*.out "$LOGS"/*.log; do
                [[ -f $f ]] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
            done
            echo "----- sinfo" >&2; sinfo -N -l >&2 2>&1 || true
            exit 1
        fi
        sleep 0.2
    done
}

# put PATH MODE < content: (re)written only when the content changes (then changed=1)
put() {
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; changed=1; fi
}

# fake_gpus COUNT: character devices $DIR/dev/nvidia0.. for gres (nodes may share them: each slurmd
# only checks that its gres files exist)
fake_gpus() {
    local i
    for ((i = 0; i < $1; i++)); do
        [[ -c $DIR/dev/nvidia$i ]] || { rm -f "$DIR/dev/nvidia$i"; mknod "$DIR/dev/nvidia$i" c 195 "$i"; }
    done
}

# slurm_conf_common CTLD_HOST SLURMD_PIDFILE SLURMD_LOGFILE ACCOUNTING_HOST DEF_MEM_PER_CPU: the
# slurm.conf lines both kinds share (nodes and partitions follow them)
slurm_conf_common() {
    cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$1
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire (default 120 s): a step's credential must reach its slurmd within it, and a requeued
# job waits that long before it may start again (slurmctld sets its begin time to now + cred_expire + 1).
# 30 s: still far beyond a credential's trip to a local slurmd, and a requeue test waits 1.5 min less.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=30
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$2
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$3
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
# Cores are consumable, memory is not: --mem/--mem-per-cpu up to RealMemory is accepted and
# recorded but not reserved, so jobs that ask for memory still share the node (as with CPUs=8).
SelectTypeParameters=CR_Core
DefMemPerCPU=$5
SchedulerType=sched/backfill
# sched_interval (default 60 s): the full scheduling pass, the one that starts a job that became
# eligible by the clock alone (a requeued job's begin time passing); submissions and job ends already
# trigger a pass of their own. A few dozen jobs at most here: a pass every 2 s costs nothing.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=120
InactiveLimit=0
Waittime=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$4
AccountingStoragePort=$((PORT_BASE + 2))
# Clients authenticate to slurmdbd with this "password": for auth/munge it is the munge socket
# (AuthInfo above only covers slurmctld/slurmd traffic).
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
EOF
}

# node_line NAME ADDRESS: a node of CPUS cores, MEMORY_MB and GPUS fake GPUs, for slurm.conf
node_line() {
    echo "NodeName=$1 NodeAddr=$2 NodeHostname=$1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEMORY_MB Gres=gpu:$GPUS State=UNKNOWN"
}

# gres.conf: GPUS fake GPUs on every node of NODELIST
write_gres_conf() {
    put "$ETC/gres.conf" 644 <<EOF
AutoDetect=off
NodeName=$NODELIST Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]
EOF
}

write_slurmdbd_conf() {
    put "$ETC/slurmdbd.conf" 600 <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
}

# munged, MariaDB and slurmdbd (each only when not running), the cluster known to accounting, and
# slurmctld; slurm daemons restarted first when the configuration changed. The caller then starts
# its slurmd(s) and calls `cluster_ready`.
start_controller() {
    if ! alive "$DIR/munge/munged.pid" munged; then
        [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024
        chmod 600 "$DIR/munge/munge.key"
        munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" \
            --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --num-threads=4 \
            </dev/null >"$LOGS/munged.out" 2>&1 9<&- || die "munged did not start: $(cat "$LOGS/munged.out")"
        started+=(munged)
    fi
    wait_for 20 munged munge --socket="$MUNGE_SOCKET" --no-input --string=x

    local mysql_args=(--no-defaults --user=mysql --datadir="$DIR/mysql/data" --socket="$MYSQL_SOCKET"
        --pid-file="$DIR/mysql/mysqld.pid" --log-error="$DIR/mysql/mysqld.log" --skip-networking
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --tmpdir="$DIR/mysql")
    if ! alive "$DIR/mysql/mysqld.pid" mariadbd; then
        chown mysql:mysql "$DIR/mysql"
        if [[ ! -d $DIR/mysql/data/mysql ]]; then
            log "initialising the MariaDB datadir"
            rm -rf "$DIR/mysql/data"
            mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql/data" \
                --auth-root-authentication-method=socket --skip-test-db >"$DIR/mysql/install.log" 2>&1 ||
                { tail -n 30 "$DIR/mysql/install.log" >&2; die "mariadb-install-db failed"; }
        fi
        touch "$DIR/mysql/mysqld.log"
        chown mysql:mysql "$DIR/mysql/mysqld.log"
        setsid mariadbd "${mysql_args[@]}" </dev/null >>"$DIR/mysql/mysqld.log" 2>&1 9<&- &
        started+=(mariadbd)
    fi
    local sql=(mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root)
    wait_for 30 "MariaDB on $MYSQL_SOCKET" "${sql[@]}" -e "SELECT 1"
    wait_for 10 "MariaDB's pid file" alive "$DIR/mysql/mysqld.pid" mariadbd
    "${sql[@]}" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'root'@'localhost';"

    local spec specs=("slurmctld:$RUN/slurmctld.pid" "slurmdbd:$RUN/slurmdbd.pid") live=() pid
    for spec in "${SLURMD_PIDFILES[@]}"; do specs+=("slurmd:$spec"); done
    if ((changed)); then
        for spec in "${specs[@]}"; do
            if pid=$(pid_of "${spec#*:}" "${spec%%:*}"); then live+=("$pid"); fi
        done
    fi
    if ((${#live[@]})); then
        log "configuration changed: restarting the slurm daemons"
        kill "${live[@]}"
        wait_for 30 "the slurm daemons to exit" none_alive "${live[@]}"
    fi

    if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
        slurmdbd </dev/null >"$LOGS/slurmdbd.out" 2>&1 9<&- || die "slurmdbd did not start: $(cat "$LOGS/slurmdbd.out")"
        started+=(slurmdbd)
    fi
    wait_for "$TIMEOUT_S" "slurmdbd to answer" sacctmgr -n list cluster
    if [[ -z $(sacctmgr -n -P list cluster format=cluster where cluster="$CLUSTER") ]]; then
        sacctmgr -i add cluster "$CLUSTER" >&2
    fi

    if ! alive "$RUN/slurmctld.pid" slurmctld; then
        slurmctld </dev/null >"$LOGS/slurmctld.out" 2>&1 9<&- || die "slurmctld did not start: $(cat "$LOGS/slurmctld.out")"
        started+=(slurmctld)
    fi
}

none_alive() {  # none_alive PID...
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 1; done
    return 0
}

# all NODE_COUNT nodes of NODELIST idle, mixed or allocated (they registered and take jobs)
nodes_up() {
    [[ $(sinfo -h -N -n "$NODELIST" -o '%N %T' 2>/dev/null | sort -u | grep -cE ' (idle|mixed|allocated)$') == "$NODE_COUNT" ]]
}

probe_done() { [[ $(sacct -n -X -P -o State -j "$PROBE" 2>/dev/null) =~ ^(COMPLETED|FAILED|CANCELLED|NODE_FAIL|TIMEOUT) ]]; }

# cluster_ready SBATCH_ARGS...: the nodes up and sacct answering; when slurmctld or a slurmd was
# (re)started, one probe job (SBATCH_ARGS: its partition, nodes and script) ends COMPLETED. Then the
# `export` lines on stdout.
cluster_ready() {
    wait_for "$TIMEOUT_S" "nodes $NODELIST to be idle" nodes_up
    wait_for "$TIMEOUT_S" "sacct to answer" sacct -n -X -S now-1minute
    if [[ " ${started[*]} " == *" slurmctld "* || " ${started[*]} " == *" slurmd "* ]]; then
        # One probe job through the whole path (munge, scheduler, slurmd, slurmstepd, accounting).
        # It also absorbs slurmctld's first scheduling pass, which comes about 3 s after it starts:
        # without the probe the callers' first job would wait for it.
        PROBE=$(sbatch --parsable -J gymlaunch-probe --chdir="$DIR" -o /dev/null -e /dev/null "$@")
        wait_for "$TIMEOUT_S" "probe job $PROBE to end" probe_done
        local state
        state=$(sacct -n -X -P -o State -j "$PROBE")
        [[ $state == COMPLETED ]] || die "probe job $PROBE ended $state; see $LOGS/slurmd*.log"
    fi
    if ((${#started[@]})); then log "started ${started[*]}; cluster $CLUSTER ready"; else log "already running; cluster $CLUSTER ready"; fi
}

# --- stopping ---------------------------------------------------------------------------------

# The state folder locked (fd 9) if it is there and ours; returns 1 (after saying why) when there
# is nothing of ours to stop, exits when the folder is someone else's.
stop_cluster_state() {
    if [[ ! -d $DIR ]]; then
        log "no $DIR: nothing to stop"
        return 1
    fi
    if [[ ! -e $DIR/$MARKER ]]; then
        log "ERROR: $DIR was not made by this cluster's start script; not touching it"
        exit 1
    fi
    exec 9<"$DIR"
    flock -w 300 9 || { log "ERROR: another start/stop holds $DIR"; exit 1; }
    export SLURM_CONF=$DIR/etc/slurm.conf
    RUN=$DIR/run
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

# stop_jobs_and_daemons SLURMD_PIDFILE...: every job cancelled (bounded wait), what is left of
# them killed, then the daemons named by the pid files: the slurm ones together, then the database
# and munged (the slurm daemons use both while they shut down)
stop_jobs_and_daemons() {
    local jobs i leftover group spec name file pid running
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

    local slurm_group="slurmctld:$RUN/slurmctld.pid slurmdbd:$RUN/slurmdbd.pid"
    for file in "$@"; do slurm_group="slurmd:$file $slurm_group"; done
    for group in "$slurm_group" "mariadbd:$DIR/mysql/mysqld.pid munged:$DIR/munge/munged.pid"; do
        running=()
        for spec in $group; do
            name=${spec%%:*} file=${spec#*:}
            if pid=$(pid_of "$file" "$name"); then running+=("$name:$pid"); fi
        done
        ((${#running[@]})) && stop_pids "${running[@]}"
    done
    return 0
}

# remove_state KEEP_KNOB: the state folder removed, unless the variable KEEP_KNOB is 1
remove_state() {
    if [[ ${!1:-0} == 1 ]]; then
        log "kept $DIR ($1=1)"
    else
        rm -rf "$DIR"
        log "removed $DIR"
    fi
}
