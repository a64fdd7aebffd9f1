#!/usr/bin/env bash
# down.sh [STATE_DIR] [--purge]: stop the local SLURM cluster that up.sh started in STATE_DIR
# (default /tmp/sdtt-slurm).
#
# 1. Cancels every job first, while slurmctld and the slurmds still run: killing a slurmd does
#    not kill the job processes it started.
# 2. Stops exactly the daemons recorded in STATE_DIR/pids (PID and start time; never by name),
#    all at once (SIGTERM, SIGKILL after a grace period), and waits until they are gone.
# 3. Kills any job process still left in an emulated node's private mount namespace (recorded by
#    up.sh), so no stray process survives even if a slurmd had crashed.
# Idempotent: with nothing running it only tidies the pid records. Keeps the state (database,
# munge key, job ids) so the next up.sh is fast, unless --purge, which deletes STATE_DIR.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

PURGE=""
ARGS=()
for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -*) die "usage: $0 [STATE_DIR] [--purge]" ;;
        *) ARGS+=("$arg") ;;
    esac
done
[[ ${#ARGS[@]} -le 1 ]] || die "usage: $0 [STATE_DIR] [--purge]"
set_paths "${ARGS[0]:-${SDTT_SLURM_STATE:-/tmp/sdtt-slurm}}"

if [[ ! -d $STATE_DIR ]]; then
    log "no cluster state in $STATE_DIR: nothing to stop"
    exit 0
fi
exec 9>>"$STATE_DIR/.lock"
flock -w 600 9 || die "another up.sh/down.sh holds $STATE_DIR/.lock"
export SLURM_CONF=$SLURM_CONF_FILE
T0=$SECONDS

# ---- 1. jobs ------------------------------------------------------------------------------------
cancel_jobs() {
    local ids deadline
    is_running slurmctld && [[ -f $SLURM_CONF_FILE ]] || return 0
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || return 0
    [[ -n ${ids// /} ]] || return 0
    log "cancelling jobs: $ids"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $ids || true
    # Wait for COMPLETING jobs too: their processes are being killed (KillWait=5 s).
    deadline=$((SECONDS + 30))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    [[ -z $(squeue -h -o %A 2>/dev/null) ]] || log "some jobs still listed after 30 s; stopping anyway"
}
cancel_jobs

# ---- 2. daemons, in parallel --------------------------------------------------------------------
DAEMON_PIDS=()
for name in "${DAEMONS[@]}"; do
    if pid=$(recorded_pid "$name"); then
        STIME[$pid]=$(<"$PID_DIR/$name.stime")
        DAEMON_PIDS+=("$name=$pid")
    fi
done
if ((${#DAEMON_PIDS[@]})); then
    log "stopping ${DAEMON_PIDS[*]}"
    # 30 s: mariadbd flushes InnoDB and slurmctld saves its state on SIGTERM.
    stop_pids 30 "${DAEMON_PIDS[@]}"
fi

# ---- 3. stray job processes in the nodes' namespaces ------------------------------------------
for node in "${NODES[@]}"; do kill_node_leftovers "$node"; done

# ---- 4. records ---------------------------------------------------------------------------------
for name in "${DAEMONS[@]}"; do
    forget "$name"
    rm -f "$RUN_DIR/$name.pid"
done
rm -f "$PID_DIR"/slurmd-*.mntns "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DB_SOCKET"
if [[ -n $PURGE ]]; then
    exec 9>&-
    rm -rf "$STATE_DIR"
    log "purged $STATE_DIR"
fi
log "cluster down in $((SECONDS - T0)) s"
