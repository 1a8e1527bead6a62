#!/usr/bin/env bash
# The soft-RoCE CI stage (scripts/test.sh runs it after the host tests): meshpost's RDMA
# van on a real verbs stack, in QEMU guests with rdma_rxe. See docs/rdma.md.
#   1. one guest: rdma_test (incl. RdmaHardwareTest), the van conformance suite and the
#      device failure tests on rxe0, the integration scenarios with MESHPOST_TRANSPORT=rdma,
#      and meshpost_cluster_bench --transport rdma (1x1 AFD shape, 2x2, 4x4)
#   2. two guests on a virtual Ethernet link: 2x2 clusters split across them
#
# Usage: stage.sh [BUILD_DIR]   (default build/, built on this host by scripts/build.sh)
#   MESHPOST_SKIP_RDMA_VM=1          skip the stage (prints so)
#   MESHPOST_RDMA_VM_BUDGET=SECONDS  bound on the whole stage, image build included (default 2400)
#   MESHPOST_RDMA_VM_PARTS="one two" which parts to run
#   MESHPOST_RDMA_VM_CACHE=DIR       image cache (default /var/cache/meshpost-rdma-vm)
# Skips (exit 0, reason printed) where QEMU, root, the Debian archive or disk space for
# the image are missing; any test failure in a guest fails the stage.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO="$(cd "$RDMA_VM_DIR/../.." && pwd)"
BUILD="$(cd "${1:-$REPO/build}" 2>/dev/null && pwd)" || { echo "stage.sh: no build directory ${1:-$REPO/build}" >&2; exit 2; }
BUDGET="${MESHPOST_RDMA_VM_BUDGET:-2400}"
PARTS="${MESHPOST_RDMA_VM_PARTS:-one two}"
START=$SECONDS

skip() {
  echo "== RDMA VM stage SKIPPED: $*"
  exit 0
}
[[ "${MESHPOST_SKIP_RDMA_VM:-0}" == 1 ]] && skip "MESHPOST_SKIP_RDMA_VM=1"
case "$BUILD/" in "$REPO"/*) ;; *) echo "stage.sh: $BUILD is not inside $REPO (the guest sees only the repository)" >&2; exit 2 ;; esac
[[ -x "$BUILD/tests/rdma_test" ]] || skip "this build has no RDMA van ($BUILD/tests/rdma_test missing; libibverbs-dev?)"
if grep -q -- '-march=native' "$BUILD/CMakeCache.txt" 2>/dev/null; then
  echo "stage.sh: $BUILD was built with -march=native; the emulated CPU may lack its instructions" >&2
  exit 2
fi
why="$(rdma_vm_qemu_missing)"
[[ -z "$why" ]] && [[ $(uname -m) != x86_64 ]] && why="the guest image is x86_64 and this host is $(uname -m)"
[[ -z "$why" ]] || skip "$why"

t0=$SECONDS
bash "$RDMA_VM_DIR/build_image.sh"
rc=$?
((rc == RDMA_VM_UNAVAILABLE)) && skip "no guest image (see the reason above)"
((rc == 0)) || { echo "== RDMA VM stage FAILED: the guest image build failed (exit $rc)"; exit 1; }
image_s=$((SECONDS - t0))
echo "== RDMA VM stage: guest image ready in ${image_s} s ($(rdma_vm_image_dir))"

remaining() { echo $((BUDGET - (SECONDS - START))); }
report=()
status=0
run_part() {  # name seconds-wanted command...
  local name="$1" want="$2" left t0=$SECONDS rc
  shift 2
  left=$(remaining)
  if ((left < 120)); then
    echo "== RDMA VM stage: part '$name' not run: ${left} s of the ${BUDGET} s budget left"
    report+=("$name: not run (budget)")
    status=1
    return
  fi
  ((want > left)) && want=$left
  "$@" --timeout "$want"
  rc=$?
  report+=("$name: exit $rc in $((SECONDS - t0)) s")
  ((rc == 0)) || status=1
}
one_vm() {  # --timeout N
  bash "$RDMA_VM_DIR/run_vm.sh" --share "$REPO" "$1" "$2" -- \
    bash scripts/rdma_vm/guest_suite.sh "${BUILD#"$REPO"/}"
}
two_vm() {
  local rel="${BUILD#"$REPO"/}"
  bash "$RDMA_VM_DIR/two_vms.sh" --share "$REPO" "$1" "$2" -- \
    bash scripts/rdma_vm/guest_cross.sh "$rel" a -- bash scripts/rdma_vm/guest_cross.sh "$rel" b
}
for part in $PARTS; do
  case "$part" in
    one) run_part "one guest" 1800 one_vm ;;
    two) run_part "two guests" 600 two_vm ;;
    *) echo "stage.sh: unknown part '$part' in MESHPOST_RDMA_VM_PARTS" >&2; exit 2 ;;
  esac
done
echo "== RDMA VM stage: image ${image_s} s; ${report[*]/#/; }; total $((SECONDS - START)) s"
if ((status != 0)); then
  echo "== RDMA VM stage FAILED"
  exit 1
fi
echo "== RDMA VM stage passed"
