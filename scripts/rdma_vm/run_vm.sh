#!/usr/bin/env bash
# Boots the soft-RoCE guest (QEMU; KVM where a real kvm_intel/kvm_amd is loaded, else TCG
# emulation), runs one command in it as root and exits with that command's code.
#
# Usage: run_vm.sh [options] -- CMD [ARGS...]
#   --share DIR        share DIR read-write over 9p at the SAME absolute path (RPATHs and
#                      absolute paths in a build tree keep working); CMD runs in DIR
#   --name NAME        guest hostname (default meshpost-vm)
#   --ip ADDR/PREFIX   eth0 address (default 10.0.2.15/24)
#   --host "IP NAME"   extra /etc/hosts line (repeatable)
#   --link listen:SOCK | connect:SOCK
#                      eth0 is a point-to-point Ethernet link over a host unix socket
#                      (QEMU stream netdev) to another guest, instead of QEMU's user-mode
#                      network; listen creates SOCK, connect needs it to exist
#   --timeout SEC      bound on the whole run (default 600); CMD gets SEC-30 in the guest
#   --mem SIZE --smp N guest memory (default 3G) and vCPUs (default 2)
#   --tag TEXT         prefix for streamed output lines (default none)
# The guest's eth0 carries rxe0 (RoCE v2); CMD sees RDMA_VM_NAME, RDMA_VM_IP and
# RDMA_VM_DEV=rxe0, and `ulimit -l unlimited`.
# Exit: CMD's code; 124 the guest-side timeout hit; 125 the VM failed (console printed);
# 77 this host cannot run the VM (reason printed); 130 interrupted; 2 bad usage.
# Only the qemu and tail processes this script starts are ever signalled (by pid).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SHARE="" NAME=meshpost-vm IP=10.0.2.15/24 LINK="" TIMEOUT=600 MEM=3G SMP=2 TAG=""
HOSTS=()
usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | cut -c3- >&2; exit 2; }
while (($#)); do
  case "$1" in
    --share) SHARE="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --ip) IP="$2"; shift 2 ;;
    --host) HOSTS+=("$2"); shift 2 ;;
    --link) LINK="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --mem) MEM="$2"; shift 2 ;;
    --smp) SMP="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "run_vm.sh: unknown option '$1'" >&2; usage ;;
  esac
done
(($#)) || usage
[[ "$TIMEOUT" =~ ^[0-9]+$ && $TIMEOUT -ge 60 ]] || { echo "run_vm.sh: --timeout '$TIMEOUT': expected seconds >= 60" >&2; exit 2; }
[[ "$IP" == */* ]] || { echo "run_vm.sh: --ip '$IP': expected ADDR/PREFIX" >&2; exit 2; }
if [[ -n "$SHARE" ]]; then
  SHARE="$(cd "$SHARE" 2>/dev/null && pwd)" || { echo "run_vm.sh: --share: no such directory" >&2; exit 2; }
fi
why="$(rdma_vm_qemu_missing)"
[[ -z "$why" ]] || { rdma_vm_log "$why"; exit "$RDMA_VM_UNAVAILABLE"; }
bash "$RDMA_VM_DIR/build_image.sh"
rc=$?
((rc == 0)) || exit "$rc"
IMAGE="$(rdma_vm_image_dir)"

mkdir -p "$RDMA_VM_CACHE/runs"
RUN="$(mktemp -d "$RDMA_VM_CACHE/runs/$NAME.XXXXXX")"
cp "$RDMA_VM_DIR/guest_init.sh" "$RUN/guest_init.sh"
{
  printf 'VM_NAME=%q\nVM_IP=%q\nVM_PREFIX=%q\nVM_SHARE=%q\nVM_JOB_TIMEOUT=%q\n' \
    "$NAME" "${IP%/*}" "${IP#*/}" "$SHARE" "$((TIMEOUT - 30))"
  printf 'VM_HOSTS=('; printf ' %q' "${IP%/*} $NAME" "${HOSTS[@]}"; printf ' )\n'
} >"$RUN/vm.env"
{
  echo 'set -o pipefail'
  [[ -n "$SHARE" ]] && printf 'cd %q || exit 126\n' "$SHARE"
  printf 'exec'; printf ' %q' "$@"; printf '\n'
} >"$RUN/job.sh"
: >"$RUN/output.log"

# /dev/kvm here may be kvm_pvm (nested, PVM guests only), which hangs a stock kernel:
# only a real kvm_intel/kvm_amd counts.
if [[ -w /dev/kvm ]] && [[ -d /sys/module/kvm_intel || -d /sys/module/kvm_amd ]]; then
  ACCEL=(-enable-kvm -cpu host)
else
  ACCEL=(-accel tcg,thread=multi,tb-size=512 -cpu max)
fi
case "$LINK" in
  "") NET=(-netdev user,id=n0,restrict=on) ;;  # restrict: the guest reaches nothing outside
  listen:*) NET=(-netdev "stream,id=n0,server=on,addr.type=unix,addr.path=${LINK#listen:}") ;;
  connect:*) NET=(-netdev "stream,id=n0,server=off,addr.type=unix,addr.path=${LINK#connect:}") ;;
  *) echo "run_vm.sh: --link '$LINK': expected listen:PATH or connect:PATH" >&2; exit 2 ;;
esac
# no_timer_check: on a loaded host the emulated timer is slow enough for the kernel's IO-APIC
# timer check to fail ("IO-APIC + timer doesn't work!" panic at boot).
# Distinct MACs per guest name: two guests on one link must differ.
MAC="52:54:00:$(printf '%s' "$NAME" | md5sum | sed 's/^\(..\)\(..\)\(..\).*/\1:\2:\3/')"
QEMU=(
  qemu-system-x86_64 "${ACCEL[@]}" -m "$MEM" -smp "$SMP"
  -display none -monitor none -no-reboot -snapshot -nodefaults
  -serial "file:$RUN/console.log"
  -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img"
  -drive "file=$IMAGE/rootfs.ext4,format=raw,if=virtio"
  -append "root=/dev/vda rw console=ttyS0 net.ifnames=0 init=/sbin/meshpost-vm-init quiet loglevel=3 panic=-1 no_timer_check"
  "${NET[@]}" -device "virtio-net-pci,netdev=n0,mac=$MAC,romfile="
  -virtfs "local,path=$RUN,mount_tag=mpctl,security_model=none,id=mpctl"
)
[[ -n "$SHARE" ]] && QEMU+=(-virtfs "local,path=$SHARE,mount_tag=data,security_model=none,id=data")

QPID="" TPID=""
stop_children() {
  [[ -n "$QPID" ]] && kill "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null
  [[ -n "$TPID" ]] && kill "$TPID" 2>/dev/null && wait "$TPID" 2>/dev/null
  QPID="" TPID=""
}
finish() {
  stop_children
  if [[ "${MESHPOST_RDMA_VM_KEEP:-0}" == 1 ]]; then rdma_vm_log "kept $RUN"; else rm -rf --one-file-system "$RUN"; fi
}
trap finish EXIT
trap 'rdma_vm_log "$NAME: interrupted; stopping its VM"; exit 130' INT TERM

t0=$SECONDS
# timeout is the pid we hold; it forwards our kill to qemu and bounds a hung qemu.
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
if [[ -n "$TAG" ]]; then
  tail -n +1 -F --pid="$QPID" -s 0.5 "$RUN/output.log" 2>/dev/null | sed -u "s/^/$TAG /" &
else
  tail -n +1 -F --pid="$QPID" -s 0.5 "$RUN/output.log" 2>/dev/null &
fi
TPID=$!
wait "$QPID"
qrc=$?
QPID=""
wait "$TPID" 2>/dev/null
TPID=""
if [[ -f "$RUN/rc" ]]; then
  RC="$(cat "$RUN/rc")"
else
  RC=125
  [[ $qrc == 124 ]] && rdma_vm_log "$NAME: QEMU killed after ${TIMEOUT} s"
  rdma_vm_log "$NAME: no exit code from the guest (qemu exit $qrc); console and qemu log follow"
  tr -d '\r' <"$RUN/console.log" | tail -n 60 >&2
  tail -n 20 "$RUN/qemu.log" >&2
fi
rdma_vm_log "$NAME: exit $RC after $((SECONDS - t0)) s in the VM"
exit "$RC"
