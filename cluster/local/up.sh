#!/usr/bin/env bash
# up.sh [STATE_DIR]: start a real two-node SLURM cluster on this one machine, for tests and demos.
#
# Installs the Debian packages if missing, writes slurm.conf/slurmdbd.conf under STATE_DIR
# (default /tmp/sdtt-slurm; every state, spool, pid, socket and log path lives there), and starts
# munged, mariadbd, slurmdbd, slurmctld and two emulated nodes n1, n2 (one slurmd each, in a
# private mount namespace whose /etc/hosts maps n1 n2 to 127.0.0.1, so MASTER_ADDR=n1 resolves in
# jobs without touching the real /etc/hosts). Waits until both nodes are usable, then writes
# STATE_DIR/env.sh: `source` it to point sbatch/srun/sacct (and so submitit) at this cluster.
#
# Idempotent: when every daemon is already running it does nothing; after a crash it forgets the
# dead daemons' pid files and starts only those again. The PID (and start time) of each daemon it
# starts is recorded in STATE_DIR/pids/, which is what down.sh stops; nothing is found by name.
# Facts behind the settings: docs/cluster.md, "The local test cluster".
#
# Last line on stdout (machine-readable, for test fixtures): SDTT_SLURM_STARTED=<daemons started>,
# empty when the cluster was already up. Progress goes to stderr.
# Environment: SDTT_SLURM_PORT_BASE (default 16800) moves every TCP port the cluster listens on;
# it is remembered in STATE_DIR, so later runs on the same STATE_DIR need not repeat it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"

[[ $# -le 1 ]] || die "usage: $0 [STATE_DIR]"
set_paths "${1:-${SDTT_SLURM_STATE:-/tmp/sdtt-slurm}}"
[[ $EUID -eq 0 ]] || die "must run as root: it installs packages and bind-mounts a per-node /etc/hosts"

# Ports: private, above the usual defaults (3306, 6817-6819) so a real MariaDB or SLURM on the
# machine is left alone, and below the kernel's ephemeral range (32768+) so no client socket can
# be holding one of them by chance.
PORT_BASE=${SDTT_SLURM_PORT_BASE:-$(cat "$ETC_DIR/port_base" 2>/dev/null || echo 16800)}
if ! [[ $PORT_BASE =~ ^[0-9]+$ ]] || ((PORT_BASE < 1024 || PORT_BASE > 65000)); then
    die "SDTT_SLURM_PORT_BASE=$PORT_BASE is not a port number in [1024, 65000]"
fi
DB_PORT=$((PORT_BASE + 6))
CTLD_PORT=$((PORT_BASE + 17))
DBD_PORT=$((PORT_BASE + 19))
SLURMD_PORT_FIRST=$((PORT_BASE + 21))
SLURMD_PORT_LAST=$((SLURMD_PORT_FIRST + ${#NODES[@]} - 1))
CLUSTER=sdtt
ACCOUNT=sdtt
PARTITION=debug
# Daemons log harmless "mpi/pmix: can not load PMIx library" errors at start: slurm loads every
# MPI plugin whatever MpiDefault says, and installing libpmix2 does not silence them (measured).
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

T0=$SECONDS
STARTED=()
ADDED_POLICY=""
SUCCESS=""

# On failure or interruption, stop the daemons this run started (their logs stay in LOG_DIR):
# a half-started cluster would otherwise be left running with nobody to stop it.
on_exit() {
    local name pid entries=()
    [[ -z $ADDED_POLICY ]] || rm -f /usr/sbin/policy-rc.d
    [[ -z $SUCCESS ]] || return 0
    for name in "${STARTED[@]}"; do
        if pid=$(recorded_pid "$name"); then
            STIME[$pid]=$(<"$PID_DIR/$name.stime")
            entries+=("$name=$pid")
        fi
        forget "$name"
    done
    if ((${#entries[@]})); then
        log "up.sh failed: stopping what it started: ${entries[*]}"
        stop_pids 20 "${entries[@]}" || true
    fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

mkdir -p "$STATE_DIR"
# One up.sh/down.sh at a time per STATE_DIR (two test sessions may race to start the cluster).
# Daemons are started with fd 9 closed so they never hold this lock.
exec 9>>"$STATE_DIR/.lock"
flock -w 600 9 || die "another up.sh/down.sh holds $STATE_DIR/.lock"

export SLURM_CONF=$SLURM_CONF_FILE

all_running() {
    local name
    for name in "${DAEMONS[@]}"; do is_running "$name" || return 1; done
    [[ -s $STATE_DIR/env.sh ]]
}

# --------------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------------
ensure_packages() {
    local p missing=() t=$SECONDS
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must start no service: we run every daemon ourselves, on private paths.
    # Debian images usually ship a policy-rc.d saying so; add a temporary one where it is missing.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        ADDED_POLICY=1
    fi
    # apt-get update only when needed: the lists do not know a package (never fetched), or the
    # install fails (stale lists point at files the mirror no longer has).
    for p in "${missing[@]}"; do
        if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [^(]'; then
            apt-get update -qq
            break
        fi
    done
    local install=(apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}")
    if ! "${install[@]}" >"$STATE_DIR/apt.log" 2>&1; then
        log "install failed; refreshing the package lists and retrying"
        apt-get update -qq
        "${install[@]}" >"$STATE_DIR/apt.log" 2>&1 || { tail -n 30 "$STATE_DIR/apt.log" >&2; die "apt-get install failed"; }
    fi
    if [[ -n $ADDED_POLICY ]]; then rm -f /usr/sbin/policy-rc.d; ADDED_POLICY=""; fi
    log "packages installed in $((SECONDS - t)) s"
}

# --------------------------------------------------------------------------------------------------
# Configuration (deterministic: rewriting it for a partial restart yields the same files)
# --------------------------------------------------------------------------------------------------
write_file() {  # write_file PATH MODE <content: atomically, so a reader never sees half a file
    cat >"$1.tmp"
    chmod "$2" "$1.tmp"
    mv -f "$1.tmp" "$1"
}

write_config() {
    local host hw="" mem="" kv node real_mem db_pass
    mkdir -p "$ETC_DIR" "$LOG_DIR" "$RUN_DIR" "$PID_DIR" "$STATE_DIR/ctld" "$STATE_DIR/tmp"
    for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/spool/$node"; done
    host=$(hostname -s)

    # The node's shape exactly as slurmd sees it (sockets/cores/threads): a bare CPUs=N makes
    # slurmd warn that it "reconfigured socket/core boundaries". Each emulated node advertises
    # all of the machine's CPUs, so two tasks per node fit on a 2-core machine.
    for kv in $(slurmd -C | head -n 1); do
        case $kv in
            NodeName=*) ;;
            RealMemory=*) mem=${kv#RealMemory=} ;;
            *) hw+=" $kv" ;;
        esac
    done
    [[ $mem =~ ^[0-9]+$ && -n $hw ]] || die "cannot parse the output of 'slurmd -C'"
    # A bit under the machine's memory: a node advertising more than it has is drained.
    real_mem=$((mem * 95 / 100))

    write_file "$SLURM_CONF_FILE" 644 <<EOF
# Written by cluster/local/up.sh: a two-node cluster on one machine ($STATE_DIR).
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 (default 120): a requeued job restarts after ~12 s instead of ~130 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MpiDefault=none
# No cgroups: the emulated nodes share one kernel and this machine may have no cgroup access.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$STATE_DIR/tmp
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The slurmctld->slurmdbd link ignores AuthInfo and reads the munge socket from here
# (otherwise it looks for /run/munge/munge.socket.2).
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
# MULTIPLE_SLURMD: every node is this host, told apart by its slurmd port.
NodeName=n[1-${#NODES[@]}] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$SLURMD_PORT_FIRST-$SLURMD_PORT_LAST]$hw RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=n[1-${#NODES[@]}] Default=YES MaxTime=INFINITE State=UP
EOF

    printf '%s\n' "$PORT_BASE" | write_file "$ETC_DIR/port_base" 644
    if [[ ! -s $ETC_DIR/db.pass ]]; then
        od -An -N16 -tx1 /dev/urandom | tr -d ' \n' | write_file "$ETC_DIR/db.pass" 600
    fi
    db_pass=$(<"$ETC_DIR/db.pass")
    # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF; it must be 0600 (it has a password).
    write_file "$ETC_DIR/slurmdbd.conf" 600 <<EOF
# Written by cluster/local/up.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF

    # The per-node /etc/hosts: the real one plus the emulated node names.
    { cat /etc/hosts; printf '127.0.0.1 %s\n' "${NODES[*]}"; } | write_file "$ETC_DIR/hosts" 644
}

# --------------------------------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------------------------------
# A fixed, minimal environment: the cluster behaves the same whoever starts it (a shell, pytest).
DAEMON_ENV=(PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root SLURM_CONF="$SLURM_CONF_FILE")

# start_daemon NAME CMD...: run CMD in the foreground of its own session (so a Ctrl-C aimed at
# whoever ran up.sh does not reach it), logs in LOG_DIR/NAME.out, PID recorded.
start_daemon() {
    local name=$1 pid stime
    shift
    # In a non-interactive shell a background job is not a process group leader, so setsid
    # needs no fork and $! is the daemon itself (env and setsid exec into it).
    env -i "${DAEMON_ENV[@]}" setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 9>&- &
    pid=$!
    stime=$(proc_stime "$pid") || { show_logs "$name"; die "$name exited at once"; }
    printf '%s\n' "$pid" >"$PID_DIR/$name.pid"
    printf '%s\n' "$stime" >"$PID_DIR/$name.stime"
    STARTED+=("$name")
    log "started $name (pid $pid)"
}

# wait_until NAME SECONDS WHAT CMD...: poll CMD until it succeeds; fail early if NAME died.
wait_until() {
    local name=$1 timeout=$2 what=$3 deadline
    shift 3
    deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ! is_running "$name"; then show_logs "$name"; die "$name exited while waiting for $what"; fi
        ((SECONDS < deadline)) || { show_logs "$name"; die "timed out after ${timeout}s waiting for $what"; }
        sleep 0.2
    done
}

# Forget a daemon that is not running: its records and the files it would trip over on restart.
clean_stale() {
    local name=$1
    [[ -e $PID_DIR/$name.pid ]] && log "$name is not running: cleaning its stale pid file"
    forget "$name"
    rm -f "$RUN_DIR/$name.pid"
    case $name in
        munged) rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_DIR/munged.pid" ;;
        mariadbd) rm -f "$DB_SOCKET" "$DB_SOCKET.lock" ;;
    esac
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null; }

start_munged() {
    # munged runs as the munge user, which must own its key, socket folder and log; the socket
    # folder must be 0755 ("Socket is inaccessible: execute permissions for all required").
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    [[ -s $MUNGE_DIR/munge.key ]] ||
        setpriv --reuid=munge --regid=munge --init-groups mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    touch "$LOG_DIR/munged.log"
    chown munge:munge "$LOG_DIR/munged.log"
    chmod 0640 "$LOG_DIR/munged.log"
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups \
        munged --foreground --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_until munged 20 "munged to answer" munge_ok
}

db_sql() { mariadb --no-defaults --socket="$DB_SOCKET" -u root -e "$1"; }

start_mariadbd() {
    local t=$SECONDS pass
    # A marker written last tells a finished initialisation from one a crash interrupted.
    if [[ ! -f $DB_DIR/.sdtt-initialised ]]; then
        rm -rf "$DB_DIR"
        mkdir -p "$DB_DIR"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" --skip-test-db \
            --auth-root-authentication-method=socket >"$LOG_DIR/mariadb-install-db.out" 2>&1 ||
            { tail -n 30 "$LOG_DIR/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
        touch "$DB_DIR/.sdtt-initialised"
        log "MariaDB initialised in $((SECONDS - t)) s"
    fi
    start_daemon mariadbd mariadbd --no-defaults --user=root --datadir="$DB_DIR" \
        --bind-address=127.0.0.1 --port="$DB_PORT" --socket="$DB_SOCKET" \
        --pid-file="$RUN_DIR/mariadbd.pid" --log-error="$LOG_DIR/mariadbd.log" \
        --skip-name-resolve --performance-schema=OFF --innodb-lock-wait-timeout=900
    wait_until mariadbd 60 "MariaDB to answer" mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
    pass=$(<"$ETC_DIR/db.pass")
    # Idempotent: safe on every start, and repairs a password that drifted from slurmdbd.conf.
    db_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
            ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
        die "cannot create the slurm database user"
}

start_slurmdbd() {
    start_daemon slurmdbd slurmdbd -D
    wait_until slurmdbd 60 "slurmdbd to answer" sacctmgr -n -P list cluster
}

# Register the cluster, an account and root in it; each step only when missing.
register_accounting() {
    if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list account "$ACCOUNT" format=account) ]]; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="sdtt tests" organization=sdtt >/dev/null
    fi
    if [[ -z $(sacctmgr -n -P list association cluster="$CLUSTER" account="$ACCOUNT" user=root format=user) ]]; then
        sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    fi
}

ctld_up() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
    # -i: a state file written by a crashed slurmctld must not stop it from starting.
    start_daemon slurmctld slurmctld -D -i -f "$SLURM_CONF_FILE"
    wait_until slurmctld 60 "slurmctld to answer" ctld_up
}

# The slurmd of NODE is not running, so NODE is treated as a machine that rebooted: processes
# its old slurmd left behind are stopped, and the node is set DOWN, which makes slurmctld requeue
# (or fail) the jobs it still believes run there, exactly as after a real node failure. Without
# this, jobs recovered from saved state after a crash stay RUNNING forever on an empty node.
# RESUME then lets the node take work as soon as its new slurmd registers.
reboot_node() {
    local node=$1
    kill_node_leftovers "$node"
    scontrol update nodename="$node" state=down reason="slurmd restarted by up.sh" >/dev/null 2>&1 || true
    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
}

start_slurmd() {
    local node=$1
    reboot_node "$node"
    # unshare -m: a mount namespace of its own, inherited by every job step this node starts,
    # where /etc/hosts is the private copy naming n1 n2. The real /etc/hosts is left untouched.
    # shellcheck disable=SC2016  # $0 and $@ are expanded by that inner sh, not here
    start_daemon "slurmd-$node" unshare --mount --propagation private -- \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$ETC_DIR/hosts" \
        slurmd -D -N "$node" -f "$SLURM_CONF_FILE"
}

# Wait until every node is usable (idle, or running jobs recovered from saved state). A node
# left DRAIN/DOWN by a crash is resumed once: ReturnToService=2 only covers non-responding nodes.
wait_nodes() {
    local deadline=$((SECONDS + 60)) resume_at=$((SECONDS + 5)) resumed="" node state ready states
    while :; do
        states=$(sinfo -h -N -p "$PARTITION" -o '%N %t' 2>/dev/null || true)
        ready=1
        for node in "${NODES[@]}"; do
            is_running "slurmd-$node" || { show_logs "slurmd-$node"; die "slurmd for $node exited"; }
            state=$(awk -v n="$node" '$1 == n { print $2; exit }' <<<"$states")
            case $state in
                idle | mix | alloc | comp) ;;
                drain | drng | down)
                    ready=""
                    if [[ -z $resumed ]] && ((SECONDS >= resume_at)); then
                        log "node $node is $state: resuming it"
                        scontrol update nodename="$node" state=resume || true
                    fi
                    ;;
                *) ready="" ;;
            esac
        done
        [[ -n $ready ]] && break
        ((SECONDS < resume_at)) || resumed=1
        if ((SECONDS >= deadline)); then
            log "sinfo: $states"
            show_logs slurmctld "${NODES[@]/#/slurmd-}"
            die "timed out waiting for nodes ${NODES[*]} to become idle"
        fi
        sleep 0.2
    done
    # Record each node's mount namespace: down.sh finds that node's job processes by it.
    local pid ns
    for node in "${NODES[@]}"; do
        pid=$(recorded_pid "slurmd-$node")
        ns=$(readlink "/proc/$pid/ns/mnt")
        [[ $ns != "$(readlink /proc/self/ns/mnt)" ]] || die "slurmd for $node is not in its own mount namespace"
        grep -qxF "$ns" "$PID_DIR/slurmd-$node.mntns" 2>/dev/null || printf '%s\n' "$ns" >>"$PID_DIR/slurmd-$node.mntns"
    done
}

write_env() {
    write_file "$STATE_DIR/env.sh" 644 <<EOF
# Written by cluster/local/up.sh: source it to use the local SLURM cluster in $STATE_DIR.
# Clients (sbatch, srun, squeue, sacct, scancel, submitit) find the cluster through SLURM_CONF;
# they live in /usr/bin, already on PATH, so PATH needs no addition.
export SLURM_CONF=$SLURM_CONF_FILE
export SDTT_SLURM_STATE=$STATE_DIR
EOF
}

# --------------------------------------------------------------------------------------------------
main() {
    if all_running; then
        SUCCESS=1
        log "already up ($STATE_DIR); nothing to do"
        echo "SDTT_SLURM_STARTED="
        return 0
    fi
    ensure_packages
    local name
    for name in "${DAEMONS[@]}"; do is_running "$name" || clean_stale "$name"; done
    write_config
    is_running munged || start_munged
    is_running mariadbd || start_mariadbd
    is_running slurmdbd || start_slurmdbd
    register_accounting
    is_running slurmctld || start_slurmctld
    for name in "${NODES[@]}"; do is_running "slurmd-$name" || start_slurmd "$name"; done
    wait_nodes
    write_env
    SUCCESS=1
    log "cluster up in $((SECONDS - T0)) s; use it with: source $STATE_DIR/env.sh"
    sinfo -N -p "$PARTITION" >&2
    (
        IFS=,
        echo "SDTT_SLURM_STARTED=${STARTED[*]}"
    )
}

main
