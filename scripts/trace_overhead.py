#!/usr/bin/env python3
"""Trace capture overhead, A/B within the same cluster processes (docs/profiling.md).

Each run starts one meshpost_cluster_bench cluster with MESHPOST_TRACE=alternate:N: the
workers' handle ids alternate between blocks that are captured (MESHPOST_TRACE=all
behaviour: records to the ring, the writer thread writes them) and blocks that are not,
every `--block` round trips. Worker 0 reports the median round trip of every block. A
captured block is paired with the mean of the uncaptured blocks on either side, so slow
drifts of a noisy machine (other jobs, frequency, page cache) hit both sides alike; the estimate
is the median over all pairs of all runs of (captured median / uncaptured median), with a
bootstrap 95 % confidence interval over the pairs. The data-path cost of one record is
measured directly by meshpost_trace_bench.

    /usr/bin/python3 scripts/trace_overhead.py --bin-dir build --shapes afd,4KiB \\
        --runs 5 --json /tmp/trace_overhead.json

No thresholds: this prints what it measured, with the load average, and leaves the
judgement to the reader (the budget is <= 2 % of the AFD round trip, <= 5 % at 4 KiB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # push uint8[128, 7168] + int32[4], pull bf16[128, 7168] per server (scripts/bench.py)
    # A block lasts ~50-100 ms, far longer than the writer's 5 ms drain period, so the
    # writing of a captured block's records happens inside that block.
    "afd": dict(push=128 * 7168, push_extra=16, pull=128 * 7168 * 2, block=100, iters=4000),
    "4KiB": dict(push=4096, push_extra=0, pull=4096, block=2000, iters=40000),
}


def ids_per_push_pull(shape: dict) -> int:
    # ZBatchPushPull allocates one handle id per push tensor and per pull slot of a server.
    return (2 if shape["push_extra"] else 1) + 1


def run_once(bin_dir: str, shape: dict, cluster: str, transport: str, block: int,
             iters: int) -> dict:
    m, n = (int(x) for x in cluster.split("x"))
    trace_dir = tempfile.mkdtemp(prefix="meshpost-trace-ab-")
    env = dict(os.environ, MESHPOST_TRACE=f"alternate:{block * ids_per_push_pull(shape)}",
               MESHPOST_TRACE_DIR=trace_dir)
    cmd = [os.path.join(bin_dir, "meshpost_cluster_bench"), "--workers", str(m),
           "--servers", str(n), "--transport", transport, "--push", str(shape["push"]),
           "--push-extra", str(shape["push_extra"]), "--pull", str(shape["pull"]),
           "--iters", str(iters), "--warmup", str(max(50, block * 2))]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        files = [f for f in os.listdir(trace_dir) if f.endswith(".mptrace")]
        r["trace_files"] = len(files)
        r["trace_bytes"] = sum(os.path.getsize(os.path.join(trace_dir, f)) for f in files)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    blocks = r["worker0"].get("trace_ab_blocks")
    if not blocks:
        raise RuntimeError("worker 0 reported no trace_ab_blocks: is meshpost_cluster_bench "
                           "older than MESHPOST_TRACE=alternate:N?")
    return r


def pairs_of(blocks: list, block: int) -> list:
    """(captured median, uncaptured median) for each full captured block between two full
    uncaptured blocks; the uncaptured side is the mean of those two neighbours, which
    cancels a drift that is linear over the three blocks (warm-up, a job starting)."""
    out = []
    for prev, cur, nxt in zip(blocks, blocks[1:], blocks[2:]):
        if (cur[0], prev[0], nxt[0]) == (1, 0, 0) and prev[2] == cur[2] == nxt[2] == block:
            out.append((cur[1], (prev[1] + nxt[1]) / 2))
    return out


def bootstrap_median_ci(ratios: list, rounds: int = 4000, seed: int = 1) -> tuple:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                  for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def record_cost(bin_dir: str) -> dict:
    d = tempfile.mkdtemp(prefix="meshpost-trace-bench-")
    try:
        out = subprocess.run([os.path.join(bin_dir, "meshpost_trace_bench"), "300000", d],
                             capture_output=True, text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default="build",
                    help="directory with meshpost_cluster_bench and meshpost_trace_bench")
    ap.add_argument("--shapes", default="afd,4KiB", help="afd and/or 4KiB")
    ap.add_argument("--cluster", default="1x1", help="MxN (default 1x1)")
    ap.add_argument("--transport", default="cma", help="tcp | cma | cma-shm (default cma)")
    ap.add_argument("--runs", type=int, default=5, help="clusters per shape (default 5)")
    ap.add_argument("--block", type=int,
                    help="round trips per captured / uncaptured block (default: afd 100, "
                         "4KiB 2000)")
    ap.add_argument("--iters", type=int, help="round trips per run (default per shape)")
    ap.add_argument("--json", metavar="OUT", help="write the results here")
    args = ap.parse_args(argv)
    for name, value, low in (("--runs", args.runs, 1), ("--block", args.block, 2),
                             ("--iters", args.iters, 4)):
        if value is not None and value < low:
            ap.error(f"{name}={value}; expected >= {low}")
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: {s!r}; expected afd and/or 4KiB")
    result = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count(),
              "cluster": args.cluster, "transport": args.transport, "shapes": {}}
    result["record_cost"] = record_cost(args.bin_dir)
    print(f"per record (meshpost_trace_bench): {json.dumps(result['record_cost'])}",
          flush=True)
    for s in shapes:
        shape = SHAPES[s]
        iters = args.iters or shape["iters"]
        block = args.block or shape["block"]
        pairs, runs = [], []
        for i in range(args.runs):
            t = time.time()
            r = run_once(args.bin_dir, shape, args.cluster, args.transport, block, iters)
            p = pairs_of(r["worker0"]["trace_ab_blocks"], block)
            pairs += p
            ratios = [a / b for a, b in p]
            runs.append({"p50_us": r["p50_us"], "pairs": len(p),
                         "median_ratio": statistics.median(ratios) if ratios else None,
                         "trace_bytes": r["trace_bytes"], "seconds": round(time.time() - t, 1),
                         "load_average": os.getloadavg()[0]})
            print(f"{s} run {i + 1}/{args.runs}: p50 {r['p50_us']:.1f} us, {len(p)} pairs, "
                  f"median captured/uncaptured {runs[-1]['median_ratio'] or float('nan'):.4f}, "
                  f"load {runs[-1]['load_average']:.1f}", flush=True)
        ratios = [a / b for a, b in pairs]
        lo, hi = bootstrap_median_ci(ratios)
        run_p50 = statistics.median(x["p50_us"] for x in runs)
        if not pairs:
            raise RuntimeError(f"{s}: no complete captured/uncaptured pair; raise --iters "
                               f"above 2 x the block ({block})")
        result["shapes"][s] = {
            "block": block, "iters_per_run": iters, "pairs": len(pairs), "median_ratio": statistics.median(ratios),
            "ci95": [lo, hi], "median_run_p50_us": run_p50,
            "share_of_pairs_slower_when_captured": sum(x > 1 for x in ratios) / len(ratios),
            "runs": runs}
        print(f"{s}: captured / uncaptured round trip, median of {len(pairs)} pairs = "
              f"{statistics.median(ratios):.4f} (95 % CI {lo:.4f} .. {hi:.4f}); round trip p50 "
              f"{run_p50:.1f} us (median of the runs)", flush=True)
    result["load_average_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
