#!/usr/bin/env bash
# Runs INSIDE one of the two guests of two_vms.sh, from the repository root:
#   guest_cross.sh BUILD_DIR a|b [SCENARIO...]   (default: all below; both sides must agree)
# One 2x2 cluster per scenario, split across the guests: guest a runs the scheduler,
# server 0 and worker 0; guest b runs server 1 and worker 1. DMLC_ENABLE_RDMA=1, as a
# StepMesh launch sets it, and no transport forced, so each pair picks its own: same guest
# -> cma (same-host van), across -> rdma (rxe0 on the link between the guests). The sum
# scenario asserts exactly that per peer.
# The scheduler's port is fixed: the link is private to the two guests.
set -uo pipefail
BUILD="${1:?usage: guest_cross.sh BUILD_DIR a|b}"
SIDE="${2:?usage: guest_cross.sh BUILD_DIR a|b}"
NODE="$BUILD/tests/meshpost_itest_node"
SCHED_IP=10.77.0.1
# Scenario and the process (role:rank) that kills itself in it, if any.
SCENARIOS=(sum:- microbatch:- dtypes:- recvbuf:- barrier:- timeout:- badinput:- idle:- kill:server:1 killwrites:server:1)
if (($# > 2)); then
  wanted=" ${*:3} " kept=()
  for s in "${SCENARIOS[@]}"; do [[ "$wanted" == *" ${s%%:*} "* ]] && kept+=("$s"); done
  SCENARIOS=("${kept[@]}")
fi
MY_IP="$RDMA_VM_IP"
failed=()

common_env=(
  DMLC_PS_ROOT_URI="$SCHED_IP" DMLC_NUM_WORKER=2 DMLC_NUM_SERVER=2 DMLC_NODE_HOST="$MY_IP" DMLC_ENABLE_RDMA=1
  MESHPOST_HEARTBEAT_INTERVAL_MS=1000 MESHPOST_HEARTBEAT_TIMEOUT_MS=15000  # late under emulation
  MESHPOST_START_TIMEOUT_MS=120000
)
if [[ $SIDE == a ]]; then
  procs=(scheduler:0 server:0 worker:0)
  peer_transports="server 0=cma;server 1=rdma"
else
  procs=(server:1 worker:1)
  peer_transports="server 0=rdma;server 1=cma"
fi

for i in "${!SCENARIOS[@]}"; do
  scenario="${SCENARIOS[$i]%%:*}"
  victim="${SCENARIOS[$i]#*:}"
  port=$((9100 + i))
  t0=$SECONDS
  pids=() names=()
  for p in "${procs[@]}"; do
    role="${p%%:*}" rank="${p#*:}"
    env "${common_env[@]}" DMLC_ROLE="$role" DMLC_NODE_RANK="$rank" DMLC_PS_ROOT_PORT="$port" \
      MESHPOST_ITEST_SCENARIO="$scenario" MESHPOST_ITEST_PEER_TRANSPORTS="$peer_transports" \
      timeout -k 5 240 "$NODE" >"/tmp/$scenario.$role$rank.log" 2>&1 &
    pids+=($!) names+=("$p")
  done
  bad=0
  for j in "${!pids[@]}"; do
    wait "${pids[$j]}"
    rc=$?
    # The victim kills itself with SIGKILL (137 through timeout's exit status).
    if [[ "${names[$j]}" == "$victim" ]]; then
      [[ $rc == 137 ]] || { echo "-- $scenario ${names[$j]}: exit $rc, expected SIGKILL"; bad=1; }
    elif [[ $rc != 0 ]]; then
      echo "-- $scenario ${names[$j]}: exit $rc"
      bad=1
    fi
  done
  if ((bad)); then
    for p in "${procs[@]}"; do
      echo "---- $scenario ${p}: last lines"
      tail -n 25 "/tmp/$scenario.${p%%:*}${p#*:}.log"
    done
    failed+=("$scenario")
  fi
  echo "== [cross $SIDE] $scenario: $( ((bad)) && echo FAIL || echo ok) in $((SECONDS - t0)) s"
done
if [[ $SIDE == a ]]; then
  # The routing the sum scenario asserted, as the nodes logged it.
  grep -h ' via ' /tmp/sum.*.log | sed 's/^.*\] //' | sort -u | head -n 12
fi
if ((${#failed[@]})); then
  echo "== [cross $SIDE] FAILED: ${failed[*]}"
  exit 1
fi
echo "== [cross $SIDE] all ${#SCENARIOS[@]} scenarios passed"
