#!/bin/bash
# Runs as PID 1 in the guest (exec'd by the image's boot stub from the control share
# /mpctl, which run_vm.sh fills): sets up the network and soft-RoCE (rxe0), mounts the
# shared directory at the host's path, runs /mpctl/job.sh, writes its exit code to
# /mpctl/rc and powers off. Settings come from /mpctl/vm.env (written by run_vm.sh).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
umask 022

say() { echo "[guest] $*"; }
power_off() {
  sync
  echo o >/proc/sysrq-trigger
  sleep 60
}
trap power_off EXIT

# shellcheck source=/dev/null
source /mpctl/vm.env  # VM_NAME VM_IP VM_PREFIX VM_HOSTS VM_SHARE VM_JOB_TIMEOUT
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
hostname "$VM_NAME"
echo "$VM_NAME" >/etc/hostname
{
  echo "127.0.0.1 localhost"
  printf '%s\n' "${VM_HOSTS[@]}"
} >/etc/hosts

modprobe -a virtio_net rdma_rxe ib_uverbs rdma_ucm 2>&1 | sed 's/^/[guest] modprobe: /'
ip link set lo up
for _ in $(seq 100); do [[ -e /sys/class/net/eth0 ]] && break; sleep 0.1; done
ip link set eth0 up
ip addr add "$VM_IP/$VM_PREFIX" dev eth0
if ! rdma link add rxe0 type rxe netdev eth0; then
  say "ERROR: rdma link add rxe0 type rxe netdev eth0 failed"
fi
for _ in $(seq 100); do [[ -e /dev/infiniband/uverbs0 ]] && break; sleep 0.1; done
# No udev here: devtmpfs makes the verbs nodes root-only; the memlock test runs as an
# unprivileged user, as a real deployment would.
chmod 0666 /dev/infiniband/* 2>/dev/null
say "$VM_NAME: rxe0 on eth0 $VM_IP, port $(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null), up $(cut -d' ' -f1 /proc/uptime) s"

RC=125
if [[ -n "$VM_SHARE" ]]; then
  mkdir -p "$VM_SHARE"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 data "$VM_SHARE" ||
    say "ERROR: mounting the shared directory at $VM_SHARE failed"
fi
ulimit -l unlimited
ulimit -n 65536
export RDMA_VM_NAME="$VM_NAME" RDMA_VM_IP="$VM_IP" RDMA_VM_DEV=rxe0  # not MESHPOST_*: meshpost warns about unknown ones
timeout -k 5 "$VM_JOB_TIMEOUT" bash /mpctl/job.sh >/mpctl/output.log 2>&1 </dev/null
RC=$?
say "job exit code $RC at uptime $(cut -d' ' -f1 /proc/uptime) s" >>/mpctl/output.log
echo "$RC" >/mpctl/rc
sync
exit 0
