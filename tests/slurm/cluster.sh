#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests: munge, slurmctld and slurmd as root, no cgroups.
#   tests/slurm/cluster.sh start DIR    write DIR/slurm.conf, start the daemons, wait for the node to be idle
#   tests/slurm/cluster.sh stop DIR     stop them
# Needs root and Debian's slurm-wlm and munge (.ci/run installs them). Use it with SLURM_CONF=DIR/slurm.conf.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there; a CI PATH may leave it out

action="${1:?start or stop}"
dir="${2:?state folder}"
conf="$dir/slurm.conf"

stop() {
    if [[ -f "$dir/slurmd.pid" ]]; then kill "$(cat "$dir/slurmd.pid")" 2>/dev/null || true; fi
    if [[ -f "$dir/slurmctld.pid" ]]; then kill "$(cat "$dir/slurmctld.pid")" 2>/dev/null || true; fi
}

if [[ "$action" == "stop" ]]; then
    stop
    exit 0
fi

for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "cannot start SLURM: $tool is not installed (apt-get install slurm-wlm munge)"; exit 3; }
done
if [[ "$(id -u)" != 0 ]]; then
    echo "cannot start SLURM: the test cluster runs its daemons as root"; exit 3
fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
host="$(hostname -s)"
cat > "$conf" <<CONF
ClusterName=mpifedtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

if ! pgrep -x munged >/dev/null; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
fi
stop
export SLURM_CONF="$conf"
slurmctld
slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qx idle; then
        echo "SLURM is up: $(sinfo -h -o '%P %D %c %T')"
        exit 0
    fi
    sleep 0.5
done
echo "cannot start SLURM: the node never became idle; see $dir/log"
tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" 2>/dev/null || true
exit 3
