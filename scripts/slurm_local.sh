#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine, for tests and CI: slurmctld plus two slurmd
# (n1, n2) on loopback ports, no munge, no accounting. Everything lives in DIR.
#
#   bash scripts/slurm_local.sh start DIR    # installs the Debian packages if missing (root)
#   export SLURM_CONF=DIR/slurm.conf         # for sbatch/srun/sinfo and Submitit
#   bash scripts/slurm_local.sh stop DIR     # cancels jobs, stops the daemons by PID, restores /etc/hosts
set -euo pipefail

cmd=${1:?usage: slurm_local.sh start|stop DIR}
dir=${2:?usage: slurm_local.sh start|stop DIR}
NODES=(n1 n2)
HOSTS_LINE="127.0.0.1 ${NODES[*]}  # scl-pretrain slurm_local.sh"

log() { echo "[slurm_local] $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
  [ "$(id -u)" = 0 ] || { log "slurmctld/slurmd/sbatch missing and not root: cannot install"; exit 3; }
  log "installing slurmctld slurmd slurm-client (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client >/dev/null
}

# /etc/hosts may be a bind mount: rewrite it in place rather than replacing the file.
hosts_add() {
  getent hosts "${NODES[0]}" >/dev/null && getent hosts "${NODES[1]}" >/dev/null && return
  echo "$HOSTS_LINE" >>/etc/hosts
}

hosts_remove() {
  grep -qxF "$HOSTS_LINE" /etc/hosts || return 0
  local kept
  kept=$(grep -vxF "$HOSTS_LINE" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
  local ports
  read -r -a ports <<<"$(free_ports 3)"
  local cpus mem host
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
  mkdir -p "$dir/state" "$dir/spool"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=scllocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=10
# A requeued job may start again cred_expire seconds later (default 120 s); schedule every 2 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmdLogFile=$dir/slurmd.%n.log
SlurmdSpoolDir=$dir/spool/%n
NodeName=DEFAULT CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[1]}
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[2]}
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_packages
  mkdir -p "$dir"
  write_config
  hosts_add
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF" -c
  for n in "${NODES[@]}"; do
    slurmd -f "$SLURM_CONF" -N "$n" -c
  done
  local deadline=$((SECONDS + 60)) states
  while :; do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    [ "$states" = "n1 idle n2 idle " ] && break
    if [ $SECONDS -ge $deadline ]; then
      log "nodes not idle after 60 s (sinfo: ${states:-no answer}); logs in $dir"
      tail -n 20 "$dir"/*.log >&2 || true
      stop
      exit 1
    fi
    sleep 0.5
  done
  log "cluster up: $states(SLURM_CONF=$SLURM_CONF)"
}

stop() {
  export SLURM_CONF=$dir/slurm.conf
  if [ -f "$SLURM_CONF" ] && scancel --partition=debug >/dev/null 2>&1; then
    local deadline=$((SECONDS + 30))
    while [ -n "$(squeue -h -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  fi
  local f pid
  for f in "$dir"/slurmd.*.pid "$dir"/slurmctld.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  hosts_remove
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_local.sh start|stop DIR" >&2; exit 2 ;;
esac
