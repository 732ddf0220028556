#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, to try reproduce.py --slurm without a real cluster
# (the tests use it too). Needs Debian's slurm-wlm and munge packages and root:
#
#     apt-get install -y slurm-wlm munge
#     ./slurm_local_cluster.sh start /tmp/slurm      # prints the SLURM_CONF line to export
#     export SLURM_CONF=/tmp/slurm/slurm.conf
#     python3 reproduce.py ... --slurm
#     ./slurm_local_cluster.sh stop /tmp/slurm       # stops the daemons, removes the folder
#
# Everything lives in the folder: its own munge key and socket, slurm.conf (one node with this
# machine's CPUs, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, SelectType=select/cons_tres,
# no accounting), state, spool and logs. Nothing under /etc is touched.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")

stop() {
  for name in slurmd slurmctld munged; do
    if [ -f "$dir/$name.pid" ]; then
      pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
      [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || break; sleep 0.1; done
      [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$dir"
}

start() {
  for tool in munged mungekey slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; install with: apt-get install -y slurm-wlm munge" >&2; exit 2; }
  done
  [ "$(id -u)" -eq 0 ] || { echo "error: the local cluster's daemons run as root; run this as root" >&2; exit 2; }
  [ ! -e "$dir/slurm.conf" ] || { echo "error: $dir already holds a cluster; stop it first: $0 stop $dir" >&2; exit 2; }
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  mungekey --create --keyfile="$dir/munge.key" 2>/dev/null || dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
  chmod 600 "$dir/munge.key"
  munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
         --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"
  host=$(hostname -s)
  cpus=$(nproc --all)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  # ports from the folder's name, so that two clusters in two folders do not collide
  port=$(( 20000 + $(printf '%s' "$dir" | cksum | cut -d' ' -f1) % 20000 ))
  cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MessageTimeout=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 120); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "local Slurm cluster up: node $host, $cpus CPUs, state in $dir"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "error: the cluster did not come up within 60 s; logs in $dir/log" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
