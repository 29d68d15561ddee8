#!/usr/bin/env bash
# Start the project's multi-node Slurm test cluster on this one machine, idempotently.
#
#   eval "$(tests/slurm/start-multinode.sh)"     # ... sbatch -N 2 ...     tests/slurm/stop-multinode.sh
#
# Beside the single-node cluster (start.sh), never in its way: its own state folder
# ($GYMLAUNCH_SLURM_MULTI_DIR, default /tmp/gymlaunch-slurm-multi), its own ports, its own munged,
# MariaDB, slurmdbd and slurmctld (the same code as start.sh's, tests/slurm/common.sh), its own
# SLURM_CONF, job ids from 1000000 (a job id says which cluster it is from). What it adds:
#   - nodes n1..nN (N = GYMLAUNCH_SLURM_MULTI_NODES, 2), each in its own network namespace with its
#     own address on a bridge the script makes, a second address no other node can reach, and its
#     own hostname (see tests/slurm/multinode.sh for the network);
#   - one slurmd per node, entered into its namespace with `nsenter --net` (not `ip netns exec`,
#     which remounts /sys and leaves slurmd without a cgroup filesystem) and `unshare --uts
#     --mount`: hostname nK, and a private bind mount over $DIR/node (every slurmd's pid file path
#     is the same slurm.conf line, and slurmd locks it); jobs run in their node's namespaces;
#   - slurmctld reached on the bridge address (it listens on all of the host's addresses at
#     $GYMLAUNCH_SLURM_MULTI_PORT_BASE), slurmdbd on the bridge address too (sacct also works
#     inside a job, on a node);
#   - per node GYMLAUNCH_SLURM_MULTI_CPUS (4) CPUs (SlurmdParameters=config_overrides: more than
#     the machine has), the machine's memory (not consumable, as on start.sh's node) and
#     GYMLAUNCH_SLURM_MULTI_GPUS (2) fake GPUs as gres; one partition `multi` (the default) of
#     all nodes;
#   - $DIR/etc/layout (what was built: bridge, addresses, partition, CPUs and GPUs per node;
#     stop-multinode.sh and the tests read it) and $DIR/etc/nodes (one line per node: name,
#     address, unreachable address, network namespace);
#   - waits (bounded) for every node to be idle and sacct to answer and, when it started slurmctld
#     or a slurmd, for one probe job on all nodes (`srun true` across them) to end COMPLETED.
# Progress and timings go to stderr; stdout carries only the `export` lines, last.
#
# Knobs (environment): GYMLAUNCH_SLURM_MULTI_DIR, GYMLAUNCH_SLURM_MULTI_NODES (2),
# GYMLAUNCH_SLURM_MULTI_CPUS (4 per node), GYMLAUNCH_SLURM_MULTI_GPUS (2 per node),
# GYMLAUNCH_SLURM_MULTI_MEMORY_MB (per node; slurmd -C), GYMLAUNCH_SLURM_MULTI_PORT_BASE (6837:
# slurmctld, +1 slurmd (one per namespace), +2 slurmdbd), GYMLAUNCH_SLURM_MULTI_CLUSTER
# (gymlaunch_multi), GYMLAUNCH_SLURM_MULTI_TIMEOUT_S (60), and the network's:
# GYMLAUNCH_SLURM_MULTI_BRIDGE (gl-br0), GYMLAUNCH_SLURM_MULTI_NET (10.124.0),
# GYMLAUNCH_SLURM_MULTI_UNREACHABLE_NET (10.125.0), GYMLAUNCH_SLURM_MULTI_NETNS_PREFIX (glmn).
# Its own names, not start.sh's: a shell (or test session) that has GYMLAUNCH_SLURM_DIR set for the
# single-node cluster starts this one in its own folder all the same.
set -euo pipefail

LOG_LABEL="slurm multi start"
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=tests/slurm/common.sh
source "$HERE/common.sh"
# shellcheck source=tests/slurm/multinode.sh
source "$HERE/multinode.sh"
CLUSTER=${GYMLAUNCH_SLURM_MULTI_CLUSTER:-gymlaunch_multi}
CPUS=${GYMLAUNCH_SLURM_MULTI_CPUS:-4}
GPUS=${GYMLAUNCH_SLURM_MULTI_GPUS:-2}
PORT_BASE=${GYMLAUNCH_SLURM_MULTI_PORT_BASE:-6837}
TIMEOUT_S=${GYMLAUNCH_SLURM_MULTI_TIMEOUT_S:-60}
MEMORY_MB_ASKED=${GYMLAUNCH_SLURM_MULTI_MEMORY_MB:-}
PARTITION=multi
NODELIST="n[1-$NODES]" NODE_COUNT=$NODES
SLURMD_PIDFILES=()
for ((k = 1; k <= NODES; k++)); do SLURMD_PIDFILES+=("$DIR/nodes/n$k/slurmd.pid"); done

start_cluster_state
# Written before anything of the network exists: stop-multinode.sh removes what a failed start left.
put "$ETC/layout" 644 <<EOF
# Written by tests/slurm/start-multinode.sh: what it built (stop-multinode.sh sources it).
BRIDGE=$BRIDGE
HOST_ADDRESS=$HOST_ADDRESS
NET=$NET
UNREACHABLE_NET=$UNREACHABLE_NET
NETNS_PREFIX=$NETNS_PREFIX
PARTITION=$PARTITION
CPUS_PER_NODE=$CPUS
GPUS_PER_NODE=$GPUS
EOF
put "$ETC/nodes" 644 < <(for ((k = 1; k <= NODES; k++)); do
    echo "n$k $NET.$((10 + k)) $UNREACHABLE_NET.$((10 + k)) $NETNS_PREFIX-n$k"
done)
for k in $(nodes_beyond "$NODES"); do  # a start with fewer nodes than the last: the others go
    node_netns_down "$NETNS_PREFIX-n$k"
    rm -rf "$DIR/nodes/n$k" "$DIR/spool/n$k"
done
network_up
fake_gpus "$GPUS"

put "$SLURM_CONF" 644 <<EOF
# Written by tests/slurm/start-multinode.sh: the gymlaunch multi-node test cluster.
$(slurm_conf_common "$(hostname -s)($HOST_ADDRESS)" "$DIR/node/slurmd.pid" "$LOGS/slurmd-%n.log" "$HOST_ADDRESS" $((MEMORY_MB / CPUS)))
FirstJobId=1000000
$(for ((k = 1; k <= NODES; k++)); do node_line "n$k" "$NET.$((10 + k))"; done)
PartitionName=$PARTITION Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP
EOF

write_gres_conf
write_slurmdbd_conf

start_controller
mkdir -p "$DIR/node"   # the mount point each node's own $DIR/nodes/nK is bound on
for ((k = 1; k <= NODES; k++)); do
    if ! alive "$DIR/nodes/n$k/slurmd.pid" slurmd; then
        mkdir -p "$DIR/nodes/n$k" "$DIR/spool/n$k"
        nsenter --net="/var/run/netns/$NETNS_PREFIX-n$k" unshare --uts --mount --propagation private \
            sh -c 'mount --bind "$1" "$2" && hostname "$3" && exec slurmd -N "$3"' sh "$DIR/nodes/n$k" "$DIR/node" "n$k" \
            </dev/null >"$LOGS/slurmd-n$k.out" 2>&1 9<&- || die "slurmd on n$k did not start: $(cat "$LOGS/slurmd-n$k.out")"
        started+=("slurmd")
    fi
done
cluster_ready -p "$PARTITION" -N "$NODES" --wrap "srun true"

echo "export SLURM_CONF=$SLURM_CONF"
echo "export GYMLAUNCH_SLURM_MULTI_DIR=$DIR"
