#!/usr/bin/env bash
# Start the project's single-node Slurm test cluster on localhost, idempotently.
#
#   eval "$(tests/slurm/start.sh)"     # ... run Slurm tests ...     tests/slurm/stop.sh
#
# What it does (as root, Debian 12):
#   - installs slurmctld slurmd slurm-client munge slurmdbd mariadb-server when missing
#     (apt-get update only then; apt starts no services here);
#   - keeps every piece of state under one folder, $GYMLAUNCH_SLURM_DIR (default
#     /tmp/gymlaunch-slurm): configs, munge key + socket, the MariaDB datadir + socket,
#     slurm state/spool, logs, pid files, fake GPU device nodes. Nothing is written to /etc;
#     callers point Slurm's clients at the config with SLURM_CONF;
#   - starts munged, mariadbd (as user mysql), slurmdbd, slurmctld, slurmd, each only if
#     its pid file does not name a live process of that daemon, and records the pid files
#     so stop.sh stops exactly those;
#   - a node with CPUs=8 (more jobs than cores), the real RealMemory, 4 fake GPUs (gres on
#     character devices), partitions `gpu` (default) and `cpu`, accounting via slurmdbd
#     (submitit needs sacct), no accounting enforcement;
#   - a third partition `shared` on the same node with OverSubscribe=FORCE:16: its jobs share
#     cores, up to 16 jobs per core (128 on 8 CPUs), so one run can hold 64+ one-CPU stand-in
#     replicas and its collector (tests/integration/test_fleet_scale.py). `gpu` and `cpu` keep
#     one job per core: the refusal tests rely on a node of 8 CPUs that jobs cannot share.
#     While `shared` jobs hold the cores, jobs of `gpu`/`cpu` wait for them (same node);
#   - a changed configuration (a knob, or this script) takes effect on a running cluster: the
#     slurm daemons are restarted (running jobs survive it; slurmctld keeps its state);
#   - waits (bounded) for the node to be idle and sacct to answer, and, when it started
#     slurmctld or slurmd, for one probe job (partition cpu, name gymlaunch-probe) to end
#     COMPLETED in accounting; on failure prints the daemons' log tails and exits non-zero.
# Cold (packages missing) about 1 min, mostly apt; from an empty folder with the packages
# present about 6 s (3 s of it slurmctld's first scheduling pass); when already running < 1 s.
# All progress goes to stderr; stdout carries only the `export` lines, last. The daemons keep
# none of this script's file descriptors (no pipe of a caller's stays open, no lock is held).
#
# Knobs (environment): GYMLAUNCH_SLURM_DIR, GYMLAUNCH_SLURM_CLUSTER (gymlaunch),
# GYMLAUNCH_SLURM_CPUS (8), GYMLAUNCH_SLURM_GPUS (4), GYMLAUNCH_SLURM_MEMORY_MB (slurmd -C),
# GYMLAUNCH_SLURM_PORT_BASE (6817: slurmctld, +1 slurmd, +2 slurmdbd),
# GYMLAUNCH_SLURM_TIMEOUT_S (60, the bounded wait), GYMLAUNCH_SLURM_JOBS_PER_CORE (16: partition
# `shared`'s OverSubscribe=FORCE:<n>).
set -euo pipefail

DIR=${GYMLAUNCH_SLURM_DIR:-/tmp/gymlaunch-slurm}
CLUSTER=${GYMLAUNCH_SLURM_CLUSTER:-gymlaunch}
CPUS=${GYMLAUNCH_SLURM_CPUS:-8}
GPUS=${GYMLAUNCH_SLURM_GPUS:-4}
PORT_BASE=${GYMLAUNCH_SLURM_PORT_BASE:-6817}
TIMEOUT_S=${GYMLAUNCH_SLURM_TIMEOUT_S:-60}
JOBS_PER_CORE=${GYMLAUNCH_SLURM_JOBS_PER_CORE:-16}
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
MARKER=.gymlaunch-slurm   # stop.sh removes $DIR only when this file is in it

T0=$EPOCHREALTIME
log() { printf '[slurm start %5ss] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root (installs packages, runs the daemons, makes device nodes)"
case "$DIR" in /*) ;; *) die "GYMLAUNCH_SLURM_DIR must be an absolute path: $DIR" ;; esac

# --- packages -----------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >&2
    log "installed"
fi

# --- the state folder (one lock: concurrent start/stop calls queue up) -------------------------
if [[ -e $DIR && ! -e $DIR/$MARKER ]] && [[ -n $(ls -A "$DIR" 2>/dev/null) ]]; then
    die "$DIR exists, is not empty and was not made by this script; set GYMLAUNCH_SLURM_DIR elsewhere"
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
NODE=$(hostname -s)

# alive PIDFILE COMM: the pid file names a live process whose command name is COMM
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]]
}

# wait_for SECONDS WHAT COMMAND...: retry COMMAND until it succeeds
wait_for() {
    local limit=$1 what=$2
    shift 2
    local deadline=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        if (($(date +%s) >= deadline)); then
            log "timed out after ${limit}s waiting for $what"
            for f in "$DIR/munge/munged.log" "$DIR/mysql/mysqld.log" "$LOGS"/*.out "$LOGS"/slurmdbd.log "$LOGS"/slurmctld.log "$LOGS"/slurmd.log; do
                [[ -f $f ]] && { echo "----- tail $f" >&2; tail -n 25 "$f" >&2; }
            done
            echo "----- sinfo" >&2; sinfo -N -l >&2 2>&1 || true
            exit 1
        fi
        sleep 0.2
    done
}

# --- configs (rewritten only when their content changes) --------------------------------------
changed=0
put() {  # put PATH MODE < content
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; changed=1; fi
}

if [[ -n ${GYMLAUNCH_SLURM_MEMORY_MB:-} ]]; then
    MEMORY_MB=$GYMLAUNCH_SLURM_MEMORY_MB
elif [[ -s $ETC/memory_mb ]]; then
    MEMORY_MB=$(cat "$ETC/memory_mb")   # measured once, so restarts rewrite the same config
else
    MEMORY_MB=$(env -u SLURM_CONF slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ -n $MEMORY_MB ]] || die "slurmd -C printed no RealMemory"
fi
echo "$MEMORY_MB" >"$ETC/memory_mb"

for ((i = 0; i < GPUS; i++)); do
    [[ -c $DIR/dev/nvidia$i ]] || { rm -f "$DIR/dev/nvidia$i"; mknod "$DIR/dev/nvidia$i" c 195 "$i"; }
done

put "$SLURM_CONF" 644 <<EOF
# Written by tests/slurm/start.sh: the gymlaunch single-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
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
DefMemPerCPU=$((MEMORY_MB / CPUS))
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=120
InactiveLimit=0
Waittime=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT_BASE + 2))
# Clients authenticate to slurmdbd with this "password": for auth/munge it is the munge socket
# (AuthInfo above only covers slurmctld/slurmd traffic).
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEMORY_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP
# Jobs here share cores (no gang scheduling: PreemptMode is off, they all run at once): for many
# light one-CPU jobs, e.g. 64 stand-in replicas.
PartitionName=shared Nodes=$NODE MaxTime=INFINITE State=UP OverSubscribe=FORCE:$JOBS_PER_CORE
EOF

put "$ETC/gres.conf" 644 <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]
EOF

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

# --- munged -----------------------------------------------------------------------------------
started=()
if ! alive "$DIR/munge/munged.pid" munged; then
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key" --bits=1024
    chmod 600 "$DIR/munge/munge.key"
    munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" --num-threads=4 \
        </dev/null >"$LOGS/munged.out" 2>&1 9<&- || die "munged did not start: $(cat "$LOGS/munged.out")"
    started+=(munged)
fi
wait_for 20 munged munge --socket="$MUNGE_SOCKET" --no-input --string=x

# --- MariaDB ----------------------------------------------------------------------------------
MYSQL_ARGS=(--no-defaults --user=mysql --datadir="$DIR/mysql/data" --socket="$MYSQL_SOCKET"
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
    setsid mariadbd "${MYSQL_ARGS[@]}" </dev/null >>"$DIR/mysql/mysqld.log" 2>&1 9<&- &
    started+=(mariadbd)
fi
SQL=(mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root)
wait_for 30 "MariaDB on $MYSQL_SOCKET" "${SQL[@]}" -e "SELECT 1"
wait_for 10 "MariaDB's pid file" alive "$DIR/mysql/mysqld.pid" mariadbd
"${SQL[@]}" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'root'@'localhost';"

# --- slurm daemons ----------------------------------------------------------------------------
if ((changed)) && { alive "$RUN/slurmctld.pid" slurmctld || alive "$RUN/slurmd.pid" slurmd || alive "$RUN/slurmdbd.pid" slurmdbd; }; then
    log "configuration changed: restarting the slurm daemons"
    for d in slurmd slurmctld slurmdbd; do
        if alive "$RUN/$d.pid" "$d"; then kill "$(cat "$RUN/$d.pid")"; fi
    done
    for d in slurmd slurmctld slurmdbd; do wait_for 30 "$d to exit" bash -c "! kill -0 \$(cat '$RUN/$d.pid') 2>/dev/null"; done
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
if ! alive "$RUN/slurmd.pid" slurmd; then
    mkdir -p "$DIR/spool/$NODE"
    slurmd </dev/null >"$LOGS/slurmd.out" 2>&1 9<&- || die "slurmd did not start: $(cat "$LOGS/slurmd.out")"
    started+=(slurmd)
fi
probe_done() { [[ $(sacct -n -X -P -o State -j "$PROBE" 2>/dev/null) =~ ^(COMPLETED|FAILED|CANCELLED|NODE_FAIL|TIMEOUT) ]]; }
node_idle() { [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null | sort -u) =~ ^(idle|mixed|allocated)$ ]]; }
wait_for "$TIMEOUT_S" "node $NODE to be idle" node_idle
wait_for "$TIMEOUT_S" "sacct to answer" sacct -n -X -S now-1minute
if [[ " ${started[*]} " == *" slurmctld "* || " ${started[*]} " == *" slurmd "* ]]; then
    # One probe job through the whole path (munge, scheduler, slurmd, slurmstepd, accounting).
    # It also absorbs slurmctld's first scheduling pass, which comes about 3 s after it starts:
    # without the probe the callers' first job would wait for it.
    PROBE=$(sbatch --parsable -p cpu -J gymlaunch-probe --chdir="$DIR" -o /dev/null -e /dev/null --wrap true)
    wait_for "$TIMEOUT_S" "probe job $PROBE to end" probe_done
    state=$(sacct -n -X -P -o State -j "$PROBE")
    [[ $state == COMPLETED ]] || die "probe job $PROBE ended $state; see $LOGS/slurmd.log"
fi

if ((${#started[@]})); then log "started ${started[*]}; cluster $CLUSTER ready"; else log "already running; cluster $CLUSTER ready"; fi
echo "export SLURM_CONF=$SLURM_CONF"
echo "export GYMLAUNCH_SLURM_DIR=$DIR"
