# Shared settings for the soft-RoCE VM tooling (sourced, not run). See docs/rdma.md.
#
#   MESHPOST_RDMA_VM_CACHE   image cache (default /var/cache/meshpost-rdma-vm; outside the
#                            repository so `git clean` and fresh checkouts keep it)
#
# Exit code every script here uses for "this host cannot run the VM" (no QEMU, no root
# for the image build, no Debian mirror, no disk space). Callers turn it into a printed
# skip; every other non-zero code is a real failure.
readonly RDMA_VM_UNAVAILABLE=77

RDMA_VM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RDMA_VM_CACHE="${MESHPOST_RDMA_VM_CACHE:-/var/cache/meshpost-rdma-vm}"

rdma_vm_log() { echo "[rdma-vm] $*" >&2; }

# Prints why QEMU cannot run here, or nothing when it can.
rdma_vm_qemu_missing() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo "qemu-system-x86_64 is not installed (Debian: qemu-system-x86)"; return; }
  command -v timeout >/dev/null 2>&1 || { echo "coreutils timeout is missing"; return; }
  return 0
}

# The image directory for the current package list and build script, and its files.
rdma_vm_image_dir() {
  echo "$RDMA_VM_CACHE/image-$(bash "$RDMA_VM_DIR/build_image.sh" --print-key)"
}
