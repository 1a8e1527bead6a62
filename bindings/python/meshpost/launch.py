"""Local cluster launcher.

    python -m meshpost.launch --workers 2 --servers 2 [--transport tcp] script.py [args]

Starts a scheduler on a port the OS picks (it reports the port through a pipe named by
MESHPOST_PORT_FD), then the servers and workers with the DMLC_* variables set, prefixes
every line of their output with "[role:rank]", and when one process fails stops the
others (by pid) and exits non-zero. The scheduler is ``python -m meshpost.scheduler``
unless --scheduler-runs-script gives the scheduler role to the script too (StepMesh
style scripts handle DMLC_ROLE=scheduler by calling init() and stop()).

`Cluster` is the same machinery as a library, used by the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Dict, List, Mapping, Optional, Sequence

__all__ = ["Cluster", "ProcessResult", "main"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a killed launcher leaves no orphans.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # noqa: BLE001 - best effort
        pass


@dataclass
class ProcessResult:
    name: str  # "scheduler", "server:0", "worker:1"
    pid: int
    returncode: Optional[int]  # None: still running when the wait ended (then killed)
    output: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return f"{self.name} (pid {self.pid}) did not finish in time"
        if self.returncode < 0:
            return f"{self.name} (pid {self.pid}) killed by signal {-self.returncode}"
        return f"{self.name} (pid {self.pid}) exited with {self.returncode}"


class _Proc:
    def __init__(self, name: str, popen: subprocess.Popen) -> None:
        self.name = name
        self.popen = popen
        self.output: List[str] = []
        self.reader: Optional[threading.Thread] = None


class Cluster:
    """A scheduler, `servers` servers and `workers` workers running `argv` on this host."""

    def __init__(self, argv: Sequence[str], workers: int = 2, servers: int = 2, *,
                 env: Optional[Mapping[str, str]] = None,
                 env_for: Optional[Mapping[str, Mapping[str, str]]] = None,
                 scheduler_argv: Optional[Sequence[str]] = None,
                 output: Optional[IO[str]] = None,
                 start_timeout: float = 60.0) -> None:
        if workers < 1 or servers < 1:
            raise ValueError(f"workers={workers}, servers={servers}; expected >= 1 each")
        self.argv = list(argv)
        self.workers = workers
        self.servers = servers
        self.env = dict(env or {})
        self.env_for = {k: dict(v) for k, v in (env_for or {}).items()}
        self.scheduler_argv = list(scheduler_argv or
                                   [sys.executable, "-m", "meshpost.scheduler"])
        self.output = output
        self.start_timeout = start_timeout
        self.port = 0
        self._procs: List[_Proc] = []
        self._lock = threading.Lock()

    # --- starting ---
    def _env(self, name: str, role: str) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update({
            "DMLC_ROLE": role,
            "DMLC_NUM_WORKER": str(self.workers),
            "DMLC_NUM_SERVER": str(self.servers),
            "DMLC_PS_ROOT_URI": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_for.get(name, {}))
        return env

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str],
               pass_fds: Sequence[int] = ()) -> _Proc:
        popen = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 pass_fds=tuple(pass_fds), preexec_fn=_die_with_parent)
        proc = _Proc(name, popen)
        proc.reader = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        proc.reader.start()
        self._procs.append(proc)
        return proc

    def _pump(self, proc: _Proc) -> None:
        assert proc.popen.stdout is not None
        for raw in iter(proc.popen.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            proc.output.append(line)
            if self.output is not None:
                with self._lock:
                    self.output.write(f"[{proc.name}] {line}\n")
                    self.output.flush()
        proc.popen.stdout.close()

    def start(self) -> "Cluster":
        read_fd, write_fd = os.pipe()
        try:
            env = self._env("scheduler", "scheduler")
            env["DMLC_PS_ROOT_PORT"] = "0"
            env["MESHPOST_PORT_FD"] = str(write_fd)
            sched = self._spawn("scheduler", self.scheduler_argv, env, pass_fds=(write_fd,))
            os.close(write_fd)
            write_fd = -1
            self.port = self._read_port(read_fd, sched)
        except BaseException:
            self.kill()
            raise
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        try:
            for role, count in (("server", self.servers), ("worker", self.workers)):
                for rank in range(count):
                    name = f"{role}:{rank}"
                    env = self._env(name, role)
                    env["DMLC_PS_ROOT_PORT"] = str(self.port)
                    if "DMLC_NODE_RANK" not in self.env_for.get(name, {}):
                        env["DMLC_NODE_RANK"] = str(rank)
                    self._spawn(name, self.argv, env)
        except BaseException:
            self.kill()
            raise
        return self

    def _read_port(self, fd: int, sched: _Proc) -> int:
        deadline = time.monotonic() + self.start_timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the scheduler did not report its port within "
                                   f"{self.start_timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 64)
            if not chunk:  # the scheduler closed the pipe without a port: it failed
                sched.popen.wait()
                if sched.reader is not None:
                    sched.reader.join(timeout=5)
                raise RuntimeError(
                    f"the scheduler exited (code {sched.popen.returncode}) before reporting "
                    "its port:\n" + "\n".join(sched.output[-20:]))
            data += chunk
        return int(data.split(b"\n", 1)[0])

    # --- waiting and stopping ---
    @property
    def pids(self) -> Dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs}

    def wait(self, timeout: Optional[float] = None, fail_fast: bool = True,
             grace: float = 5.0) -> List[ProcessResult]:
        """Waits for every process. With fail_fast, the first failure stops the others
        (SIGTERM, then SIGKILL after `grace` seconds). On timeout the rest are killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pidfds: Dict[int, _Proc] = {}
        for p in self._procs:
            try:
                pidfds[os.pidfd_open(p.popen.pid)] = p
            except (AttributeError, OSError):
                pass
        try:
            running = [p for p in self._procs if p.popen.poll() is None]
            failed = any(p.popen.returncode not in (None, 0) for p in self._procs)
            while running and not (failed and fail_fast):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                fds = [fd for fd, p in pidfds.items() if p in running]
                wait_s = 0.5 if left is None else min(0.5, left)
                if fds:
                    select.select(fds, [], [], wait_s)
                else:
                    time.sleep(0.05)  # no pidfd support: poll
                for p in list(running):
                    rc = p.popen.poll()
                    if rc is not None:
                        running.remove(p)
                        if rc != 0:
                            failed = True
            if running:
                self.terminate(grace)
        finally:
            for fd in pidfds:
                os.close(fd)
        results = []
        for p in self._procs:
            if p.reader is not None:
                p.reader.join(timeout=5)
            results.append(ProcessResult(p.name, p.popen.pid, p.popen.returncode, p.output))
        return results

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM every live process (by pid), SIGKILL what is left after `grace` s."""
        live = [p for p in self._procs if p.popen.poll() is None]
        for p in live:
            try:
                p.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        for p in self._procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshpost.launch",
        description="Run a meshpost cluster (scheduler, servers, workers) on this machine.")
    parser.add_argument("--workers", type=int, default=1, help="number of workers (default 1)")
    parser.add_argument("--servers", type=int, default=1, help="number of servers (default 1)")
    parser.add_argument("--transport", default=None,
                        help="MESHPOST_TRANSPORT for every process (auto, tcp, ...)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment variable for every process (repeatable)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every process is stopped (default: none)")
    parser.add_argument("--scheduler-runs-script", action="store_true",
                        help="run the script for the scheduler role too (StepMesh style)")
    parser.add_argument("script", help="Python script (or executable) run for every role")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = _parse(argv)
    env: Dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"meshpost.launch: --env {item!r}; expected NAME=VALUE", file=sys.stderr)
            return 2
        env[name] = value
    if ns.transport:
        env["MESHPOST_TRANSPORT"] = ns.transport
    command = ([sys.executable, ns.script] if ns.script.endswith(".py")
               else [ns.script]) + list(ns.args)
    cluster = Cluster(command, workers=ns.workers, servers=ns.servers, env=env,
                      scheduler_argv=command if ns.scheduler_runs_script else None,
                      output=sys.stdout)
    try:
        cluster.start()
        results = cluster.wait(timeout=ns.timeout, fail_fast=True)
    except KeyboardInterrupt:
        # The terminal already sent SIGINT to the whole process group; give the
        # children a moment to exit cleanly, then kill by pid.
        cluster.terminate(grace=3.0)
        print("meshpost.launch: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"meshpost.launch: {e}", file=sys.stderr)
        cluster.kill()
        return 1
    bad = [r for r in results if not r.ok]
    for r in bad:
        print(f"meshpost.launch: {r.describe()}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
