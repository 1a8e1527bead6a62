"""meshpost AFD demo in Python: attention workers and FFN servers exchanging AFD-shaped
tensors in 3 micro-batch stages that are in flight together.

Per stage a worker pushes uint8 tokens [128, 7168] (the fp8 activations) plus int32 expert
routing [128, 8] to every server and pulls bf16 [128, 7168] back from each server. Each
server answers every worker with a bf16 tensor whose value names the server and stage,
so the worker checks every pull slot. Worker 0 prints p50/p99 round trip per stage.

    python -m meshpost.launch --workers 2 --servers 2 examples/afd_demo.py [--iters N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import meshpost

ROWS, HIDDEN, TOPK = 128, 7168, 8
STAGES = 3


def stage_value(server: int, stage: int) -> float:
    return float(1 + server + 4 * stage)  # small integers are exact in bf16


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run_server(iters: int, warmup: int) -> None:
    with meshpost.Server() as server:
        outs = [torch.full((ROWS, HIDDEN), stage_value(server.rank, st), dtype=torch.bfloat16)
                for st in range(STAGES)]
        for _ in range((iters + warmup) * STAGES):
            for req in server.get_batch(timeout=60):
                tokens, routing = req.tensors
                stage = req.keys[0] // 2
                assert tokens.dtype == torch.uint8 and tuple(tokens.shape) == (ROWS, HIDDEN)
                assert routing.dtype == torch.int32 and tuple(routing.shape) == (ROWS, TOPK)
                # The "FFN": outs[stage] stands in for the expert output of this stage.
                req.respond([outs[stage]])


def run_worker(iters: int, warmup: int) -> None:
    with meshpost.Worker() as worker:
        S = worker.num_servers
        tokens = [torch.full((ROWS, HIDDEN), worker.rank + st, dtype=torch.uint8)
                  for st in range(STAGES)]
        routing = [torch.randint(0, 256, (ROWS, TOPK), dtype=torch.int32)
                   for _ in range(STAGES)]
        outs = [[torch.empty(ROWS, HIDDEN, dtype=torch.bfloat16) for _ in range(S)]
                for _ in range(STAGES)]
        rtt = [[] for _ in range(STAGES)]
        for it in range(iters + warmup):
            handles, started = [], []
            for st in range(STAGES):
                started.append(time.perf_counter_ns())
                handles.append(worker.push_pull([tokens[st], routing[st]], [2 * st, 2 * st + 1],
                                                outs[st], [100 + st] * S))
            for st in range(STAGES):
                handles[st].wait(timeout=60)
                done = time.perf_counter_ns()
                if it >= warmup:
                    rtt[st].append((done - started[st]) / 1e3)
            for st in range(STAGES):
                for s in range(S):
                    want = stage_value(s, st)
                    out = outs[st][s]
                    if float(out[0, 0]) != want or float(out[-1, -1]) != want:
                        raise SystemExit(f"stage {st}: pull slot of server {s} holds the wrong data")
        worker.barrier(servers=False, workers=True, timeout=60)
        if worker.rank == 0:
            transports = sorted(set(worker.transports().values()))
            print(f"\nmeshpost AFD demo (Python): {worker.num_workers} attention workers x {S} FFN "
                  f"servers over {', '.join(transports)}, {iters} iterations, "
                  f"{STAGES} micro-batch stages in flight")
            print(f"push uint8[{ROWS}, {HIDDEN}] + int32[{ROWS}, {TOPK}] to every server, "
                  f"pull bf16[{ROWS}, {HIDDEN}] from each\n")
            print(f"{'worker 0 round trip (us)':<28}{'p50':>10}{'p99':>10}{'mean':>10}")
            for st in range(STAGES):
                print(f"{'  stage ' + str(st):<28}{percentile(rtt[st], 50):>10.1f}"
                      f"{percentile(rtt[st], 99):>10.1f}{statistics.fmean(rtt[st]):>10.1f}")
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int,
                        default=int(os.environ.get("MESHPOST_DEMO_ITERS", "200")))
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    role = os.environ.get("DMLC_ROLE")
    if role == "server":
        run_server(args.iters, args.warmup)
    elif role == "worker":
        run_worker(args.iters, args.warmup)
    elif role == "scheduler":
        meshpost.Scheduler().wait_for_exit()
    else:
        raise SystemExit("run me through the launcher: python -m meshpost.launch --workers 2 "
                         "--servers 2 examples/afd_demo.py")


if __name__ == "__main__":
    main()
