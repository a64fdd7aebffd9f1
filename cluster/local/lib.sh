# shellcheck shell=bash
# lib.sh: helpers shared by up.sh, down.sh and status.sh (sourced, never run).
#
# A daemon we started is identified by its PID *and* its start time (field 22 of /proc/PID/stat),
# both recorded under $PID_DIR. Checking the pair instead of the bare PID means a recycled PID
# (after a reboot, or a long time after a crash) is never mistaken for our daemon, so down.sh
# can never signal a stranger. Nothing here finds a process by name.

log() { printf '[sdtt-slurm %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Every path the cluster uses, derived from one folder so that nothing leaks outside it.
# shellcheck disable=SC2034  # used by the scripts that source this file
set_paths() {
    STATE_DIR=$(realpath -m "$1")
    ETC_DIR=$STATE_DIR/etc
    LOG_DIR=$STATE_DIR/log
    RUN_DIR=$STATE_DIR/run
    PID_DIR=$STATE_DIR/pids
    MUNGE_DIR=$STATE_DIR/munge
    DB_DIR=$STATE_DIR/mysql
    SLURM_CONF_FILE=$ETC_DIR/slurm.conf
    MUNGE_SOCKET=$MUNGE_DIR/munge.socket
    DB_SOCKET=$RUN_DIR/mysqld.sock
}

# The daemons up.sh starts, in start order; slurmd-<node> is one emulated node.
NODES=(n1 n2)
# shellcheck disable=SC2034  # used by the scripts that source this file
DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}")

# proc_stime PID: print the start time (clock ticks since boot) of a live, non-zombie PID.
proc_stime() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # The command name (field 2) may contain spaces and parentheses: cut after the last ") ".
    rest=${stat##*) }
    # shellcheck disable=SC2086  # word splitting is the point
    set -- $rest
    [[ $1 != Z && $1 != X ]] || return 1  # a zombie has exited already
    printf '%s\n' "${20}"
}

# recorded_pid NAME: print the recorded PID of daemon NAME if that very process still runs.
recorded_pid() {
    local pid stime now
    [[ -s $PID_DIR/$1.pid && -s $PID_DIR/$1.stime ]] || return 1
    pid=$(<"$PID_DIR/$1.pid")
    stime=$(<"$PID_DIR/$1.stime")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    now=$(proc_stime "$pid") || return 1
    [[ $now == "$stime" ]] || return 1
    printf '%s\n' "$pid"
}

is_running() { recorded_pid "$1" >/dev/null; }

forget() { rm -f "$PID_DIR/$1.pid" "$PID_DIR/$1.stime"; }

# show_logs NAME...: the end of each daemon's own log, and of its captured stdout/stderr (which
# mostly repeats the log, but alone shows a failure to even start).
show_logs() {
    local name f lines
    for name in "$@"; do
        for f in "$LOG_DIR/$name.log:25" "$LOG_DIR/$name.out:8"; do
            lines=${f##*:}
            f=${f%:*}
            [[ -s $f ]] || continue
            log "---- last lines of $f"
            tail -n "$lines" "$f" >&2
        done
    done
}

# pids_in_mntns INODE: every PID whose mount namespace is INODE (e.g. mnt:[4026532301]).
# Each emulated node's slurmd runs in a private mount namespace that its job steps inherit, so
# this finds exactly the processes that node started, including slurmstepd, which detaches from
# slurmd and so is not its descendant.
pids_in_mntns() {
    local ns=$1 p
    for p in /proc/[0-9]*; do
        [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$ns" ]] && printf '%s\n' "${p#/proc/}"
    done
    return 0
}

# stop_pids GRACE NAME=PID...: SIGTERM them all at once, wait up to GRACE seconds, SIGKILL the
# survivors and wait for them too. A PID is only signalled while its start time still matches
# STIME[PID] (filled by the caller), so a PID recycled meanwhile is never hit.
declare -A STIME=()
alive() { [[ $(proc_stime "$1" 2>/dev/null) == "${STIME[$1]:-none}" ]]; }

stop_pids() {
    local grace=$1 entry pid deadline left=()
    shift
    (($#)) || return 0
    for entry in "$@"; do
        pid=${entry#*=}
        if alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    deadline=$((SECONDS + grace))
    while :; do
        left=()
        for entry in "$@"; do alive "${entry#*=}" && left+=("$entry"); done
        ((${#left[@]})) || return 0
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    log "still running after ${grace}s, killing: ${left[*]}"
    for entry in "${left[@]}"; do kill -KILL "${entry#*=}" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    for entry in "${left[@]}"; do
        while alive "${entry#*=}"; do
            ((SECONDS < deadline)) || die "${entry%%=*} (pid ${entry#*=}) survived SIGKILL"
            sleep 0.1
        done
    done
}

# kill_node_leftovers NODE: stop every process left in the mount namespaces NODE's slurmd ran in
# (job steps outlive a slurmd that was killed), then forget those namespaces. Call it only while
# that slurmd is not running.
kill_node_leftovers() {
    local node=$1 f=$PID_DIR/slurmd-$1.mntns ns pid stime strays=()
    [[ -f $f ]] || return 0
    while read -r ns; do
        [[ -n $ns ]] || continue
        for pid in $(pids_in_mntns "$ns"); do
            stime=$(proc_stime "$pid") || continue
            STIME[$pid]=$stime
            strays+=("$node-job=$pid")
        done
    done <"$f"
    if ((${#strays[@]})); then
        log "stopping processes left on node $node: ${strays[*]}"
        # slurmstepd ignores SIGTERM; 5 s lets the job's own processes exit cleanly first.
        stop_pids 5 "${strays[@]}"
    fi
    rm -f "$f"
}
