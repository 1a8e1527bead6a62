#!/usr/bin/env bash
# slurm_local.sh: a throwaway Slurm cluster on this one machine, for meshpost's tests.
#
#   bash scripts/slurm_local/slurm_local.sh CMD [ARGS...]
#
# Starts munged, slurmctld and $SLURM_LOCAL_NODES slurmd "nodes" (n1..nN, every one on
# 127.0.0.1 with its own port; Debian's slurmd runs several per host with -N) from a temp
# directory, runs CMD with SLURM_CONF exported (so it can call srun, sbatch, scontrol),
# then stops everything it started, by pid, also on failure, Ctrl-C or timeout.
#
# The node names resolve to 127.0.0.1 through a private mount namespace in which /etc/hosts
# is a bind-mounted copy (the machine's file is never touched).
#
# Exit codes: CMD's; 77 when Slurm cannot run here (not root, not installed, the daemons
# do not come up): the caller reports a skip with the reason printed on stderr.
#
# Knobs: SLURM_LOCAL_NODES (2), SLURM_LOCAL_CPUS per node (4), SLURM_LOCAL_TIMEOUT for CMD
# in seconds (300), SLURM_LOCAL_START_TIMEOUT (60), SLURM_LOCAL_KEEP=1 keeps the directory.
set -euo pipefail

say() { echo "slurm_local: $*" >&2; }
cannot() { say "cannot run Slurm here: $*"; exit 77; }

[[ $# -gt 0 ]] || { say "usage: slurm_local.sh CMD [ARGS...]"; exit 2; }
[[ $(id -u) -eq 0 ]] || cannot "needs root (slurmd runs job steps as the submitting user)"
for tool in slurmctld slurmd srun sbatch scontrol sinfo munged unshare; do
  command -v "$tool" >/dev/null || cannot "'$tool' is not installed (Debian: slurm-wlm munge)"
done

if [[ -z "${_SLURM_LOCAL_NS:-}" ]]; then
  unshare -m --propagation private true 2>/dev/null ||
    cannot "a private mount namespace is not permitted (needed for node names)"
  exec env _SLURM_LOCAL_NS=1 unshare -m --propagation private bash "$0" "$@"
fi

nodes=${SLURM_LOCAL_NODES:-2}
cpus=${SLURM_LOCAL_CPUS:-4}
cmd_timeout=${SLURM_LOCAL_TIMEOUT:-300}
start_timeout=${SLURM_LOCAL_START_TIMEOUT:-60}

# A Slurm job around us must not leak into the private cluster.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^SLURM_' | grep -v '^SLURM_LOCAL_' || true)

dir=$(mktemp -d -t meshpost-slurm.XXXXXX)
chmod 755 "$dir"
mkdir -p "$dir"/{state,spool,log,run,munge}
chmod 755 "$dir/munge"
export SLURM_CONF="$dir/slurm.conf"
daemons=()
status=1

stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

teardown() {
  local rc=$? i pid
  set +e
  trap - EXIT INT TERM
  [[ -n "${cmd_pid:-}" ]] && stop_pid "$cmd_pid"
  if [[ -n "${ctld_pid:-}" ]] && kill -0 "$ctld_pid" 2>/dev/null; then
    timeout 10 scancel --quiet --partition=local >/dev/null 2>&1
  fi
  # Step daemons of this cluster: found by their open files under our directory.
  for pid in $(pgrep -x slurmstepd 2>/dev/null); do
    ls -l "/proc/$pid/fd" 2>/dev/null | grep -q "$dir/" && stop_pid "$pid"
  done
  for (( i=${#daemons[@]}-1; i>=0; i-- )); do stop_pid "${daemons[$i]}"; done
  if [[ $rc -ne 0 && $rc -ne 77 ]]; then
    say "exit $rc; last daemon log lines:"
    for f in "$dir"/log/*; do
      [[ -s $f ]] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
    done
  fi
  umount /etc/hosts 2>/dev/null
  [[ "${SLURM_LOCAL_KEEP:-0}" == 1 ]] && say "kept $dir" || rm -rf "$dir"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free ports below the ephemeral range, judged from /proc/net (a probe connection would be
# logged by slurmctld as a protocol error).
in_use() {
  local hex
  hex=$(printf ':%04X' "$1")
  awk -v p="$hex" 'substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
ports=()
port=$(( 21000 + RANDOM % 9000 ))
while (( ${#ports[@]} <= nodes )); do
  in_use "$port" || ports+=("$port")
  port=$(( port + 1 ))
  (( port < 32000 )) || port=21000
done

# munge: Slurm's credentials between slurmctld, slurmd and srun.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$dir/munge/munge.key"
munged --foreground --force --socket="$dir/munge/socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/pid" --log-file="$dir/log/munged.log" \
  --seed-file="$dir/munge/seed" >"$dir/log/munged.out" 2>&1 &
daemons+=($!)
for _ in $(seq 100); do [[ -S "$dir/munge/socket" ]] && break; sleep 0.1; done
[[ -S "$dir/munge/socket" ]] || cannot "munged did not start ($(tail -n 3 "$dir/log/munged.out"))"

names=()
for n in $(seq "$nodes"); do names+=("n$n"); mkdir -p "$dir/spool/n$n"; done
node_csv=$(IFS=,; echo "${names[*]}")
cat >"$SLURM_CONF" <<CONF
ClusterName=meshpost
SlurmctldHost=localhost
SlurmctldPort=${ports[0]}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
# No cgroups and no accounting: runs in containers without delegated cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
CONF
for n in $(seq "$nodes"); do
  echo "NodeName=n$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=${ports[$n]} CPUs=$cpus State=UNKNOWN" >>"$SLURM_CONF"
done
echo "PartitionName=local Nodes=$node_csv Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >>"$SLURM_CONF"

{ cat /etc/hosts; echo "127.0.0.1 ${names[*]}"; } >"$dir/hosts"
mount --bind "$dir/hosts" /etc/hosts

slurmctld -D -i -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
ctld_pid=$!
daemons+=("$ctld_pid")
for n in "${names[@]}"; do
  slurmd -D -N "$n" -f "$SLURM_CONF" >"$dir/log/slurmd-$n.out" 2>&1 &
  daemons+=($!)
done
deadline=$(( SECONDS + start_timeout ))
until [[ $(timeout 10 sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -ge $nodes ]]; do
  for pid in "${daemons[@]}"; do
    kill -0 "$pid" 2>/dev/null ||
      cannot "a Slurm daemon (pid $pid) exited during startup: $(tail -n 3 "$dir"/log/*.out | tr '\n' ' ')"
  done
  (( SECONDS < deadline )) || cannot "the $nodes nodes were not idle after ${start_timeout}s"
  sleep 0.2
done
say "up: $nodes nodes ($node_csv), $cpus CPUs each, SLURM_CONF=$SLURM_CONF"
export SLURM_LOCAL_DIR=$dir

# In the background with `wait`, so a TERM/INT reaches the trap at once.
timeout --kill-after=10 "$cmd_timeout" "$@" </dev/null &
cmd_pid=$!
set +e
wait "$cmd_pid"
status=$?
set -e
cmd_pid=
(( status != 124 )) || say "CMD timed out after ${cmd_timeout}s"
exit "$status"
