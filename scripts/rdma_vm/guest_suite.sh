#!/usr/bin/env bash
# Runs INSIDE the soft-RoCE guest (run_vm.sh --share REPO -- bash scripts/rdma_vm/guest_suite.sh
# BUILD_DIR [STEP...]), from the repository root: the RDMA tests of a host build on the real
# verbs stack (rxe0). A test that skips here for lack of a device is a failure: the device
# is the point. Steps (default: all, in this order):
#   unit         rdma_test, including RdmaHardwareTest
#   conformance  the van conformance suite on the device (RdmaDevice/*)
#   cluster      the multi-process integration scenarios with MESHPOST_TRANSPORT=rdma
#   failure      device failure tests: stale MR after free + remap at the same address, peer
#                restart, small memlock limit (the killed-peer cases are in `cluster`)
#   bench        meshpost_cluster_bench --transport rdma (1x1 AFD shape; 2x2 and 4x4 with 64 KiB)
#   python       the Python suite's transport-dependent tests (PYTHON_TESTS below: clusters that
#                move data) with MESHPOST_TRANSPORT=rdma, from the host's .venv
#                (scripts/test_python.sh builds it; Debian's python3 and torch 1.13 on both
#                sides, so the guest imports the same extension). Under emulation each test
#                costs about a minute (every process imports torch), so the whole suite does
#                not fit the stage; MESHPOST_RDMA_VM_PYTEST_ARGS=" " in the guest runs all of it.
set -uo pipefail
BUILD="${1:?usage: guest_suite.sh BUILD_DIR [STEP...]}"
shift
STEPS=("$@")
((${#STEPS[@]})) || STEPS=(unit conformance failure cluster bench python)
LOGS="$(mktemp -d /tmp/suite.XXXXXX)"
failed=()

# Runs a gtest binary; fails on a non-zero exit or on any skipped test.
gtest() {  # name binary args...
  local name="$1"
  shift
  local log="$LOGS/$name.log" t0=$SECONDS rc
  echo "== [$name] $*"
  timeout -k 10 "${STEP_TIMEOUT:-600}" "$@" --gtest_brief=1 >"$log" 2>&1
  rc=$?
  cat "$log"
  if ((rc == 0)) && grep -q '^\[  SKIPPED \]' "$log"; then
    echo "== [$name] FAIL: tests skipped on a host that has rxe0"
    rc=1
  fi
  local passed
  passed=$(grep -o '^\[  PASSED  \] [0-9]* test' "$log" | grep -o '[0-9]*' || echo 0)
  echo "== [$name] exit $rc, ${passed} tests passed, $((SECONDS - t0)) s"
  ((rc == 0)) || failed+=("$name")
}

step_unit() {
  # The one test that expects *no* device is excluded; it skips by design here.
  gtest unit "$BUILD/tests/rdma_test" --gtest_filter='-RdmaAvailabilityTest.VanBindReportsMissingDeviceAsStatus'
}
step_conformance() {
  gtest conformance "$BUILD/tests/van_conformance_test" --gtest_filter='RdmaDevice/*'
}
step_cluster() {
  # Heartbeats arrive seconds late under emulation: only a real death should count.
  MESHPOST_ITEST_HEARTBEAT_TIMEOUT_MS=15000 STEP_TIMEOUT=1200 gtest cluster "$BUILD/tests/integration_test" --gtest_filter='Transports/ClusterTest.*/rdma:-*LargeOrdinaryPushesTravelFromASharedCopy*'
}
step_failure() {
  gtest failure "$BUILD/tests/van_conformance_test" --gtest_filter='RdmaDeviceTest.*:RdmaDeviceMemlockTest.*'
}
step_bench() {
  local t0=$SECONDS rc=0 out
  for args in "--workers 1 --servers 1 --push 917504 --push-extra 16 --pull 1835008 --iters 20 --warmup 2" \
              "--workers 2 --servers 2 --push 65536 --push-extra 0 --pull 65536 --iters 50 --warmup 5" \
              "--workers 4 --servers 4 --push 65536 --push-extra 0 --pull 65536 --iters 20 --warmup 2"; do
    echo "== [bench] meshpost_cluster_bench --transport rdma $args"
    # shellcheck disable=SC2086
    out=$(MESHPOST_HEARTBEAT_TIMEOUT_MS=30000 timeout -k 10 300 "$BUILD/meshpost_cluster_bench" --transport rdma $args 2>"$LOGS/bench.err")
    local r=$?
    echo "$out"
    if ((r != 0)) || ! grep -q '"meshpost-cluster-rdma"' <<<"$out" || grep -q '"transports": {[^}]*"\(tcp\|cma\)' <<<"$out"; then
      cat "$LOGS/bench.err"
      echo "== [bench] FAIL (exit $r): no rdma result"
      rc=1
    fi
  done
  echo "== [bench] exit $rc, $((SECONDS - t0)) s (TCG emulation: the numbers say nothing about performance)"
  ((rc == 0)) || failed+=(bench)
}

# One test per thing rdma changes under Python: routing across servers, receive buffers
# written in place, a dead peer, and the StepMesh program. Micro-batches, changing rows and
# respond_vec are ps-layer logic the host runs over cma and tcp; under emulation each costs
# a minute or more, and CI's whole budget is an hour (docs/rdma.md).
PYTHON_TESTS=(
  test_cluster.py::test_routing_2x2_and_get_batch_order
  test_cluster.py::test_register_recv_buffer_in_place
  test_cluster.py::test_killed_server_fails_worker_wait
  test_stepmesh_compat.py::test_stepmesh_program_runs_unchanged_1x1_and_2x2
)
step_python() {
  local t0=$SECONDS rc
  local pkg=(.venv/lib/python3*/site-packages/meshpost)  # importing it costs a minute here
  if [[ ! -x .venv/bin/python || ! -d ${pkg[0]} ]]; then
    echo "== [python] FAIL: no usable .venv with meshpost (scripts/test_python.sh builds it on the host)"
    failed+=(python)
    return
  fi
  echo "== [python] pytest with MESHPOST_TRANSPORT=rdma"
  # Heartbeats arrive seconds late and torch imports take tens of seconds under emulation
  # (conftest reads both overrides).
  # shellcheck disable=SC2086
  (cd tests/python && MESHPOST_TRANSPORT=rdma MESHPOST_PYTEST_HEARTBEAT_TIMEOUT_MS=15000 \
     MESHPOST_PYTEST_TIMEOUT_SCALE=4 \
     timeout -k 10 "${PYTHON_TIMEOUT:-1200}" ../../.venv/bin/python -m pytest -q -rs -p no:cacheprovider \
     ${MESHPOST_RDMA_VM_PYTEST_ARGS:-${PYTHON_TESTS[*]}})
  rc=$?
  echo "== [python] exit $rc, $((SECONDS - t0)) s"
  ((rc == 0)) || failed+=(python)
}

echo "== guest $(hostname): $(uname -r), $(nproc) vCPUs"
ibv_devinfo -d rxe0 | grep -E 'hca_id|state|link_layer|active_mtu' || failed+=(device)
for s in "${STEPS[@]}"; do
  case "$s" in
    unit | conformance | cluster | failure | bench | python) "step_$s" ;;
    *) echo "guest_suite.sh: unknown step '$s'"; failed+=("$s") ;;
  esac
done
if ((${#failed[@]})); then
  echo "== guest suite FAILED: ${failed[*]}"
  exit 1
fi
echo "== guest suite passed: ${STEPS[*]}"
