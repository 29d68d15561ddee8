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
# Its steps are tests/slurm/common.sh's, shared with start-multinode.sh (the multi-node cluster,
# which runs beside this one). All progress goes to stderr; stdout carries only the `export`
# lines, last. The daemons keep none of this script's file descriptors (no pipe of a caller's
# stays open, no lock is held).
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
MEMORY_MB_ASKED=${GYMLAUNCH_SLURM_MEMORY_MB:-}
DIR_KNOB=GYMLAUNCH_SLURM_DIR
MARKER=.gymlaunch-slurm   # stop.sh removes $DIR only when this file is in it
LOG_LABEL="slurm start"
NODE=$(hostname -s)
NODELIST=$NODE NODE_COUNT=1
SLURMD_PIDFILES=("$DIR/run/slurmd.pid")
# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

start_cluster_state
fake_gpus "$GPUS"

put "$SLURM_CONF" 644 <<EOF
# Written by tests/slurm/start.sh: the gymlaunch single-node test cluster.
$(slurm_conf_common localhost "$RUN/slurmd.pid" "$LOGS/slurmd.log" localhost $((MEMORY_MB / CPUS)))
$(node_line "$NODE" 127.0.0.1)
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP
# Jobs here share cores (no gang scheduling: PreemptMode is off, they all run at once): for many
# light one-CPU jobs, e.g. 64 stand-in replicas.
PartitionName=shared Nodes=$NODE MaxTime=INFINITE State=UP OverSubscribe=FORCE:$JOBS_PER_CORE
EOF

write_gres_conf
write_slurmdbd_conf

start_controller
if ! alive "$RUN/slurmd.pid" slurmd; then
    mkdir -p "$DIR/spool/$NODE"
    slurmd </dev/null >"$LOGS/slurmd.out" 2>&1 9<&- || die "slurmd did not start: $(cat "$LOGS/slurmd.out")"
    started+=(slurmd)
fi
cluster_ready -p cpu --wrap true

echo "export SLURM_CONF=$SLURM_CONF"
echo "export GYMLAUNCH_SLURM_DIR=$DIR"
