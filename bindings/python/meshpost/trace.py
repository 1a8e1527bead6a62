"""Turn meshpost trace files into answers: per-hop latency, the straggler, a timeline.

    python -m meshpost.trace report DIR                 # text breakdown + straggler verdict
    python -m meshpost.trace report DIR --json          # the same as JSON
    python -m meshpost.trace report DIR --perfetto t.json --plot hops.png

DIR holds the files written by nodes started with MESHPOST_TRACE=all (or sample:N) and
MESHPOST_TRACE_DIR=DIR. See docs/profiling.md. Needs neither torch nor a running cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .trace_file import (KIND_SERVER_REQUEST, KIND_WAKE, KIND_WORKER_REQUEST, TraceFile,
                         best_clock, group_by_node, read_dir)

# (name, first stamp, last stamp) over the eight stamps of ps/trace.h:
# 0 request_start 1 request_posted 2 request_received 3 request_processed
# 4 response_start 5 response_posted 6 response_received 7 response_processed
HOPS: List[Tuple[str, int, int]] = [
    ("worker send", 0, 1),         # ZBatchPushPull entered -> handed to the transport
    ("request transfer", 1, 2),    # worker -> server, across hosts (clock-corrected)
    ("server queue", 2, 3),        # received -> returned by GetBatch (waits for all workers)
    ("server compute", 3, 4),      # GetBatch returned -> Respond called (the user's FFN)
    ("respond", 4, 5),             # Respond entered -> handed to the transport
    ("response transfer", 5, 6),   # server -> worker
    ("payload", 6, 7),             # response header -> payload in the pull tensors
]
WAKE_HOP = "worker wake-up"        # last response in place -> Wait() returned
ROUND_TRIP = "round trip"          # ZBatchPushPull entered -> Wait() returned (or done)
HOP_NAMES = [h[0] for h in HOPS] + [WAKE_HOP]
SERVER_SIDE = {"server queue", "server compute", "respond"}
WORKER_SIDE = {"worker send", "payload", WAKE_HOP}
CROSS_HOST = {"request transfer", "response transfer"}


@dataclass
class Request:
    """One request of one worker to one server, stamps on the scheduler's time base."""

    worker: int
    server: int
    handle: int
    request_id: int
    stamps: List[int]
    push_bytes: int
    pull_bytes: int
    transport: str
    # OS thread that took each stamp: 0, 1, 6, 7 from the worker's record, 2..5 from the
    # server's own record of the request; 0 where unknown (format version 1, or the
    # server's file is missing).
    tids: List[int] = field(default_factory=lambda: [0] * 8)


@dataclass
class Run:
    files: List[TraceFile]
    requests: List[Request]
    wakes: Dict[Tuple[int, int], int]            # (worker, handle) -> Wait() returned
    server_batches: Dict[int, List[List[Tuple[int, int]]]]  # server -> [[(worker, recv)]]
    num_workers: int
    num_servers: int
    hosts: Dict[str, str]                         # "worker 0" -> host
    clock: Dict[str, Any]                         # correction applied, per node
    dropped: int
    notes: List[str] = field(default_factory=list)
    pids: Dict[str, int] = field(default_factory=dict)   # "worker 0" -> OS pid
    wake_tids: Dict[Tuple[int, int], int] = field(default_factory=dict)  # Wait() thread


def _node(role: str, rank: int) -> str:
    return f"{role} {rank}"


def load(directory: str) -> Run:
    """Reads DIR and joins the records into requests on one time base."""
    notes: List[str] = []
    files = read_dir(directory, notes)
    nodes = group_by_node(files)
    hosts = {_node(r, k): fs[0].host for (r, k), fs in nodes.items()}
    pids = {_node(r, k): fs[0].pid for (r, k), fs in nodes.items()}
    # Clock correction: only when the trace spans hosts. On one host every node reads the
    # same CLOCK_MONOTONIC, and a heartbeat estimate would only add its error.
    offsets: Dict[str, int] = {}
    multi_host = len(set(hosts.values())) > 1
    clock: Dict[str, Any] = {"corrected": multi_host, "nodes": {}}
    for (role, rank), fs in nodes.items():
        est = best_clock(fs)
        name = _node(role, rank)
        clock["nodes"][name] = None if est is None else {
            "offset_ns": est.offset_ns, "error_ns": est.error_ns, "rtt_ns": est.rtt_ns,
            "samples": est.samples}
        if not multi_host:
            continue
        if est is None:
            notes.append(f"{name} on {hosts[name]} has no clock estimate; hops to and "
                         f"from it are NOT corrected for clock offset")
        else:
            offsets[name] = est.offset_ns
    num_workers = max(f.num_workers for f in files)
    num_servers = max(f.num_servers for f in files)
    requests: List[Request] = []
    wakes: Dict[Tuple[int, int], int] = {}
    wake_tids: Dict[Tuple[int, int], int] = {}
    server_view: Dict[Tuple[int, int], List[int]] = {}  # (server, request_id) -> stamps
    server_tids: Dict[Tuple[int, int], Tuple[int, ...]] = {}
    batches: Dict[int, Dict[int, List[Tuple[int, int]]]] = {}
    for f in files:
        own = offsets.get(_node(f.role, f.rank), 0)
        for r in f.records:
            if f.role == "worker" and r.kind == KIND_WORKER_REQUEST:
                so = offsets.get(_node("server", r.peer), 0)
                st = list(r.stamps)
                st = [st[i] - (so if 2 <= i <= 5 else own) for i in range(8)]
                requests.append(Request(f.rank, r.peer, r.handle, r.request_id, st,
                                        r.push_bytes, r.pull_bytes, r.transport,
                                        list(r.tids)))
            elif f.role == "worker" and r.kind == KIND_WAKE:
                wakes[(f.rank, r.handle)] = r.stamps[0] - own
                wake_tids[(f.rank, r.handle)] = r.tids[0]
            elif f.role == "server" and r.kind == KIND_SERVER_REQUEST:
                st = [s - own if s else 0 for s in r.stamps]
                # Batches: one GetBatch returns every worker's request at one stamp.
                batches.setdefault(f.rank, {}).setdefault(st[3], []).append((r.peer, st[2]))
                server_view[(f.rank, r.request_id)] = st
                server_tids[(f.rank, r.request_id)] = r.tids
    for q in requests:  # the server's threads, from its own record of the request
        t = server_tids.get((q.server, q.request_id))
        if t is not None:
            q.tids[2:6] = t[2:6]
    if not requests and server_view:
        notes.append("no worker records (workers not traced?): using server records only")
    server_batches = {s: [sorted(v) for _, v in sorted(b.items())] for s, b in batches.items()}
    dropped = sum(f.dropped for f in files)
    if dropped:
        notes.append(f"{dropped} records were dropped at capture (ring full): percentiles "
                     f"are over the records kept")
    return Run(files, requests, wakes, server_batches, num_workers, num_servers, hosts,
               clock, dropped, notes, pids, wake_tids)


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def _summary(values_ns: List[int]) -> Dict[str, float]:
    v = sorted(values_ns)
    return {"count": len(v), "p50_us": _pct(v, 0.5) / 1e3, "p99_us": _pct(v, 0.99) / 1e3,
            "max_us": (v[-1] / 1e3) if v else float("nan")}


def hop_samples(run: Run) -> Dict[str, Dict[str, List[int]]]:
    """{"server 1": {"server compute": [ns, ...], ...}, "worker 0": {...}} including the
    round trip. Per server: its requests from every worker; per worker: its requests to
    every server, its wake-ups and its round trips."""
    out: Dict[str, Dict[str, List[int]]] = {}

    def add(node: str, hop: str, value: int) -> None:
        out.setdefault(node, {}).setdefault(hop, []).append(value)

    last_done: Dict[Tuple[int, int], int] = {}
    starts: Dict[Tuple[int, int], int] = {}
    for r in run.requests:
        for name, a, b in HOPS:
            d = r.stamps[b] - r.stamps[a]
            add(_node("server", r.server), name, d)
            add(_node("worker", r.worker), name, d)
        key = (r.worker, r.handle)
        last_done[key] = max(last_done.get(key, 0), r.stamps[7])
        starts[key] = min(starts.get(key, r.stamps[0]), r.stamps[0])
        add(_node("server", r.server), ROUND_TRIP, r.stamps[7] - r.stamps[0])
    for key, done in last_done.items():
        wake = run.wakes.get(key)
        end = done
        if wake is not None and wake >= done:
            add(_node("worker", key[0]), WAKE_HOP, wake - done)
            end = wake
        add(_node("worker", key[0]), ROUND_TRIP, end - starts[key])
    return out


def _sort_nodes(names) -> List[str]:
    return sorted(names, key=lambda n: (0 if n.startswith("server") else 1,
                                        int(n.split()[1])))


def _fmt_us(us: float) -> str:
    if us != us:  # nan
        return "-"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us"


def _median(values: List[float]) -> float:
    return _pct(sorted(values), 0.5)


def _last_responder_share(run: Run) -> Dict[int, float]:
    """Per server: the share of round trips whose last response came from it."""
    last: Dict[Tuple[int, int], Tuple[int, int]] = {}
    for r in run.requests:
        key = (r.worker, r.handle)
        if key not in last or r.stamps[7] > last[key][0]:
            last[key] = (r.stamps[7], r.server)
    if not last:
        return {}
    counts: Dict[int, int] = {}
    for _, s in last.values():
        counts[s] = counts.get(s, 0) + 1
    return {s: c / len(last) for s, c in counts.items()}


def _late_arrivals(run: Run) -> Dict[int, Dict[str, float]]:
    """Per worker: share of server batches in which its request arrived last, and the
    p50 of how much later than the previous arrival it came when it was last."""
    last_count: Dict[int, int] = {}
    gaps: Dict[int, List[int]] = {}
    total = 0
    for batches in run.server_batches.values():
        for batch in batches:
            if len(batch) < 2:
                continue
            total += 1
            arrivals = sorted(batch, key=lambda x: x[1])
            w, t = arrivals[-1]
            last_count[w] = last_count.get(w, 0) + 1
            gaps.setdefault(w, []).append(t - arrivals[-2][1])
    if not total:
        return {}
    return {w: {"share": c / total, "gap_p50_us": _pct(sorted(gaps[w]), 0.5) / 1e3,
                "batches": total} for w, c in last_count.items()}


def find_straggler(run: Run, stats: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Any]:
    """The rank and hop that stand out the most, with evidence; {"rank": None} if none.

    A candidate is (node, hop) whose p50 exceeds the median p50 of the same hop on the
    other nodes of its role by at least max(50 us, 10 % of the round trip p50) and by 1.5x.
    Server queue time is not held against a worker (a slow worker makes the *other*
    workers' requests wait); a slow worker is found by its requests arriving last.
    """
    rt = [stats[n][ROUND_TRIP]["p50_us"] for n in stats if ROUND_TRIP in stats[n]
          and n.startswith("worker")]
    rt_p50 = _median(rt) if rt else 0.0
    floor_us = max(50.0, 0.10 * rt_p50)
    candidates: List[Dict[str, Any]] = []
    for role, hops in (("server", [h for h in HOP_NAMES if h in SERVER_SIDE or h in CROSS_HOST]),
                       ("worker", [h for h in HOP_NAMES if h in WORKER_SIDE or h in CROSS_HOST])):
        nodes = [n for n in stats if n.startswith(role)]
        if len(nodes) < 2:
            continue
        for hop in hops:
            for n in nodes:
                if hop not in stats[n]:
                    continue
                others = [stats[o][hop]["p50_us"] for o in nodes if o != n and hop in stats[o]]
                if not others:
                    continue
                mine = stats[n][hop]["p50_us"]
                base = _median(others)
                excess = mine - base
                if excess >= floor_us and mine >= 1.5 * max(base, 1e-9):
                    candidates.append({"rank": n, "hop": hop, "p50_us": mine,
                                       "others_p50_us": base, "excess_us": excess})
    late = _late_arrivals(run)
    if run.num_workers >= 2:
        for w, info in late.items():
            if info["share"] >= 0.5 and info["gap_p50_us"] >= floor_us:
                candidates.append({"rank": _node("worker", w), "hop": "late request",
                                   "p50_us": info["gap_p50_us"], "others_p50_us": 0.0,
                                   "excess_us": info["gap_p50_us"] * info["share"]})
    verdict: Dict[str, Any] = {"rank": None, "threshold_us": floor_us,
                               "round_trip_p50_us": rt_p50, "candidates": candidates}
    if not candidates:
        verdict["text"] = (f"no straggler: no rank's hop p50 exceeds the others' by "
                           f"{_fmt_us(floor_us)} and 1.5x")
        return verdict
    best = max(candidates, key=lambda c: c["excess_us"])
    verdict.update(best)
    name = best["rank"]
    if best["hop"] == "late request":
        w = int(name.split()[1])
        info = late[w]
        verdict["text"] = (
            f"{name}: its requests reached the servers last in {info['share']:.0%} of "
            f"{info['batches']} batches, p50 {_fmt_us(info['gap_p50_us'])} after the "
            f"previous worker's; every server waited for it in 'server queue'")
        verdict["evidence"] = {"late_share": info["share"], "batches": info["batches"]}
        return verdict
    evidence = (f"{name}: {best['hop']} p50 {_fmt_us(best['p50_us'])} vs "
                f"{_fmt_us(best['others_p50_us'])} for the others "
                f"(+{_fmt_us(best['excess_us'])})")
    if name.startswith("server"):
        share = _last_responder_share(run).get(int(name.split()[1]), 0.0)
        verdict["evidence"] = {"last_responder_share": share}
        if share >= 0.999:
            evidence += "; every batch waited for it"
        else:
            evidence += f"; its response was the last a worker waited for in {share:.0%} " \
                        f"of round trips"
    verdict["text"] = evidence
    return verdict


def analyze(run: Run) -> Dict[str, Any]:
    samples = hop_samples(run)
    stats = {n: {h: _summary(v) for h, v in hops.items()} for n, hops in samples.items()}
    transports = sorted({r.transport for r in run.requests})
    sizes = sorted({r.push_bytes for r in run.requests})
    return {
        "files": len(run.files),
        "requests": len(run.requests),
        "num_workers": run.num_workers,
        "num_servers": run.num_servers,
        "transports": transports,
        "push_bytes": sizes,
        "hosts": run.hosts,
        "clock": run.clock,
        "dropped": run.dropped,
        "notes": run.notes,
        "hops": {n: stats[n] for n in _sort_nodes(stats)},
        "straggler": find_straggler(run, stats),
    }


def format_text(result: Dict[str, Any]) -> str:
    lines = [f"meshpost trace: {result['requests']} requests from {result['num_workers']} "
             f"worker(s) to {result['num_servers']} server(s), {result['files']} file(s); "
             f"transport {', '.join(result['transports']) or '-'}; push sizes "
             f"{', '.join(str(b) for b in result['push_bytes'][:6]) or '-'} B"]
    if result["clock"]["corrected"]:
        lines.append("clocks: traces span hosts; stamps corrected by each node's offset to "
                     "the scheduler:")
        for n, c in sorted(result["clock"]["nodes"].items()):
            lines.append(f"  {n}: " + ("no estimate" if c is None else
                                       f"offset {c['offset_ns'] / 1e3:+.1f} us "
                                       f"+/- {c['error_ns'] / 1e3:.1f} us"))
    else:
        known = {n: c for n, c in result["clock"]["nodes"].items() if c is not None}
        lines.append("clocks: one host, one clock: no correction needed" + (
            " (heartbeat estimates, for reference: " + ", ".join(
                f"{n} {c['offset_ns'] / 1e3:+.1f} +/- {c['error_ns'] / 1e3:.1f} us"
                for n, c in sorted(known.items())) + ")" if known else ""))
    for note in result["notes"]:
        lines.append(f"note: {note}")
    hops = result["hops"]
    nodes = list(hops)
    width = max([len(n) for n in nodes] + [8])
    # Overview first: p50 of every hop per rank, one line per rank.
    short = {"worker send": "send", "request transfer": "req xfer", "server queue": "queue",
             "server compute": "compute", "respond": "respond",
             "response transfer": "resp xfer", "payload": "payload", WAKE_HOP: "wake-up",
             ROUND_TRIP: "round trip"}
    cols = HOP_NAMES + [ROUND_TRIP]
    lines.append("")
    lines.append("p50 per hop:")
    lines.append(f"  {'rank':<{width}} " + " ".join(f"{short[h]:>10}" for h in cols))
    for n in nodes:
        lines.append(f"  {n:<{width}} " + " ".join(
            f"{_fmt_us(hops[n][h]['p50_us']) if h in hops[n] else '-':>10}" for h in cols))
    for hop in HOP_NAMES + [ROUND_TRIP]:
        rows = [(n, hops[n][hop]) for n in nodes if hop in hops[n]]
        if not rows:
            continue
        lines.append("")
        lines.append(f"{hop}:")
        lines.append(f"  {'rank':<{width}} {'p50':>10} {'p99':>10} {'max':>10} {'count':>8}")
        for n, s in rows:
            lines.append(f"  {n:<{width}} {_fmt_us(s['p50_us']):>10} {_fmt_us(s['p99_us']):>10} "
                         f"{_fmt_us(s['max_us']):>10} {s['count']:>8}")
    lines.append("")
    lines.append("straggler: " + result["straggler"]["text"])
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshpost.trace",
                                description="Analyse meshpost trace files (MESHPOST_TRACE_DIR).")
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="per-hop latency breakdown and straggler verdict")
    rep.add_argument("dir", help="directory given as MESHPOST_TRACE_DIR")
    rep.add_argument("--json", action="store_true", help="print JSON instead of text")
    rep.add_argument("--perfetto", metavar="OUT.json",
                     help="write a Chrome/Perfetto trace-event file (ui.perfetto.dev)")
    rep.add_argument("--plot", metavar="OUT.png", help="write per-hop latency distributions")
    rep.add_argument("--timeline", metavar="OUT.png",
                     help="render the timeline to a PNG (for machines without a browser)")
    rep.add_argument("--max-round-trips", type=int, default=2000, metavar="N",
                     help="round trips per worker in --perfetto/--timeline (default 2000; "
                          "the latest are kept)")
    args = p.parse_args(argv)
    if args.max_round_trips < 1:
        p.error(f"--max-round-trips={args.max_round_trips}; expected >= 1")
    try:
        run = load(args.dir)
    except (OSError, ValueError) as e:
        print(f"meshpost.trace: {e}", file=sys.stderr)
        return 2
    result = analyze(run)
    if args.perfetto or args.timeline:
        from .trace_export import render_timeline, to_perfetto

        events = to_perfetto(run, max_round_trips=args.max_round_trips)
        if args.perfetto:
            with open(args.perfetto, "w") as f:
                json.dump(events, f)
            result["perfetto"] = args.perfetto
        if args.timeline:
            render_timeline(events, args.timeline, title=result["straggler"]["text"])
            result["timeline"] = args.timeline
    if args.plot:
        from .trace_export import plot_hops

        plot_hops(run, result, args.plot)
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    else:
        print(format_text(result))
        for key in ("perfetto", "timeline", "plot"):
            if key in result:
                print(f"wrote {key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
