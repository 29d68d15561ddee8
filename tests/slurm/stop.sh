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
LOG_LABEL="slurm stop"
# shellcheck source=tests/slurm/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_cluster_state || exit 0
stop_jobs_and_daemons "$RUN/slurmd.pid"
remove_state GYMLAUNCH_SLURM_KEEP
