#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, for the `slurm` tests and for trying the
# profile without a cluster.
#
#   scripts/slurm_local.sh start    # install (Debian packages) if needed, configure, start
#   scripts/slurm_local.sh status   # sinfo
#   scripts/slurm_local.sh stop     # stop the daemons (configuration and job record stay)
#
# Needs root (apt-get, daemons). No systemd and no cgroups: the daemons run in the
# foreground-less classic way, processes tracked by /proc. The node advertises one GPU gres
# backed by /dev/null, so jobs asking for `--gpus=1` are accepted and scheduled; nothing runs
# on a real GPU. Every finished job is appended to $SLURM_JOBCOMP (jobcomp/filetxt), the record
# the tests read back: slurmdbd/sacct are not set up, so Snakemake polls with squeue.
set -euo pipefail

CONF_DIR=/etc/slurm
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
JOBCOMP=${SLURM_JOBCOMP:-$LOG_DIR/jobcomp.txt}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
# memory the node offers: 90% of the machine, in MB
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)}
HOST=$(hostname -s)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm_local.sh: run as root (it installs packages and starts daemons)" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    echo "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

configure() {
    mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOG_DIR" /run/munge /run/slurm /var/log/munge
    chown -R munge:munge /run/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    cat >"$CONF_DIR/slurm.conf" <<EOF
# written by facelora scripts/slurm_local.sh: one node, localhost
ClusterName=facelora-local
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# no systemd/cgroups in containers: track processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default one job would take all the node's memory
DefMemPerCPU=1024
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
# keep finished jobs (their TresPerJob, Comment) visible to scontrol for an hour, and
# append each to a text record
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
    # a gres with a File is accepted by the scheduler; a Count-only gpu gres drains the node
    echo "NodeName=$HOST Name=gpu File=/dev/null" >"$CONF_DIR/gres.conf"
    echo "ConstrainCores=no" >"$CONF_DIR/cgroup.conf"
}

start() {
    need_root
    install
    stop_daemons quiet
    configure
    runuser -u munge -- /usr/sbin/munged
    slurmctld -c
    slurmd
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
            sinfo
            return
        fi
        sleep 0.5
    done
    echo "slurm_local.sh: the node did not come up; see $LOG_DIR/slurmctld.log and slurmd.log" >&2
    sinfo -R >&2 || true
    exit 1
}

stop_daemons() {
    for daemon in slurmd slurmctld munged; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    for _ in $(seq 1 20); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null \
            || pgrep -x munged >/dev/null || break
        sleep 0.25
    done
    [ "${1:-}" = quiet ] || echo "slurm stopped"
}

case "${1:-}" in
start) start ;;
stop)
    need_root
    stop_daemons
    ;;
status) sinfo ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
