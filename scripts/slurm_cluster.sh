#!/usr/bin/env bash
# A local one-node SLURM cluster (Debian's slurm-wlm + munge) for trying and testing
# `tprobe extract --executor slurm`. Run as root on Debian/Ubuntu.
#
#   scripts/slurm_cluster.sh start    # install packages if missing, write slurm.conf, start daemons
#   scripts/slurm_cluster.sh status   # exit 0 when the node answers and is usable
#   scripts/slurm_cluster.sh stop     # stop the daemons this script started (by their pid files)
#
# Config, state, spool, logs and pid files live under $TPROBE_SLURM_DIR (default /tmp/tprobe-slurm).
# The config is also copied to /etc/slurm/slurm.conf when that file is absent or was written by this
# script, so plain `sinfo`/`sbatch` find it; otherwise `export SLURM_CONF=$TPROBE_SLURM_DIR/slurm.conf`.
# Exit status: 0 ok; 1 the cluster did not come up (the reason and log tails are printed);
# 3 the packages are missing and cannot be installed (not root / no apt-get).
set -euo pipefail

DIR=${TPROBE_SLURM_DIR:-/tmp/tprobe-slurm}
CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MARK="# written by tprobe scripts/slurm_cluster.sh"
WAIT_S=${TPROBE_SLURM_WAIT:-90}
export SLURM_CONF=$CONF

say() { echo "slurm_cluster: $*" >&2; }

# alive PIDFILE: its process runs and is the daemon the file is named after (not a reused pid)
alive() {
    local pid
    [[ -f $1 ]] && pid=$(cat "$1") && [[ -n $pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$(basename "$1" .pid)" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sinfo >/dev/null; then
        return 0
    fi
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        say "slurm-wlm/munge are not installed and this is not root on a Debian-like system; install them yourself"
        exit 3
    fi
    say "installing slurm-wlm and munge with apt-get (once)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || { say "apt-get update failed"; exit 3; }
    # policy-rc.d stops the packages' own service scripts starting daemons with the default config
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1; fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 || {
        [[ $created_policy == 1 ]] && rm -f "$policy"
        say "apt-get install slurm-wlm munge failed"; exit 3
    }
    [[ $created_policy == 1 ]] && rm -f "$policy"
    return 0
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # configure a little less memory than the node has, or slurmd drains it as "Low RealMemory"
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log,run}
    cat >"$CONF" <<EOF
$MARK
ClusterName=tprobe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
SchedulerType=sched/backfill
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ ! -e $ETC_CONF ]] || grep -qF "$MARK" "$ETC_CONF"; then
        mkdir -p "$(dirname "$ETC_CONF")" && cp "$CONF" "$ETC_CONF"
    else
        say "$ETC_CONF exists and is not ours: left alone; export SLURM_CONF=$CONF before sinfo/sbatch"
    fi
}

start_munge() {
    local key=/etc/munge/munge.key pidfile=/run/munge/munged.pid
    if alive "$pidfile"; then return 0; fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    if [[ ! -s $key ]]; then
        say "creating a munge key at $key"
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown "$user:$user" "$key" /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0400 "$key"
    chmod 0700 /etc/munge
    if [[ $user == munge ]]; then
        runuser -u munge -- munged --pid-file="$pidfile"
    else
        munged --force --pid-file="$pidfile"
    fi
    touch "$DIR/run/munged.ours"  # stop only a munged this script started
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

start() {
    install_packages
    if status_quiet; then say "already running ($(node_state))"; return 0; fi
    write_conf
    start_munge
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
    local end=$((SECONDS + WAIT_S)) state=""
    while ((SECONDS < end)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated) say "up: node $(hostname -s) $state ($(nproc) CPUs); SLURM_CONF=$CONF"; return 0 ;;
            drain* | down*) scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    say "the node did not become idle within ${WAIT_S}s (state: '${state:-no answer from slurmctld}')"
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log; do
        [[ -f $f ]] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

status_quiet() {
    alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" || return 1
    case $(node_state) in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

status() {
    if status_quiet; then
        sinfo
        say "up; SLURM_CONF=$CONF"
    else
        say "not running (state: '$(node_state)')"
        exit 1
    fi
}

stop_pid() {  # stop_pid NAME PIDFILE
    local pid
    if ! alive "$2"; then rm -f "$2"; return 0; fi
    pid=$(cat "$2")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then say "$1 ($pid) ignored SIGTERM; killing it"; kill -9 "$pid"; fi
    rm -f "$2"
    say "stopped $1"
}

stop() {
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    if [[ -f $DIR/run/munged.ours ]]; then
        stop_pid munged /run/munge/munged.pid
        rm -f "$DIR/run/munged.ours"
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state under \$TPROBE_SLURM_DIR, default /tmp/tprobe-slurm)" >&2; exit 2 ;;
esac
