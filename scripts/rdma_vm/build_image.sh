#!/usr/bin/env bash
# Builds (once) the Debian 12 guest image the soft-RoCE tests boot: a stock kernel with
# rdma_rxe, rdma-core, and the runtime libraries of a host build of meshpost. Cached in
# $MESHPOST_RDMA_VM_CACHE/image-<key>/{rootfs.ext4,vmlinuz,initrd.img}, where <key> hashes
# the package list and this script, so a change to either builds a new image and removes
# the old one. About 90 s and 1.5 GB of temporary disk; needs root and Debian's archive.
#
# Usage: build_image.sh [--force | --print-key]
# Exit: 0 image ready; 77 this host cannot build it (reason printed); other: build failed.
#
# The image holds only a tiny boot stub (/sbin/meshpost-vm-init) that mounts the run's
# control share and runs guest_init.sh from it, so changing the guest set-up does not
# rebuild the image.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=bookworm
PACKAGES=(
  # kernel (CONFIG_RDMA_RXE=m, 9p and virtio as modules, hence the initramfs) and base tools
  linux-image-amd64 initramfs-tools kmod iproute2 procps util-linux
  # verbs user space: the rxe provider lives in ibverbs-providers
  rdma-core ibverbs-providers ibverbs-utils libibverbs1 librdmacm1
  # what host-built meshpost binaries link against (gtest is static)
  libzmq5 libspdlog1.10 libfmt9 libstdc++6
  # the Python suite (MESHPOST_TRANSPORT=rdma): the host's .venv is built on Debian's
  # python3 and torch 1.13 (--system-site-packages), so the guest needs the same ones
  python3 python3-torch python3-numpy python3-pytest
)
KEY="$( (printf '%s\n' "$SUITE" "${PACKAGES[@]}"; cat "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
if [[ "${1:-}" == "--print-key" ]]; then
  echo "$KEY"
  exit 0
fi
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

IMAGE="$RDMA_VM_CACHE/image-$KEY"
image_ready() { [[ -f "$IMAGE/ready" && -f "$IMAGE/rootfs.ext4" && -f "$IMAGE/vmlinuz" && -f "$IMAGE/initrd.img" ]]; }
unavailable() { rdma_vm_log "cannot build the guest image: $*"; exit "$RDMA_VM_UNAVAILABLE"; }

if [[ $FORCE == 0 ]] && image_ready; then exit 0; fi
[[ $(id -u) == 0 ]] || unavailable "building needs root (debootstrap, chroot), and no cached image exists at $IMAGE"
for tool in debootstrap mkfs.ext4 chroot flock; do
  command -v "$tool" >/dev/null 2>&1 || unavailable "$tool is not installed (scripts/install_deps.sh installs debootstrap)"
done
mkdir -p "$RDMA_VM_CACHE" || unavailable "cannot create $RDMA_VM_CACHE"
free_mb=$(df -Pm "$RDMA_VM_CACHE" | awk 'NR==2{print $4}')
(( free_mb > 3000 )) || unavailable "only ${free_mb} MB free under $RDMA_VM_CACHE (3000 needed)"

exec 9>"$RDMA_VM_CACHE/.lock"
flock -w 900 9 || unavailable "another image build holds $RDMA_VM_CACHE/.lock for 15 minutes"
if [[ $FORCE == 0 ]] && image_ready; then exit 0; fi  # built by whoever held the lock

# The archive apt uses here (a dated snapshot on CI machines); no host name is stored.
find_mirror() {  # $1: "debian" or "debian-security"
  local want="$1" f u
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    for u in $(awk '/^URIs:/{for(i=2;i<=NF;i++)print $i}' "$f"); do
      [[ "${u%/}" == */"$want" ]] && { echo "${u%/}"; return 0; }
    done
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    u=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^(http|https|file):/){print $i; break}}' "$f" |
        sed 's#/$##' | grep -E "/$want\$" | head -n1 || true)
    [[ -n $u ]] && { echo "$u"; return 0; }
  done
  return 1
}
MIRROR="$(find_mirror debian)" || unavailable "no Debian mirror in /etc/apt sources"
SECURITY="$(find_mirror debian-security || true)"
# A missing network is a reason to skip; a failure after the archive answered is a bug.
if ! timeout 30 /usr/bin/python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20).read(64)' \
     "$MIRROR/dists/$SUITE/Release" >/dev/null 2>&1; then
  unavailable "the Debian archive $MIRROR does not answer (no network?)"
fi

WORK="$(mktemp -d "$RDMA_VM_CACHE/build.XXXXXX")"
ROOT="$WORK/rootfs"
unmount_chroot() {
  local m
  for m in "$ROOT/dev/pts" "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m"
  done
  return 0
}
cleanup() {
  unmount_chroot
  if grep -q " $ROOT/" /proc/mounts; then
    rdma_vm_log "mounts still active under $ROOT; leaving $WORK for inspection"
  else
    rm -rf --one-file-system "$WORK"
  fi
}
trap cleanup EXIT

t0=$SECONDS
rdma_vm_log "building the guest image $IMAGE from $MIRROR (about 90 s)"
if ! timeout 900 debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
  tail -n 30 "$WORK/debootstrap.log" >&2
  rdma_vm_log "debootstrap failed"
  exit 1
fi
{
  echo "deb $MIRROR $SUITE main"
  echo "deb $MIRROR $SUITE-updates main"
  [[ -n $SECURITY ]] && echo "deb $SECURITY $SUITE-security main"
} >"$ROOT/etc/apt/sources.list"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
# The initrd only has to mount the root disk: virtio block + ext4 (MODULES=list; "most"
# makes a 35 MB initrd that takes minutes to build and seconds to unpack under
# emulation). Everything else loads from the root filesystem. Built once, below, instead
# of by every package hook.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d"
echo "MODULES=list" >"$ROOT/etc/initramfs-tools/conf.d/meshpost-vm"
printf 'virtio_pci\nvirtio_blk\next4\n' >>"$ROOT/etc/initramfs-tools/modules"
mkdir -p "$ROOT/etc/initramfs-tools"
echo "update_initramfs=no" >"$ROOT/etc/initramfs-tools/update-initramfs.conf"
if ! timeout 900 chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive INITRD=No \
     sh -c "apt-get update -qq && apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-unsafe-io ${PACKAGES[*]} && apt-get clean &&
            mkinitramfs -o /boot/initrd.img-\$(ls /lib/modules | sort -V | tail -n1) \$(ls /lib/modules | sort -V | tail -n1)" \
     >"$WORK/apt.log" 2>&1; then
  tail -n 40 "$WORK/apt.log" >&2
  rdma_vm_log "apt-get install in the guest root failed"
  exit 1
fi
unmount_chroot
rm -rf --one-file-system "$ROOT/var/lib/apt/lists/"* "$ROOT/usr/share/doc/"* "$ROOT/usr/share/man/"* \
  "$ROOT/usr/share/locale/"*

# The boot stub: just enough to reach the control share, where the run's guest_init.sh is.
cat >"$ROOT/sbin/meshpost-vm-init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
modprobe -a virtio_pci 9pnet_virtio 9p
mkdir -p /mpctl
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 mpctl /mpctl && [ -f /mpctl/guest_init.sh ]; then
  exec /bin/bash /mpctl/guest_init.sh
fi
echo "meshpost-vm-init: no control share with guest_init.sh; powering off"
echo o >/proc/sysrq-trigger
sleep 60
EOF
chmod 0755 "$ROOT/sbin/meshpost-vm-init"
printf '/dev/vda / ext4 rw 0 1\n' >"$ROOT/etc/fstab"

mkdir -p "$WORK/image"
KVER="$(ls "$ROOT/lib/modules" | sort -V | tail -n1)"
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/image/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/image/initrd.img"
used_mb=$(du -smx "$ROOT" | cut -f1)
size_mb=$((used_mb + used_mb / 2 + 512))  # room for what tests write (guests run -snapshot)
mkfs.ext4 -q -F -L meshpost-vm -d "$ROOT" "$WORK/image/rootfs.ext4" "${size_mb}M" >&2
echo "kernel $KVER, packages: ${PACKAGES[*]}" >"$WORK/image/ready"

rm -rf --one-file-system "$IMAGE"
mv "$WORK/image" "$IMAGE"
for old in "$RDMA_VM_CACHE"/image-*; do  # images of earlier package lists
  [[ "$old" == "$IMAGE" ]] || rm -rf --one-file-system "$old"
done
rdma_vm_log "image ready in $((SECONDS - t0)) s: kernel $KVER, root ${used_mb} MB ($IMAGE)"
