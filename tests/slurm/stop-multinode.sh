#!/usr/bin/env bash
# Stop the multi-node test cluster tests/slurm/start-multinode.sh started, idempotently, also after
# a start that failed half-way, and leave the machine as it was before (installed packages
# excepted). Never touches the single-node cluster (start.sh's): other folder, other SLURM_CONF.
#   - as stop.sh (tests/slurm/common.sh): cancels the jobs, kills what is left of them, stops the
#     daemons named by the state folder's pid files (every node's slurmd, slurmctld, slurmdbd,
#     then mariadbd, munged);
#   - removes the network (tests/slurm/multinode.sh): kills what still runs in the nodes'
#     namespaces, deletes them, their veths, the bridge and the unreachable route; with the names
#     $DIR/etc/layout recorded, else the knobs' (a folder removed by hand leaves no record);
#   - removes the state folder unless GYMLAUNCH_SLURM_MULTI_KEEP=1; only a folder start-multinode.sh
#     marked as its own.
# Knobs: GYMLAUNCH_SLURM_MULTI_DIR, GYMLAUNCH_SLURM_MULTI_KEEP, and start-multinode.sh's network
# knobs (used only when the folder has no record).
set -euo pipefail

LOG_LABEL="slurm multi stop"
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=tests/slurm/common.sh
source "$HERE/common.sh"
# shellcheck source=tests/slurm/multinode.sh
source "$HERE/multinode.sh"

if stop_cluster_state; then
    shopt -s nullglob
    stop_jobs_and_daemons "$DIR"/nodes/*/slurmd.pid
    shopt -u nullglob
    if [[ -f $DIR/etc/layout ]]; then
        # shellcheck source=/dev/null
        source "$DIR/etc/layout"
    fi
    network_down
    remove_state GYMLAUNCH_SLURM_MULTI_KEEP
else
    network_down
fi
log "done"
