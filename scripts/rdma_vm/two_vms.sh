#!/usr/bin/env bash
# Two soft-RoCE guests, meshpost-a (10.77.0.1) and meshpost-b (10.77.0.2), joined by a
# virtual Ethernet link (QEMU stream netdev over a unix socket on this host: no TCP port,
# nothing outside the two guests can reach it). Each has its own rxe0 on that link, so
# RDMA between them leaves the guest as RoCE v2 packets, as between two real hosts.
#
# Usage: two_vms.sh [--timeout SEC] [--share DIR] -- CMD_A... -- CMD_B...
#   CMD_A runs in meshpost-a, CMD_B in meshpost-b, both in DIR (default: the repository).
# Exit: 0 when both commands exit 0; 77 the host cannot run the VMs; else the first failure.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TIMEOUT=600 SHARE="$(cd "$RDMA_VM_DIR/../.." && pwd)"
while (($#)); do
  case "$1" in
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --share) SHARE="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "two_vms.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done
CMD_A=() CMD_B=()
while (($#)) && [[ "$1" != -- ]]; do CMD_A+=("$1"); shift; done
(($#)) && shift
CMD_B=("$@")
((${#CMD_A[@]} && ${#CMD_B[@]})) || { echo "two_vms.sh: need -- CMD_A... -- CMD_B..." >&2; exit 2; }

# Build (or find) the image once, before two runs race for the lock.
why="$(rdma_vm_qemu_missing)"
[[ -z "$why" ]] || { rdma_vm_log "$why"; exit "$RDMA_VM_UNAVAILABLE"; }
bash "$RDMA_VM_DIR/build_image.sh"
rc=$?
((rc == 0)) || exit "$rc"

LINKDIR="$(mktemp -d "${TMPDIR:-/tmp}/meshpost-link.XXXXXX")"
SOCK="$LINKDIR/link.sock"
PID_A="" PID_B=""
cleanup() {
  for p in $PID_A $PID_B; do kill "$p" 2>/dev/null; done
  for p in $PID_A $PID_B; do wait "$p" 2>/dev/null; done
  rm -rf "$LINKDIR"
}
trap cleanup EXIT
trap 'rdma_vm_log "two_vms: interrupted"; exit 130' INT TERM

hosts=(--host "10.77.0.1 meshpost-a" --host "10.77.0.2 meshpost-b")
bash "$RDMA_VM_DIR/run_vm.sh" --name meshpost-a --ip 10.77.0.1/24 "${hosts[@]}" --mem 2G \
  --link "listen:$SOCK" --share "$SHARE" --timeout "$TIMEOUT" --tag "[a]" -- "${CMD_A[@]}" &
PID_A=$!
# The listening side creates the socket when its QEMU starts; the other side needs it.
for _ in $(seq 300); do
  [[ -S "$SOCK" ]] && break
  kill -0 "$PID_A" 2>/dev/null || break
  sleep 0.2
done
if [[ ! -S "$SOCK" ]]; then
  wait "$PID_A"
  rc=$?
  PID_A=""
  rdma_vm_log "two_vms: meshpost-a did not open the link (exit $rc)"
  exit $((rc == 0 ? 125 : rc))
fi
bash "$RDMA_VM_DIR/run_vm.sh" --name meshpost-b --ip 10.77.0.2/24 "${hosts[@]}" --mem 2G \
  --link "connect:$SOCK" --share "$SHARE" --timeout "$TIMEOUT" --tag "[b]" -- "${CMD_B[@]}" &
PID_B=$!
wait "$PID_A"
rc_a=$?
PID_A=""
wait "$PID_B"
rc_b=$?
PID_B=""
rdma_vm_log "two_vms: meshpost-a exit $rc_a, meshpost-b exit $rc_b"
((rc_a != 0)) && exit "$rc_a"
exit "$rc_b"
