"""Helpers for the multi-host tests: "hosts" made of network namespaces, and launcher runs.

A Fabric is one switch namespace holding a bridge, plus one namespace per host joined to the
bridge by a veth pair (eth0 inside the host, 10.<net>.0.<i+1>/24). Every process of a host
runs inside its namespace and a fresh UTS namespace with its own hostname, so meshpost's
host identity (hostname + kernel boot id, common/net.cc) differs between hosts exactly as
it would between machines. Nothing is created in the caller's network namespace; every
namespace is named "mphosts-<pid>-<random>-..." and removed by that name afterwards (also
leftovers of runs whose pid is gone).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

PROGRAMS = Path(__file__).resolve().parent / "programs"
PREFIX = "mphosts-"

# Short enough that a lost host is noticed quickly, long enough that a process stalled by a
# loaded machine is not declared dead. The start timeout is generous for the same reason:
# every process imports torch, which takes tens of seconds on a busy 2-core box.
HEARTBEATS = {
    "MESHPOST_HEARTBEAT_INTERVAL_MS": "250",
    "MESHPOST_HEARTBEAT_TIMEOUT_MS": "4000",
    "MESHPOST_START_TIMEOUT_MS": "300000",
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _remove_stale() -> None:
    # Namespaces of earlier runs that died before cleaning up (the pid is in the name).
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)-[0-9a-f]+-\S+)", listing, re.M):
        ns, pid = name[0], int(name[1])
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", ns, check=False)


def netns_unavailable() -> Optional[str]:
    """Why this machine cannot run the namespace tests, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' is not permitted here: {made.stderr.strip()}"
    try:
        uts = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "hostname",
                              "mphosts-probe"], capture_output=True, text=True, timeout=30)
        if uts.returncode != 0:
            return f"a UTS namespace cannot be made here: {uts.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0",
                   check=False)
        if veth.returncode != 0:
            return f"veth links cannot be made here: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Fabric:
    def __init__(self, hosts: int) -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.hostnames = [f"mphost{i}" for i in range(hosts)]
        net = secrets.randbelow(200) + 20
        self.addrs = [f"10.{net}.0.{i + 1}" for i in range(hosts)]
        self.created: List[str] = []

    def up(self) -> "Fabric":
        _remove_stale()
        _ip("netns", "add", self.switch)
        self.created.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", f"vb{i}", "type", "veth", "peer", "name",
                "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"vb{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def cut(self, host: int) -> None:
        """Takes the host's only link down: to its peers it is gone, as if unplugged."""
        _ip("-n", self.hosts[host], "link", "set", "eth0", "down")

    def command(self, host: int, argv: Sequence[str]) -> List[str]:
        # ip netns exec and unshare both exec (no fork), so the pid Popen sees is the pid
        # of `argv` itself: killing it by pid kills the launcher, whose children die with
        # it (PR_SET_PDEATHSIG).
        return ["ip", "netns", "exec", self.hosts[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[host], *argv]

    def down(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        self.created.clear()


class Run:
    """A process whose stdout and stderr lines are collected as they arrive."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str]) -> None:
        self.popen = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: List[str] = []
        self.err: List[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.popen.stdout, self.out),
                                         (self.popen.stderr, self.err))]
        for t in self._threads:
            t.start()

    def _read(self, stream, sink: List[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    def wait_for(self, pred: Callable[[List[str]], bool], timeout: float) -> bool:
        """Waits until pred(stdout lines) holds; False on timeout or exit without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.out):
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and
                                 not any(t.is_alive() for t in self._threads)):
                    return pred(self.out)
                self._cond.wait(min(left, 1.0))
            return True

    def finish(self, timeout: float) -> Optional[int]:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for t in self._threads:
            t.join(timeout=10)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def text(self) -> str:
        return "\n".join(self.out[-80:] + ["--- stderr"] + self.err[-80:])


def launcher_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DMLC_", "MESHPOST_", "STEPMESH_", "SLURM_"))}
    env.update(HEARTBEATS)
    env["MESHPOST_TRANSPORT"] = "auto"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def launch_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "meshpost.launch", *args]


def same_host_transport() -> str:
    """What meshpost picks between two processes on one host in automatic mode."""
    import meshpost
    if "cma" not in meshpost.transports():
        return "tcp"
    try:  # Yama ptrace_scope >= 1 refuses cross-memory attach: the shared-memory fallback
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            if f.read().strip() != "0":
                return "cma-shm"
    except OSError:
        pass
    return "cma"


@pytest.fixture
def fabric_factory():
    made: List[Fabric] = []
    runs: List[Run] = []

    def make(hosts: int) -> Fabric:
        why = netns_unavailable()
        if why is not None:
            pytest.skip(why)
        f = Fabric(hosts)
        made.append(f)
        return f.up()

    make.runs = runs  # tests register their processes here for cleanup
    yield make
    for r in runs:
        r.kill()
    for f in made:
        f.down()
