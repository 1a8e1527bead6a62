"""nccl-tests-style sweep through meshpost's public API.

    python -m meshpost.bench                                # 4 KiB .. 4 MiB, float32, 1x1
    python -m meshpost.bench --sizes 4K:16M --dtypes bfloat16,float32 --clusters 1x1,2x2 \
        --transport tcp --json out.json --plot out.png

For every cluster shape (M workers x N servers) and transport, one local cluster runs the
whole sweep: per size and dtype, each worker pushes a tensor of that size to every server
and pulls one of the same size back from each (meshpost.Worker.push_pull + wait), timing
every round trip. Prints a live progress line and a table of p50 / p99 round trip and
GB/s (bytes moved per round trip, both ways, all servers, over the mean round trip) per
size. --trace DIR also captures MESHPOST_TRACE=all traces for `python -m meshpost.trace`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

_RESULT = "MPBENCH-RESULT "
_PROGRESS = "MPBENCH-PROGRESS "
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int32", "int64"]


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise ValueError(f"size {text!r}; expected a number with an optional K/M/G suffix")
    value = int(float(num) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r}; expected > 0 bytes")
    return value


def parse_sizes(text: str, factor: int = 4) -> List[int]:
    """'4K,64K' -> those sizes; '4K:4M' -> 4K, 4K*factor, ... up to 4M (like nccl-tests
    -b/-e/-f)."""
    if ":" in text:
        lo_s, hi_s = text.split(":", 1)
        lo, hi = parse_size(lo_s), parse_size(hi_s)
        if hi < lo:
            raise ValueError(f"--sizes {text!r}: the end is below the start")
        out = []
        v = lo
        while v <= hi:
            out.append(v)
            v *= factor
        return out
    return [parse_size(s) for s in text.split(",") if s.strip()]


def parse_clusters(text: str) -> List[Tuple[int, int]]:
    out = []
    for c in text.split(","):
        try:
            m, n = (int(x) for x in c.lower().split("x"))
        except ValueError:
            raise ValueError(f"--clusters entry {c!r}; expected MxN, e.g. 2x2") from None
        if not (1 <= m <= 64 and 1 <= n <= 64):
            raise ValueError(f"--clusters entry {c!r}; expected 1 <= M, N <= 64")
        out.append((m, n))
    return out


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


# ---- node side: this module re-executed in every process of the cluster ----

def _points(cfg: Dict[str, Any]) -> List[Tuple[int, str]]:
    return [(size, dt) for dt in cfg["dtypes"] for size in cfg["sizes"]]


def _tensor(torch: Any, size: int, dtype_name: str, fill: float) -> Any:
    dtype = getattr(torch, dtype_name)
    item = torch.empty((), dtype=dtype).element_size()
    t = torch.empty(max(size // item, 1), dtype=dtype)
    t.fill_(fill)
    return t


def _run_node(cfg: Dict[str, Any]) -> int:
    import torch

    import meshpost

    role = os.environ.get("DMLC_ROLE")
    points = _points(cfg)
    iters, warmup = cfg["iters"], cfg["warmup"]
    if role == "server":
        with meshpost.Server() as s:
            outs = [_tensor(torch, size, dt, 1) for size, dt in points]
            for p, _ in enumerate(points):
                for _ in range(warmup + iters):
                    for req in s.get_batch(timeout=cfg["timeout"]):
                        req.respond([outs[p]])
            s.barrier(timeout=cfg["timeout"])
        return 0
    if role != "worker":
        print(f"meshpost.bench: DMLC_ROLE={role!r}; expected worker or server", file=sys.stderr)
        return 2
    with meshpost.Worker() as w:
        S = w.num_servers
        for p, (size, dt) in enumerate(points):
            push = _tensor(torch, size, dt, 2)
            pulls = [_tensor(torch, size, dt, 0) for _ in range(S)]
            lat: List[int] = []
            for i in range(warmup + iters):
                t0 = time.perf_counter_ns()
                w.push_pull([push], [1], pulls, [2] * S).wait(timeout=cfg["timeout"])
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    lat.append(t1 - t0)
            # Outside the timed loop: the data must have arrived.
            for t in pulls:
                if not bool((t == 1).all()):
                    print(f"meshpost.bench: wrong data in a pull tensor ({size} B {dt})",
                          file=sys.stderr)
                    return 1
            lat.sort()
            moved = (push.numel() * push.element_size() + pulls[0].numel() *
                     pulls[0].element_size()) * S
            mean = statistics.fmean(lat)
            res = {"size": size, "dtype": dt, "worker": w.rank, "iters": iters,
                   "p50_us": lat[len(lat) // 2] / 1e3,
                   "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3,
                   "mean_us": mean / 1e3, "bytes_per_iter": moved,
                   "gbps": moved / mean, "transports": sorted(set(w.transports().values()))}
            print(_RESULT + json.dumps(res), flush=True)
            if w.rank == 0:
                print(_PROGRESS + json.dumps({"done": p + 1, "total": len(points), **res}),
                      flush=True)
        w.barrier(timeout=cfg["timeout"])
    return 0


# ---- driver ----

class _Live:
    """Receives the cluster's output lines as they arrive; shows worker 0's progress."""

    def __init__(self, label: str, stream: Any, quiet: bool) -> None:
        self.label = label
        self.stream = stream
        self.quiet = quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._pending = ""

    def write(self, text: str) -> None:
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            body = line.split("] ", 1)[-1]
            if body.startswith(_PROGRESS) and not self.quiet:
                p = json.loads(body[len(_PROGRESS):])
                msg = (f"[{self.label}] {p['done']}/{p['total']}  {_fmt_bytes(p['size']):>9} "
                       f"{p['dtype']:<9} p50 {p['p50_us']:9.1f} us  {p['gbps']:7.3f} GB/s")
                if self.tty:
                    self.stream.write("\r\033[K" + msg)
                else:
                    self.stream.write(msg + "\n")
                self.stream.flush()

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def run_cluster(m: int, n: int, cfg: Dict[str, Any], transport: str,
                trace_dir: Optional[str], quiet: bool) -> List[Dict[str, Any]]:
    from .launch import Cluster

    env = {"MESHPOST_BENCH_CONFIG": json.dumps(cfg)}
    if transport != "auto":
        env["MESHPOST_TRANSPORT"] = transport
    if trace_dir:
        env.update({"MESHPOST_TRACE": "all",
                    "MESHPOST_TRACE_DIR": os.path.join(trace_dir, f"{m}x{n}-{transport}")})
    label = f"{m}x{n} {transport}"
    live = _Live(label, sys.stderr, quiet)
    cluster = Cluster([sys.executable, "-m", "meshpost.bench", "--node"], workers=m, servers=n,
                      env=env, output=live)
    try:
        cluster.start()
        results = cluster.wait(timeout=cfg["timeout"] * 4 + 60, fail_fast=True)
    finally:
        cluster.kill()
        live.finish()
    failed = [r for r in results if not r.ok]
    if failed:
        detail = "\n".join(f"--- {r.describe()}\n" + "\n".join(r.output[-15:]) for r in failed)
        raise RuntimeError(f"cluster {label} failed:\n{detail}")
    per_point: Dict[Tuple[int, str], List[Dict[str, Any]]] = {}
    for r in results:
        for line in r.output:
            if line.startswith(_RESULT):
                x = json.loads(line[len(_RESULT):])
                per_point.setdefault((x["size"], x["dtype"]), []).append(x)
    rows = []
    for (size, dt), xs in per_point.items():
        rows.append({"cluster": f"{m}x{n}", "transport": transport,
                     "used": sorted({t for x in xs for t in x["transports"]}),
                     "size": size, "dtype": dt, "workers": len(xs),
                     "p50_us": statistics.median(x["p50_us"] for x in xs),
                     "p99_us": max(x["p99_us"] for x in xs),
                     "mean_us": statistics.fmean(x["mean_us"] for x in xs),
                     "gbps": sum(x["gbps"] for x in xs)})
    rows.sort(key=lambda r: (r["dtype"], r["size"]))
    if len(rows) != len(_points(cfg)):
        raise RuntimeError(f"cluster {label}: {len(rows)} results for {len(_points(cfg))} points")
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    out = []
    head = (f"{'cluster':>7} {'transport':>9} {'used':>9} {'dtype':>9} {'size':>10} "
            f"{'p50 (us)':>10} {'p99 (us)':>10} {'GB/s':>8}")
    out.append(head)
    out.append("-" * len(head))
    for r in rows:
        out.append(f"{r['cluster']:>7} {r['transport']:>9} {'+'.join(r['used']):>9} "
                   f"{r['dtype']:>9} {_fmt_bytes(r['size']):>10} {r['p50_us']:10.1f} "
                   f"{r['p99_us']:10.1f} {r['gbps']:8.3f}")
    return "\n".join(out)


def plot(rows: List[Dict[str, Any]], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['cluster']} {r['transport']} {r['dtype']}", []).append(r)
    for label, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["size"])
        x = [r["size"] for r in rs]
        a1.plot(x, [r["p50_us"] for r in rs], marker="o", label=label + " p50")
        a1.fill_between(x, [r["p50_us"] for r in rs], [r["p99_us"] for r in rs], alpha=0.15)
        a2.plot(x, [r["gbps"] for r in rs], marker="o", label=label)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size per tensor (bytes)")
        ax.grid(alpha=0.3)
    a1.set_yscale("log")
    a1.set_ylabel("round trip (us): p50 line, p50..p99 band")
    a2.set_ylabel("GB/s (both ways, all servers)")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.suptitle("meshpost.bench: push_pull round trip")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--node"]:
        cfg = json.loads(os.environ["MESHPOST_BENCH_CONFIG"])
        return _run_node(cfg)
    ap = argparse.ArgumentParser(prog="python -m meshpost.bench",
                                 description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4K:4M",
                    help="bytes per tensor: a list (4K,64K,1M) or START:END stepping by "
                         "--factor (default 4K:4M)")
    ap.add_argument("--factor", type=int, default=4, help="step for START:END sizes")
    ap.add_argument("--dtypes", default="float32", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--clusters", default="1x1", help="MxN list, e.g. 1x1,2x2 (default 1x1)")
    ap.add_argument("--transport", default="auto", help="auto, cma, tcp or rdma (comma list)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds any one wait may take (default 120)")
    ap.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    ap.add_argument("--plot", metavar="OUT.png", help="latency and GB/s vs size")
    ap.add_argument("--trace", metavar="DIR", help="also capture traces (MESHPOST_TRACE=all)")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes, args.factor)
        clusters = parse_clusters(args.clusters)
    except ValueError as e:
        ap.error(str(e))
    if args.factor < 2:
        ap.error(f"--factor={args.factor}; expected >= 2")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes entry {d!r}; expected one of {', '.join(DTYPES)}")
    transports = [t.strip() for t in args.transport.split(",")]
    for t in transports:
        if t not in ("auto", "cma", "tcp", "rdma"):
            ap.error(f"--transport {t!r}; expected auto, cma, tcp or rdma")
    if args.iters < 1 or args.warmup < 0:
        ap.error(f"--iters={args.iters}, --warmup={args.warmup}; expected >= 1 and >= 0")
    if args.timeout <= 0:
        ap.error(f"--timeout={args.timeout}; expected > 0 seconds")
    if args.trace:
        # Files of an earlier sweep in the same directory would be mixed into this run's
        # report (which then refuses them): stop before the sweep, not after it.
        old = sorted(glob.glob(os.path.join(glob.escape(args.trace), "*", "*.mptrace")))
        if old:
            ap.error(f"--trace {args.trace!r} already holds {len(old)} trace file(s) of an "
                     f"earlier run (e.g. {old[0]}); pass an empty or new directory")
    cfg = {"sizes": sizes, "dtypes": dtypes, "iters": args.iters, "warmup": args.warmup,
           "timeout": args.timeout}
    rows: List[Dict[str, Any]] = []
    for m, n in clusters:
        for t in transports:
            try:
                rows += run_cluster(m, n, cfg, t, args.trace, args.quiet)
            except RuntimeError as e:
                print(f"meshpost.bench: {e}", file=sys.stderr)
                return 1
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "results": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    if args.trace:
        print(f"traces: python -m meshpost.trace report {args.trace}/<cluster>-<transport>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
