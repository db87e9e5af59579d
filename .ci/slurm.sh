#!/usr/bin/env bash
# A one-node SLURM on this machine, for the tests marked `slurm` and for trying `--cluster slurm`:
#
#   .ci/slurm.sh start DIR   install slurm-wlm and munge with apt when missing (as root), then run
#                            munged, slurmctld and slurmd with everything under DIR (config, key,
#                            sockets, state, logs, free ports), and wait for the node to be idle;
#                            prints the line to source: export SLURM_CONF=DIR/slurm.conf
#   .ci/slurm.sh stop DIR    stop those daemons by the pids in DIR
#
# Nothing outside DIR is written but the packages, so several clusters (one per test session)
# can run side by side. Settings that work here as root without cgroups: docs/clusters.md.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(realpath -m "$2")

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f "$dir/$name.pid" ]] || continue
    pid=$(cat "$dir/$name.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null && return
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "SLURM is not installed and cannot be: installing slurm-wlm and munge needs root and apt" >&2
    exit 3
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "a one-node SLURM without cgroups runs its daemons as root here; this is uid $(id -u)" >&2
    exit 3
  fi
  install
  mkdir -p "$dir"/{munge,state,spool,log}
  chmod 755 "$dir"
  # munge: its own key and socket in DIR (munged runs as the munge user, never as root)
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir/munge"
  chmod 755 "$dir/munge"  # clients need to reach the socket
  chmod 400 "$dir/munge/munge.key"
  local socket="$dir/munge/munge.socket"
  runuser -u munge -- munged --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  cp "$dir/munge/munged.pid" "$dir/munged.pid"
  munge --socket="$socket" -n | unmunge --socket="$socket" >/dev/null

  local host cpus memory
  host=$(hostname -s)
  cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))  # at least 4: tests' jobs mostly wait, on a gate
  memory=$(awk '/MemTotal/ { print int($2 / 1024 * 0.8) }' /proc/meminfo)
  cat >"$dir/slurm.conf" <<EOF
ClusterName=atlas-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=2
MinJobAge=30
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 150); do
    if [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return
    fi
    sleep 0.2
  done
  echo "the SLURM node did not become idle in 30 s; logs in $dir/log" >&2
  sinfo -N >&2 || true
  stop
  exit 1
}

case $action in
  start) trap 'stop' ERR; start ;;  # a daemon that fails to start: stop those that did
  stop) stop ;;
  *) usage ;;
esac
