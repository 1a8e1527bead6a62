"""Exports of a loaded trace run: Chrome/Perfetto trace-event JSON, a rendered timeline
PNG and per-hop latency distribution plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .trace import HOP_NAMES, HOPS, ROUND_TRIP, WAKE_HOP, Run, hop_samples

# Perfetto/Chrome timestamps are microseconds (float); stamps are nanoseconds.
_US = 1e-3

# Lanes: pid per process (node), tid per lane within it. Workers: lane 0 is the push_pull
# (round trip), lane 1 + s carries the hops of its request to server s. Servers: lane
# 1 + w carries the handling of worker w's requests.
_WORKER_PID = 1000
_SERVER_PID = 1


def _pid(role: str, rank: int) -> int:
    return (_WORKER_PID if role == "worker" else _SERVER_PID) + rank


def to_perfetto(run: Run, max_round_trips: int = 2000) -> Dict[str, Any]:
    """A trace-event dict ({"traceEvents": [...]}) that ui.perfetto.dev and
    chrome://tracing open: a process per node, a thread (lane) per peer, a slice per hop,
    and flow arrows request -> server handling -> response."""
    keep: Dict[int, set] = {}
    for r in run.requests:
        keep.setdefault(r.worker, set()).add(r.handle)
    for w, hs in keep.items():
        keep[w] = set(sorted(hs)[-max_round_trips:])
    reqs = [r for r in run.requests if r.handle in keep.get(r.worker, ())]
    t0 = min((r.stamps[0] for r in reqs), default=0)

    def ts(ns: int) -> float:
        return (ns - t0) * _US

    events: List[Dict[str, Any]] = []
    seen_threads = set()

    def meta(role: str, rank: int, tid: int, thread: str) -> None:
        pid = _pid(role, rank)
        if (pid, None) not in seen_threads:
            seen_threads.add((pid, None))
            host = run.hosts.get(f"{role} {rank}", "")
            events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                           "args": {"name": f"{role} {rank}" + (f" ({host})" if host else "")}})
            events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                           "args": {"sort_index": pid}})
        if (pid, tid) not in seen_threads:
            seen_threads.add((pid, tid))
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                           "args": {"name": thread}})

    def slice_(name: str, role: str, rank: int, tid: int, a: int, b: int,
               args: Dict[str, Any]) -> None:
        events.append({"ph": "X", "name": name, "cat": "meshpost", "pid": _pid(role, rank),
                       "tid": tid, "ts": ts(a), "dur": max(b - a, 0) * _US, "args": args})

    def flow(ph: str, fid: int, role: str, rank: int, tid: int, at_ns: int) -> None:
        e = {"ph": ph, "name": "request" if ph == "s" else "request", "cat": "flow",
             "id": fid, "pid": _pid(role, rank), "tid": tid, "ts": ts(at_ns)}
        if ph == "f":
            e["bp"] = "e"  # bind to the slice enclosing ts (the flow lands inside it)
        events.append(e)

    round_trips: Dict[Tuple[int, int], List[int]] = {}
    flow_id = 0
    for r in reqs:
        st = r.stamps
        w_lane, s_lane = 1 + r.server, 1 + r.worker
        meta("worker", r.worker, w_lane, f"to server {r.server}")
        meta("server", r.server, s_lane, f"from worker {r.worker}")
        args = {"handle": r.handle, "request_id": r.request_id, "push_bytes": r.push_bytes,
                "pull_bytes": r.pull_bytes, "transport": r.transport}
        for name, a, b in HOPS:
            if name in ("request transfer", "response transfer"):
                continue  # drawn as flow arrows between the processes
            if name in ("server queue", "server compute", "respond"):
                slice_(name, "server", r.server, s_lane, st[a], st[b], args)
            else:
                slice_(name, "worker", r.worker, w_lane, st[a], st[b], args)
        # Flow out of the end of "worker send" into "server queue", then out of "respond"
        # into "payload". Each end sits strictly inside its slice (1 ns in) so the viewer
        # binds it there even when a slice has zero length.
        flow_id += 1
        flow("s", flow_id, "worker", r.worker, w_lane, max(st[0], st[1] - 1))
        flow("f", flow_id, "server", r.server, s_lane, min(st[2] + 1, st[3]))
        flow_id += 1
        flow("s", flow_id, "server", r.server, s_lane, max(st[4], st[5] - 1))
        flow("f", flow_id, "worker", r.worker, w_lane, min(st[6] + 1, st[7]))
        rt = round_trips.setdefault((r.worker, r.handle), [st[0], st[7]])
        rt[0], rt[1] = min(rt[0], st[0]), max(rt[1], st[7])
    for (w, h), (a, b) in round_trips.items():
        meta("worker", w, 0, "push_pull")
        wake = run.wakes.get((w, h))
        end = wake if wake is not None and wake >= b else b
        slice_(f"push_pull {h}", "worker", w, 0, a, end, {"handle": h})
        if wake is not None and wake >= b:
            slice_(WAKE_HOP, "worker", w, 0, b, wake, {"handle": h})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"source": "meshpost.trace", "requests": len(reqs)}}


_HOP_COLORS = {
    "worker send": "#4c72b0", "server queue": "#dd8452", "server compute": "#c44e52",
    "respond": "#8172b3", "payload": "#55a868", WAKE_HOP: "#937860",
    "push_pull": "#cccccc",
}


def render_timeline(trace: Dict[str, Any], out_png: str, title: str = "",
                    max_round_trips: int = 6) -> None:
    """Draws a trace-event dict as a Perfetto-like timeline (a row per thread, a bar per
    slice, arrows for flows) for the last `max_round_trips` push_pulls of worker 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = trace["traceEvents"]
    names = {(e["pid"], None): e["args"]["name"] for e in ev
             if e["ph"] == "M" and e["name"] == "process_name"}
    names.update({(e["pid"], e["tid"]): e["args"]["name"] for e in ev
                  if e["ph"] == "M" and e["name"] == "thread_name"})
    slices = [e for e in ev if e["ph"] == "X"]
    rts = sorted((e for e in slices if e["name"].startswith("push_pull")),
                 key=lambda e: e["ts"])
    if rts:
        first_pid = min(e["pid"] for e in rts)
        mine = [e for e in rts if e["pid"] == first_pid][-max_round_trips:]
        lo, hi = mine[0]["ts"], max(e["ts"] + e["dur"] for e in mine)
    else:
        lo, hi = 0.0, 1.0
    pad = (hi - lo) * 0.02
    lo, hi = lo - pad, hi + pad
    origin = lo  # the x axis shows ms from the window's start
    rows = sorted({(e["pid"], e["tid"]) for e in slices})
    row_of = {r: i for i, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(13, 0.55 * len(rows) + 1.8))
    for e in slices:
        a, b = e["ts"], e["ts"] + e["dur"]
        if b < lo or a > hi:
            continue
        key = "push_pull" if e["name"].startswith("push_pull") else e["name"]
        y = row_of[(e["pid"], e["tid"])]
        ax.broken_barh([(a, max(e["dur"], (hi - lo) * 0.001))], (y - 0.35, 0.7),
                       facecolors=_HOP_COLORS.get(key, "#999999"), edgecolor="black",
                       linewidth=0.3)
    starts = {e["id"]: e for e in ev if e["ph"] == "s"}
    for e in ev:
        if e["ph"] != "f" or e["id"] not in starts:
            continue
        s = starts[e["id"]]
        if not (lo <= s["ts"] <= hi and lo <= e["ts"] <= hi):
            continue
        ax.annotate("", xy=(e["ts"], row_of.get((e["pid"], e["tid"]), 0)),
                    xytext=(s["ts"], row_of.get((s["pid"], s["tid"]), 0)),
                    arrowprops={"arrowstyle": "->", "color": "#444444", "lw": 0.6,
                                "alpha": 0.7})
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{names.get((p, None), p)} / {names.get((p, t), t)}" for p, t in rows],
                       fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(lo, hi)
    ticks = ax.get_xticks()
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{(t - origin) / 1000:.1f}" for t in ticks])
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"time (ms), last {max_round_trips} push_pulls of the first worker")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _HOP_COLORS.values()]
    ax.legend(handles, list(_HOP_COLORS), loc="upper center", ncol=7, fontsize=7,
              bbox_to_anchor=(0.5, -0.25 if len(rows) < 6 else -0.12))
    ax.set_title(("meshpost timeline (rendered with matplotlib from the Perfetto JSON)\n"
                  + title)[:200], fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def plot_hops(run: Run, result: Dict[str, Any], out_png: str) -> None:
    """One panel per hop (and the round trip): a box per rank, log-scale microseconds.
    The straggler's box is red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = hop_samples(run)
    nodes = list(result["hops"])
    straggler = result["straggler"].get("rank")
    panels = HOP_NAMES + [ROUND_TRIP]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for i, hop in enumerate(panels):
        ax = axes[i // cols][i % cols]
        data, labels, colors = [], [], []
        for n in nodes:
            v = samples.get(n, {}).get(hop)
            if not v:
                continue
            data.append([max(x, 1) / 1e3 for x in v])
            labels.append(n.replace("server ", "s").replace("worker ", "w"))
            colors.append("#c44e52" if n == straggler else
                          ("#dd8452" if n.startswith("server") else "#4c72b0"))
        ax.set_title(hop, fontsize=10)
        if not data:
            ax.set_axis_off()
            continue
        bp = ax.boxplot(data, labels=labels, showfliers=True, patch_artist=True,
                        flierprops={"markersize": 2, "alpha": 0.4})
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.8)
        ax.set_yscale("log")
        ax.set_ylabel("us", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_axis_off()
    fig.suptitle("meshpost per-hop latency per rank (s = server, w = worker; red = straggler)\n"
                 + result["straggler"]["text"][:160], fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
