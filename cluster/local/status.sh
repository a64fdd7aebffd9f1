#!/usr/bin/env bash
# status.sh [STATE_DIR]: show the nodes (sinfo) and jobs (squeue) of the local SLURM cluster that
# up.sh started in STATE_DIR (default /tmp/sdtt-slurm), and which recorded daemons are running.
# Exits 1 when the cluster is not answering, so scripts can use it as a check.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

[[ $# -le 1 ]] || die "usage: $0 [STATE_DIR]"
set_paths "${1:-${SDTT_SLURM_STATE:-/tmp/sdtt-slurm}}"
export SLURM_CONF=$SLURM_CONF_FILE

daemons=()
for name in "${DAEMONS[@]}"; do
    if pid=$(recorded_pid "$name"); then daemons+=("$name=$pid"); else daemons+=("$name=DOWN"); fi
done
echo "state: $STATE_DIR"
echo "daemons: ${daemons[*]}"
if [[ ! -f $SLURM_CONF_FILE ]] || ! is_running slurmctld; then
    echo "cluster is not running"
    exit 1
fi
sinfo -N -o '%10N %10P %8t %6c %10m %E' || exit 1
echo
squeue -o '%.8i %.10P %.20j %.8T %.10M %.6D %R' || exit 1
