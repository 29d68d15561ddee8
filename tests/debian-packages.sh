#!/usr/bin/env bash
# Install the Debian packages named that are missing, as root (apt starts no services here):
#
#   tests/debian-packages.sh slurmctld slurmd ...     # the Slurm test clusters (tests/slurm/common.sh)
#   tests/debian-packages.sh chromium                  # the browser tests (tests/integration/test_reports.py)
#
# apt-get update runs only when something is missing; with all present it returns at once. Progress
# goes to stderr; a failure exits non-zero with apt's words.
set -euo pipefail

missing=()
for p in "$@"; do
    [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || missing+=("$p")
done
((${#missing[@]})) || exit 0
[[ $(id -u) == 0 ]] || { echo "installing ${missing[*]} needs root" >&2; exit 1; }
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >&2
echo "installed ${missing[*]}" >&2
