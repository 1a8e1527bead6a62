"""Idle CPU of every process of a local cluster (issue 11: <= 1 % of a core per process).

    .venv/bin/python bench/idle_cpu.py --workers 2 --servers 2 --seconds 20

A M x N cluster runs this file (fserver_lib, as StepMesh programs do). Every worker does one
AFD-sized round trip, so every connection and data van is up, says so, and then sits idle:
workers sleep, servers block in get_batch, the scheduler waits. Once every worker is idle
the driver reads each process's CPU time (all threads, /proc/PID/stat utime + stime) at the
start and the end of a --seconds window, and prints one JSON line per process with its CPU
use as a percentage of one core, then the cluster finishes with a last round trip that
checks the data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

_READY = "IDLE-READY"


def _round_trip(ps, torch):
    servers = int(os.environ["DMLC_NUM_SERVER"])
    push = torch.ones(128 * 7168, dtype=torch.uint8)
    pulls = [torch.zeros(128 * 7168, dtype=torch.bfloat16) for _ in range(servers)]
    ps.wait(ps.push_pull([push], [0], pulls, list(range(100, 100 + servers))), 60000)
    if not all(bool((pull == 2).all()) for pull in pulls):
        raise SystemExit("idle_cpu: wrong data in the pull tensor")


def _worker(idle_s: float) -> int:
    import torch
    import fserver_lib as ps

    ps.init()
    _round_trip(ps, torch)
    print(_READY, flush=True)
    time.sleep(idle_s)
    _round_trip(ps, torch)
    ps.stop()
    return 0


def _server() -> int:
    import torch
    import fserver_lib as ps

    ps.init()
    out = torch.full((128 * 7168,), 2, dtype=torch.bfloat16)
    for _ in range(2):
        for handle, _tensors, _keys in ps.get_batch(600000):
            ps.respond([out], handle)
    ps.stop()
    return 0


class _Lines:
    """Output sink of the cluster: keeps the lines and counts the workers that went idle."""

    def __init__(self, workers: int):
        self.lines = []
        self.workers = workers
        self.ready = 0
        self.all_ready = threading.Event()
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            for line in text.splitlines():
                self.lines.append(line)
                if line.endswith(_READY):
                    self.ready += 1
                    if self.ready == self.workers:
                        self.all_ready.set()

    def flush(self) -> None:
        pass


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def main() -> int:
    role = os.environ.get("DMLC_ROLE")
    if role == "worker":
        return _worker(float(os.environ["IDLE_CPU_SECONDS"]))
    if role == "server":
        return _server()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the idle window")
    ap.add_argument("--transport", default="auto", help="MESHPOST_TRANSPORT (default: auto)")
    args = ap.parse_args()
    if args.workers < 1 or args.servers < 1 or not args.seconds > 0:
        ap.error(f"--workers={args.workers}, --servers={args.servers}, --seconds={args.seconds}: "
                 "expected at least one worker and one server and a positive window")
    from meshpost.launch import Cluster

    # The workers stay idle past the window on both sides, so it holds no round trip.
    env = {"IDLE_CPU_SECONDS": str(args.seconds + 10.0)}
    if args.transport != "auto":
        env["MESHPOST_TRANSPORT"] = args.transport
    sink = _Lines(args.workers)
    cluster = Cluster([sys.executable, os.path.abspath(__file__)], workers=args.workers,
                      servers=args.servers, env=env, output=sink)
    cluster.start()
    try:
        if not sink.all_ready.wait(timeout=300):
            print("idle_cpu: the workers did not finish their first round trip in 300 s:\n" +
                  "\n".join(sink.lines[-30:]), file=sys.stderr)
            return 1
        time.sleep(2.0)  # let the last responses and acknowledgements settle
        pids = cluster.pids
        hz = os.sysconf("SC_CLK_TCK")
        before = {name: _cpu_ticks(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(args.seconds)
        after = {name: _cpu_ticks(pid) for name, pid in pids.items()}
        wall = time.monotonic() - t0
        results = cluster.wait(timeout=300)
    finally:
        cluster.kill()  # only what is still running: after a failure above
    failed = [r for r in results if r.returncode != 0]
    for r in failed:
        print(f"--- {r.describe()}\n" + "\n".join(r.output[-30:]), file=sys.stderr)
    for name in sorted(pids):
        pct = 100.0 * (after[name] - before[name]) / hz / wall
        print(json.dumps({"process": name, "cpu_percent_of_one_core": round(pct, 3),
                          "window_s": round(wall, 2), "ticks": after[name] - before[name]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
