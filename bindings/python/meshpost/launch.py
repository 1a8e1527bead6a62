"""Cluster launcher: one host, many hosts (torchrun-style flags) or under Slurm.

One host (scheduler on a port the OS picks)::

    python -m meshpost.launch --workers 2 --servers 2 [--transport tcp] script.py [args]

Many hosts, one launcher per host (node 0 also runs the scheduler)::

    python -m meshpost.launch --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500 \\
        --workers-per-node 2 --servers-per-node 2 script.py [args]

Under Slurm (one launcher task per node; nnodes, node rank and master from SLURM_*)::

    srun -N4 --ntasks-per-node=1 python -m meshpost.launch --slurm --worker-nodes 2 \\
        --workers-per-node 8 --servers-per-node 8 script.py

Every child gets the variables StepMesh would give it: DMLC_ROLE, DMLC_NUM_WORKER,
DMLC_NUM_SERVER, DMLC_PS_ROOT_URI/PORT, DMLC_GROUP_SIZE (that role's processes per host),
DMLC_NODE_RANK (the host's index among the hosts running that role) and the instance
(STEPMESH_GPU and DMLC_INSTANCE_ID), so its rank is NODE_RANK * GROUP_SIZE + instance.
With ``--workers/--servers`` (one host, the historical mode) each process instead gets
DMLC_GROUP_SIZE=1 and DMLC_NODE_RANK=rank; both layouts give the same ranks.

Output: each child's stdout and stderr are read on separate pipes and forwarded to the
launcher's stdout and stderr as whole lines prefixed with "[role:rank]"; a line is never
split or interleaved with another (one writer lock, one write per line). meshpost's own
log lines already carry the role; the launcher drops that copy so the role appears once.
``--log-dir`` also writes every child's raw lines to <dir>/<role>-<rank>.{out,err}.

When one process fails, the launcher stops the others (SIGTERM, then SIGKILL, by pid) and
exits non-zero. `Cluster` is the same machinery as a library, used by the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["Cluster", "Layout", "ProcessResult", "expand_hostlist", "slurm_layout", "main"]

_PR_SET_PDEATHSIG = 1

# A line longer than this is forwarded in pieces (each piece still whole and prefixed):
# a child printing without newlines must not grow the launcher's memory without bound.
_MAX_LINE = 1 << 20


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
    output: List[str] = field(default_factory=list)  # stdout and stderr lines, arrival order
    stderr: List[str] = field(default_factory=list)  # the stderr lines alone

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return f"{self.name} (pid {self.pid}) did not finish in time"
        if self.returncode < 0:
            return f"{self.name} (pid {self.pid}) killed by signal {-self.returncode}"
        return f"{self.name} (pid {self.pid}) exited with {self.returncode}"


@dataclass(frozen=True)
class Child:
    """One process this host runs: its role, global rank and StepMesh coordinates."""
    role: str  # "server" or "worker"
    rank: int  # node_rank * group_size + instance
    node_rank: int  # this host's index among the hosts running `role`
    group_size: int  # `role` processes per host
    instance: int

    @property
    def name(self) -> str:
        return f"{self.role}:{self.rank}"


@dataclass(frozen=True)
class Layout:
    """Which processes run where in a cluster of `nnodes` hosts.

    Co-located (worker_nodes is None): every host runs `workers_per_node` workers and
    `servers_per_node` servers. Split (AFD style, worker_nodes=K): hosts 0..K-1 run
    `workers_per_node` workers each (attention), hosts K..nnodes-1 run `servers_per_node`
    servers each (FFN). The scheduler runs on host 0 (the master).
    """
    nnodes: int
    node_rank: int
    workers_per_node: int
    servers_per_node: int
    worker_nodes: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(what: str, value: object, want: str) -> ValueError:
            return ValueError(f"Layout: {what}={value!r}; expected {want}")
        if self.nnodes < 1:
            raise bad("nnodes", self.nnodes, ">= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise bad("node_rank", self.node_rank, f"0 <= node_rank < nnodes={self.nnodes}")
        if self.workers_per_node < 0 or self.servers_per_node < 0:
            raise bad("workers_per_node/servers_per_node",
                      (self.workers_per_node, self.servers_per_node), ">= 0 each")
        if self.worker_nodes is not None:
            if not 1 <= self.worker_nodes < self.nnodes:
                raise bad("worker_nodes", self.worker_nodes,
                          f"1 <= worker_nodes < nnodes={self.nnodes} (the first worker_nodes "
                          "hosts run workers, the rest servers)")
        if self.num_workers < 1:
            raise bad("workers_per_node", self.workers_per_node,
                      ">= 1 (the cluster needs at least one worker)")
        if self.num_servers < 1:
            raise bad("servers_per_node", self.servers_per_node,
                      ">= 1 (the cluster needs at least one server)")

    @property
    def worker_hosts(self) -> int:
        return self.nnodes if self.worker_nodes is None else self.worker_nodes

    @property
    def server_hosts(self) -> int:
        return self.nnodes if self.worker_nodes is None else self.nnodes - self.worker_nodes

    @property
    def num_workers(self) -> int:
        return self.worker_hosts * self.workers_per_node

    @property
    def num_servers(self) -> int:
        return self.server_hosts * self.servers_per_node

    @property
    def runs_scheduler(self) -> bool:
        return self.node_rank == 0

    def children(self) -> List[Child]:
        """The servers and workers this host (node_rank) runs, servers first."""
        out: List[Child] = []
        split = self.worker_nodes is not None
        runs_servers = not split or self.node_rank >= self.worker_nodes
        runs_workers = not split or self.node_rank < self.worker_nodes
        if runs_servers and self.servers_per_node:
            nr = self.node_rank - (self.worker_nodes if split else 0)
            out += [Child("server", nr * self.servers_per_node + i, nr, self.servers_per_node, i)
                    for i in range(self.servers_per_node)]
        if runs_workers and self.workers_per_node:
            nr = self.node_rank
            out += [Child("worker", nr * self.workers_per_node + i, nr, self.workers_per_node, i)
                    for i in range(self.workers_per_node)]
        return out


def _flat_children(workers: int, servers: int) -> List[Child]:
    # The one-host layout of earlier releases: group size 1, DMLC_NODE_RANK = rank.
    return ([Child("server", r, r, 1, 0) for r in range(servers)] +
            [Child("worker", r, r, 1, 0) for r in range(workers)])


# ---------------------------------------------------------------------------- Slurm

_HOSTLIST_ITEM = re.compile(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*)")


def expand_hostlist(spec: str) -> List[str]:
    """Expands a Slurm host list ("n[1-3,07],gpu5" -> n1 n2 n3 n07 gpu5), keeping zero
    padding. One bracket group per name, as Slurm writes node lists for flat names."""
    hosts: List[str] = []
    pos = 0
    spec = spec.strip()
    while pos < len(spec):
        m = _HOSTLIST_ITEM.match(spec, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"expand_hostlist: cannot parse {spec!r} at offset {pos}")
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            if prefix + suffix:
                hosts.append(prefix + suffix)
        else:
            for part in ranges.split(","):
                lo, sep, hi = part.partition("-")
                if not lo.isdigit() or (sep and not hi.isdigit()):
                    raise ValueError(f"expand_hostlist: bad range {part!r} in {spec!r}")
                first, last = int(lo), int(hi) if sep else int(lo)
                if last < first:
                    raise ValueError(f"expand_hostlist: descending range {part!r} in {spec!r}")
                if last - first > 100000:
                    raise ValueError(f"expand_hostlist: range {part!r} too large in {spec!r}")
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(first, last + 1))
        pos = m.end()
        if pos < len(spec):
            if spec[pos] != ",":
                raise ValueError(f"expand_hostlist: expected ',' at offset {pos} in {spec!r}")
            pos += 1
    if not hosts:
        raise ValueError(f"expand_hostlist: no host names in {spec!r}")
    return hosts


def slurm_layout(env: Mapping[str, str]) -> Tuple[int, int, str]:
    """(nnodes, node_rank, master host) of this Slurm task, from SLURM_* variables.

    Expects one launcher task per node (srun --ntasks-per-node=1). The node rank is
    SLURM_NODEID (the node's index in the step's node list); the master is the first
    host of the step's node list."""
    def need(*names: str) -> Tuple[str, str]:
        for n in names:
            if env.get(n):
                return n, env[n]
        raise ValueError("--slurm: none of " + ", ".join(names) +
                         " is set; run the launcher under srun (one task per node)")
    nodes_var, nodes = need("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    list_var, nodelist = need("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    id_var, node_id = need("SLURM_NODEID")
    try:
        nnodes, node_rank = int(nodes), int(node_id)
    except ValueError:
        raise ValueError(f"--slurm: {nodes_var}={nodes!r} / {id_var}={node_id!r}; "
                         "expected integers") from None
    hosts = expand_hostlist(nodelist)
    if len(hosts) != nnodes:
        raise ValueError(f"--slurm: {list_var}={nodelist!r} names {len(hosts)} hosts but "
                         f"{nodes_var}={nnodes}")
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    if tasks and not re.fullmatch(r"1(\(x\d+\))?", tasks):
        raise ValueError(f"--slurm: SLURM_STEP_TASKS_PER_NODE={tasks!r}; expected one launcher "
                         "task per node (srun --ntasks-per-node=1): the launcher starts the "
                         "per-node processes itself")
    return nnodes, node_rank, hosts[0]


# ---------------------------------------------------------------------------- output

_LEADING_FIELD = re.compile(r"\[[^\]\[]{1,40}\] ")


def _strip_role(line: str, name: str) -> str:
    # meshpost's log pattern is "[time] [role:rank] [layer] [level] msg" (common/logging.cc);
    # the launcher's prefix already names the process, so that copy goes. Only the exact
    # tag of this child, as the first or second bracketed field, is removed.
    tag = f"[{name}] "
    if line.startswith(tag):
        return line[len(tag):]
    m = _LEADING_FIELD.match(line)
    if m is not None and line.startswith(tag, m.end()):
        return line[:m.end()] + line[m.end() + len(tag):]
    return line


class _Proc:
    def __init__(self, name: str, popen: subprocess.Popen) -> None:
        self.name = name
        self.popen = popen
        self.output: List[str] = []
        self.stderr: List[str] = []
        self.readers: List[threading.Thread] = []


class Cluster:
    """A scheduler, servers and workers running `argv`.

    One host: `workers` workers and `servers` servers (flat layout, scheduler on an
    OS-assigned port). Many hosts: pass `layout` (this host's share) and `master_addr` /
    `master_port`; the scheduler then runs only on node 0, on `master_port`.
    """

    def __init__(self, argv: Sequence[str], workers: int = 2, servers: int = 2, *,
                 env: Optional[Mapping[str, str]] = None,
                 env_for: Optional[Mapping[str, Mapping[str, str]]] = None,
                 scheduler_argv: Optional[Sequence[str]] = None,
                 output: Optional[IO[str]] = None,
                 error_output: Optional[IO[str]] = None,
                 start_timeout: Optional[float] = None,
                 layout: Optional[Layout] = None,
                 master_addr: str = "127.0.0.1",
                 master_port: int = 0,
                 log_dir: Optional[str] = None) -> None:
        if layout is None:
            if workers < 1 or servers < 1:
                raise ValueError(f"Cluster: workers={workers}, servers={servers}; "
                                 "expected >= 1 each")
            self.children = _flat_children(workers, servers)
            self.workers, self.servers = workers, servers
            self.runs_scheduler = True
        else:
            self.children = layout.children()
            self.workers, self.servers = layout.num_workers, layout.num_servers
            self.runs_scheduler = layout.runs_scheduler
        if not master_addr:
            raise ValueError("Cluster: master_addr=''; expected a host name or IP")
        if not 0 <= master_port <= 65535:
            raise ValueError(f"Cluster: master_port={master_port}; expected 0..65535")
        if master_port == 0 and not self.runs_scheduler:
            raise ValueError("Cluster: master_port=0 on a node without the scheduler; expected "
                             "the scheduler's port (0 only where the scheduler runs)")
        self.layout = layout
        self.argv = list(argv)
        self.env = dict(env or {})
        self.env_for = {k: dict(v) for k, v in (env_for or {}).items()}
        self.scheduler_argv = list(scheduler_argv or
                                   [sys.executable, "-m", "meshpost.scheduler"])
        self.output = output
        # Child stderr goes to error_output; when only `output` is given, both go there.
        self.error_output = error_output if error_output is not None else output
        if start_timeout is None:
            # As long as the processes themselves wait for each other (a loaded machine can
            # take a minute just importing torch in every process).
            ms = self.env.get("MESHPOST_START_TIMEOUT_MS",
                              os.environ.get("MESHPOST_START_TIMEOUT_MS", ""))
            start_timeout = max(60.0, int(ms) / 1000) if ms.isdigit() else 120.0
        self.start_timeout = start_timeout
        self.master_addr = master_addr
        self.master_port = master_port
        self.port = master_port
        self.log_dir = Path(log_dir) if log_dir else None
        self._procs: List[_Proc] = []
        self._lock = threading.Lock()

    # --- starting ---
    def _env(self, name: str, role: str) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # One secret per cluster unless the caller chose one (or none, with an empty
        # MESHPOST_CLUSTER_TOKEN): see docs/security.md. Only where this launcher starts the
        # whole cluster: launchers on several hosts cannot agree on a random token, so a
        # multi-host cluster takes MESHPOST_CLUSTER_TOKEN(_FILE) from the user.
        if (self.layout is None and "MESHPOST_CLUSTER_TOKEN" not in env
                and "MESHPOST_CLUSTER_TOKEN_FILE" not in env):
            if not getattr(self, "_token", None):
                self._token = secrets.token_hex(32)
            env["MESHPOST_CLUSTER_TOKEN"] = self._token
        env.update({
            "DMLC_ROLE": role,
            "DMLC_NUM_WORKER": str(self.workers),
            "DMLC_NUM_SERVER": str(self.servers),
            "DMLC_PS_ROOT_URI": self.master_addr,
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str],
               pass_fds: Sequence[int] = ()) -> _Proc:
        logs: Tuple[Optional[IO[bytes]], Optional[IO[bytes]]] = (None, None)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            base = self.log_dir / name.replace(":", "-")
            logs = (open(f"{base}.out", "wb"), open(f"{base}.err", "wb"))
        popen = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 pass_fds=tuple(pass_fds), preexec_fn=_die_with_parent)
        proc = _Proc(name, popen)
        for stream, sink, log in ((popen.stdout, self.output, logs[0]),
                                  (popen.stderr, self.error_output, logs[1])):
            t = threading.Thread(target=self._pump, args=(proc, stream, sink, log,
                                                          stream is popen.stderr),
                                 name=f"launch-{name}", daemon=True)
            proc.readers.append(t)
        self._procs.append(proc)
        for t in proc.readers:
            t.start()
        return proc

    def _pump(self, proc: _Proc, stream: IO[bytes], sink: Optional[IO[str]],
              log: Optional[IO[bytes]], is_stderr: bool) -> None:
        # readline() returns only whole lines (it keeps reading across partial writes
        # until the newline), except the last one at EOF and pieces of over-long lines.
        try:
            for raw in iter(lambda: stream.readline(_MAX_LINE), b""):
                if log is not None:
                    log.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\n")
                shown = _strip_role(line, proc.name)
                with self._lock:
                    proc.output.append(line)
                    if is_stderr:
                        proc.stderr.append(line)
                    if sink is not None:
                        # One write of the whole line under the lock shared by every
                        # child and both streams: lines never interleave.
                        sink.write(f"[{proc.name}] {shown}\n")
                        sink.flush()
        except (OSError, ValueError) as e:  # closed sink: keep draining, never block the child
            with self._lock:
                proc.output.append(f"meshpost.launch: output of {proc.name} lost: {e}")
            for _ in iter(lambda: stream.read(1 << 16), b""):
                pass
        finally:
            stream.close()
            if log is not None:
                log.close()

    def _child_env(self, child: Child) -> Dict[str, str]:
        env = self._env(child.name, child.role)
        env["DMLC_PS_ROOT_PORT"] = str(self.port)
        override = self.env_for.get(child.name, {})
        if self.layout is None:
            # The one-host layout sets only what it always did, so variables a caller passes
            # for every process (DMLC_GROUP_SIZE, STEPMESH_GPU ...) keep working.
            env["DMLC_NODE_RANK"] = str(child.node_rank)
        else:
            env.update({
                "DMLC_GROUP_SIZE": str(child.group_size),
                "DMLC_NODE_RANK": str(child.node_rank),
                # STEPMESH_GPU wins over DMLC_INSTANCE_ID in meshpost: set both, so a value
                # inherited from the launcher's environment cannot shift the rank.
                "STEPMESH_GPU": str(child.instance),
                "DMLC_INSTANCE_ID": str(child.instance),
            })
        env.update(override)
        return env

    def start(self) -> "Cluster":
        read_fd = -1
        try:
            if self.runs_scheduler:
                read_fd, sched = self._start_scheduler()
                if self.master_port == 0:
                    # The others need the port the OS picks: wait for the report first.
                    self.port = self._read_port(read_fd, sched)
            for child in self.children:
                self._spawn(child.name, self.argv, self._child_env(child))
            if read_fd >= 0 and self.master_port != 0:
                # A fixed port: the children started alongside the scheduler (each process
                # spends seconds importing torch); still fail here if it cannot listen.
                reported = self._read_port(read_fd, sched)
                if reported != self.master_port:
                    raise RuntimeError(f"the scheduler listens on port {reported}, not on "
                                       f"--master-port {self.master_port}")
        except BaseException:
            self.kill()
            raise
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        return self

    def _start_scheduler(self) -> Tuple[int, "_Proc"]:
        """Spawns the scheduler; returns the read end of its port pipe and the process."""
        read_fd, write_fd = os.pipe()
        try:
            env = self._env("scheduler", "scheduler")
            env["DMLC_PS_ROOT_PORT"] = str(self.master_port)
            env["MESHPOST_PORT_FD"] = str(write_fd)
            env.update(self.env_for.get("scheduler", {}))
            sched = self._spawn("scheduler", self.scheduler_argv, env, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return read_fd, sched

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
                for t in sched.readers:
                    t.join(timeout=5)
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
            for t in p.readers:
                t.join(timeout=5)
            with self._lock:
                results.append(ProcessResult(p.name, p.popen.pid, p.popen.returncode,
                                             list(p.output), list(p.stderr)))
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


# ---------------------------------------------------------------------------- CLI

def _parse(argv: Optional[Sequence[str]],
           environ: Optional[Mapping[str, str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshpost.launch",
        description="Run a meshpost cluster (scheduler, servers, workers): on this machine "
                    "(--workers/--servers), or this host's share of a multi-host cluster "
                    "(--nnodes/--node-rank/--master-addr/--master-port with "
                    "--workers-per-node/--servers-per-node, or --slurm).")
    one = parser.add_argument_group("one host")
    one.add_argument("--workers", type=int, default=None,
                     help="number of workers (default 1)")
    one.add_argument("--servers", type=int, default=None,
                     help="number of servers (default 1)")
    many = parser.add_argument_group("many hosts (run one launcher per host)")
    many.add_argument("--nnodes", type=int, default=None, help="number of hosts")
    many.add_argument("--node-rank", type=int, default=None,
                      help="this host's index, 0..nnodes-1 (0 runs the scheduler)")
    many.add_argument("--master-addr", default=None,
                      help="host name or IP of node 0, where the scheduler listens")
    many.add_argument("--master-port", type=int, default=None,
                      help="the scheduler's TCP port (default on one host: any free port)")
    many.add_argument("--workers-per-node", type=int, default=None,
                      help="workers on each worker host (DMLC_GROUP_SIZE of the workers)")
    many.add_argument("--servers-per-node", type=int, default=None,
                      help="servers on each server host (DMLC_GROUP_SIZE of the servers)")
    many.add_argument("--worker-nodes", type=int, default=None, metavar="K",
                      help="AFD split: hosts 0..K-1 run only workers (attention), the rest "
                           "only servers (FFN); default: every host runs both")
    many.add_argument("--slurm", action="store_true",
                      help="take nnodes, node rank and master address from SLURM_* "
                           "(srun with one task per node)")
    many.add_argument("--node-host", default=None,
                      help="DMLC_NODE_HOST: the address this host's processes advertise")
    many.add_argument("--interface", default=None,
                      help="DMLC_INTERFACE: advertise this network interface's address")
    parser.add_argument("--transport", default=None,
                        help="MESHPOST_TRANSPORT for every process (auto, tcp, ...)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment variable for every process (repeatable)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds before every process is stopped (default: none)")
    parser.add_argument("--log-dir", default=None,
                        help="also write each process's output to DIR/<role>-<rank>.out/.err")
    parser.add_argument("--scheduler-runs-script", action="store_true",
                        help="run the script for the scheduler role too (StepMesh style)")
    parser.add_argument("script", help="Python script (or executable) run for every role")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    ns = parser.parse_args(argv)
    try:
        _resolve(ns, os.environ if environ is None else environ)
    except ValueError as e:
        parser.error(str(e))
    return ns


def _resolve(ns: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Checks flag combinations and fills ns.layout / ns.master_addr / ns.master_port."""
    multi = [f"--{n.replace('_', '-')}" for n in
             ("nnodes", "node_rank", "master_addr", "workers_per_node", "servers_per_node",
              "worker_nodes") if getattr(ns, n) is not None] + (["--slurm"] if ns.slurm else [])
    if ns.timeout is not None and ns.timeout <= 0:
        raise ValueError(f"--timeout {ns.timeout}; expected seconds > 0")
    if ns.master_port is not None and not 0 <= ns.master_port <= 65535:
        raise ValueError(f"--master-port {ns.master_port}; expected 1..65535 "
                         "(0 = any free port, one host only)")
    if not multi:
        for flag, value in (("--workers", ns.workers), ("--servers", ns.servers)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}; expected >= 1")
        ns.layout = None
        ns.workers = 1 if ns.workers is None else ns.workers
        ns.servers = 1 if ns.servers is None else ns.servers
        ns.master_addr = "127.0.0.1"
        ns.master_port = ns.master_port or 0
        return
    if ns.workers is not None or ns.servers is not None:
        raise ValueError(f"--workers/--servers (one-host totals) cannot be combined with "
                         f"{', '.join(multi)}; use --workers-per-node/--servers-per-node")
    if ns.slurm:
        for flag, value in (("--nnodes", ns.nnodes), ("--node-rank", ns.node_rank)):
            if value is not None:
                raise ValueError(f"{flag} cannot be combined with --slurm "
                                 "(Slurm gives the node count and rank)")
        ns.nnodes, ns.node_rank, master = slurm_layout(environ)
        if ns.master_addr is None:
            ns.master_addr = master
        if ns.master_port is None:
            job = environ.get("SLURM_JOB_ID", "")
            if not job.isdigit():
                raise ValueError("--slurm: give --master-port (SLURM_JOB_ID is not set to "
                                 "derive one)")
            # Same on every node of the job, and different for jobs running side by side.
            ns.master_port = 20000 + int(job) % 10000
    nnodes = 1 if ns.nnodes is None else ns.nnodes
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes}; expected >= 1")
    node_rank = 0 if ns.node_rank is None else ns.node_rank
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank}; expected 0 <= node rank < --nnodes {nnodes}")
    if ns.workers_per_node is None or ns.servers_per_node is None:
        raise ValueError("--workers-per-node and --servers-per-node are required with "
                         f"{', '.join(multi)}")
    if nnodes > 1:
        if not ns.master_addr:
            raise ValueError(f"--master-addr is required with --nnodes {nnodes} (node 0's "
                             "host name or IP, reachable from every host)")
        if not ns.master_port:
            raise ValueError(f"--master-port is required with --nnodes {nnodes} (a port "
                             "free on node 0, the same on every host)")
    if ns.worker_nodes is not None and nnodes == 1:
        raise ValueError("--worker-nodes needs --nnodes >= 2 (one host cannot be split)")
    ns.layout = Layout(nnodes, node_rank, ns.workers_per_node, ns.servers_per_node,
                       ns.worker_nodes)
    ns.master_addr = ns.master_addr or "127.0.0.1"
    ns.master_port = ns.master_port or 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        ns = _parse(argv)
    except ValueError as e:  # Layout's own checks
        print(f"meshpost.launch: {e}", file=sys.stderr)
        return 2
    env: Dict[str, str] = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"meshpost.launch: --env {item!r}; expected NAME=VALUE", file=sys.stderr)
            return 2
        env[name] = value
    if ns.transport:
        env["MESHPOST_TRANSPORT"] = ns.transport
    if ns.node_host:
        env["DMLC_NODE_HOST"] = ns.node_host
    if ns.interface:
        env["DMLC_INTERFACE"] = ns.interface
    command = ([sys.executable, ns.script] if ns.script.endswith(".py")
               else [ns.script]) + list(ns.args)
    try:
        cluster = Cluster(command, workers=ns.workers or 1, servers=ns.servers or 1, env=env,
                          scheduler_argv=command if ns.scheduler_runs_script else None,
                          output=sys.stdout, error_output=sys.stderr, layout=ns.layout,
                          master_addr=ns.master_addr, master_port=ns.master_port,
                          log_dir=ns.log_dir)
    except ValueError as e:
        print(f"meshpost.launch: {e}", file=sys.stderr)
        return 2
    if ns.layout is not None:
        names = [c.name for c in cluster.children]
        if cluster.runs_scheduler:
            names.insert(0, "scheduler")
        print(f"meshpost.launch: node {ns.layout.node_rank} of {ns.layout.nnodes} runs "
              f"{', '.join(names) or 'nothing'}; {cluster.workers} workers and "
              f"{cluster.servers} servers in all; scheduler at "
              f"{ns.master_addr}:{ns.master_port}", file=sys.stderr, flush=True)
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
