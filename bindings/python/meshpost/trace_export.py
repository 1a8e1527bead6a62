"""Exports of a loaded trace run: Chrome/Perfetto trace-event JSON, a rendered timeline
PNG and per-hop latency distribution plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from .trace import HOP_NAMES, ROUND_TRIP, WAKE_HOP, Run, hop_samples

# Perfetto/Chrome timestamps are microseconds (float); stamps are nanoseconds.
_US = 1e-3

# Track layout. A process per node with its real OS pid (a synthetic one when two nodes'
# pids collide, e.g. on different hosts), a thread track per real OS thread with the tid
# that took the stamps (format version 2), named by what that thread did:
#   worker: "caller" (ZBatchPushPull: worker send), "van receive" (payload),
#           "Wait()" (worker wake-up), "GPU copy" (staged push or pull)
#   server: "van receive" (a request arrived), "get_batch" (server queue: a request waits
#           until GetBatch returns it), "respond" (server compute, then respond)
# A hop is drawn on the thread that ended it. Trace-event slices on one track must nest;
# where a thread's hops overlap without nesting (a request queued while the thread still
# computes the previous batch), the later one goes on an extra track of the same thread,
# "<name> (overlap 2)". Version 1 files have no thread ids: their hops go on one track per
# peer ("to server s" / "from worker w"), as before. Round trips are async slices on the
# worker's "round trip" track.
_SYNTHETIC_PID = 10_000_000
# Viewers keep tids in 32 bits (Perfetto: uint32; some int32), and Linux tids stay below
# 2^22 (PID_MAX_LIMIT): extra tracks of a thread are tid + k * 2^22 (k < 256), version-1
# per-peer tracks start at 2^30.
_LANE_TID = 1 << 22
_MAX_LANES = 256
_PEER_TID = 1 << 30


class _Slice:
    __slots__ = ("node", "thread", "name", "a", "b", "args", "flows", "tid")

    def __init__(self, node, thread, name, a, b, args):
        self.node, self.thread, self.name, self.a, self.b = node, thread, name, a, max(a, b)
        self.args, self.flows, self.tid = args, [], thread

    def flow(self, ph: str, fid: int, at: int) -> None:
        # Each end sits strictly inside the slice (1 ns in where possible) so the viewer
        # binds it there.
        self.flows.append((ph, fid, min(max(at, self.a), self.b)))


def _assign_lanes(slices: List[_Slice]) -> Dict[Tuple[str, int], int]:
    """Puts each thread's slices on nested tracks: slice.tid becomes the real tid or an
    extra track of it. Returns the number of tracks per (node, thread)."""
    by_thread: Dict[Tuple[str, int], List[_Slice]] = {}
    for sl in slices:
        by_thread.setdefault((sl.node, sl.thread), []).append(sl)
    lanes_of: Dict[Tuple[str, int], int] = {}
    for key, group in by_thread.items():
        group.sort(key=lambda x: (x.a, -(x.b - x.a)))
        stacks: List[List[int]] = []  # per lane, the ends of its open slices
        for sl in group:
            for i, st in enumerate(stacks):
                while st and st[-1] <= sl.a:
                    st.pop()
                if not st or sl.b <= st[-1]:
                    st.append(sl.b)
                    sl.tid = sl.thread + i * _LANE_TID
                    break
            else:
                if len(stacks) < _MAX_LANES:
                    stacks.append([sl.b])
                else:  # pathological overlap: share the last track (may not nest)
                    stacks[-1].append(sl.b)
                sl.tid = sl.thread + (len(stacks) - 1) * _LANE_TID
        lanes_of[key] = len(stacks)
    return lanes_of


def to_perfetto(run: Run, max_round_trips: int = 2000) -> Dict[str, Any]:
    """A trace-event dict ({"traceEvents": [...]}) that ui.perfetto.dev and
    chrome://tracing open: a process per node, a track per OS thread, a slice per hop, and
    flow arrows worker send -> server queue and respond -> payload."""
    keep: Dict[int, set] = {}
    for r in run.requests:
        keep.setdefault(r.worker, set()).add(r.handle)
    for w, hs in keep.items():
        keep[w] = set(sorted(hs)[-max_round_trips:])
    reqs = [r for r in run.requests if r.handle in keep.get(r.worker, ())]
    t0 = min((r.stamps[0] for r in reqs), default=0)

    def ts(ns: int) -> float:
        return round((ns - t0) * _US, 3)

    nodes = sorted({f"worker {r.worker}" for r in reqs} | {f"server {r.server}" for r in reqs},
                   key=lambda n: (n.split()[0] != "worker", int(n.split()[1])))
    pid_of: Dict[str, int] = {}
    for i, node in enumerate(nodes):
        pid = run.pids.get(node, 0)
        pid_of[node] = pid if pid and pid not in pid_of.values() else _SYNTHETIC_PID + i
    roles: Dict[Tuple[str, int], List[str]] = {}  # (node, tid) -> what the thread did

    def thread(node: str, tid: int, role: str, peer_lane: Tuple[int, str]) -> int:
        if tid == 0:  # version 1: no thread ids, one track per peer
            tid, role = _PEER_TID + peer_lane[0], peer_lane[1]
        rs = roles.setdefault((node, tid), [])
        if role not in rs:
            rs.append(role)
        return tid

    slices: List[_Slice] = []
    flow_id = 0
    by_handle: Dict[Tuple[int, int], List[Any]] = {}
    for r in reqs:
        by_handle.setdefault((r.worker, r.handle), []).append(r)
    async_events: List[Dict[str, Any]] = []
    instants: List[Tuple[str, int, str, int]] = []  # (node, tid, name, ns)
    for (w, h), group in sorted(by_handle.items(), key=lambda kv: kv[1][0].stamps[0]):
        wn = f"worker {w}"
        group.sort(key=lambda r: r.stamps[1])
        prev = min(r.stamps[0] for r in group)
        for r in group:
            st, td = r.stamps, r.tids
            sn = f"server {r.server}"
            args = {"handle": r.handle, "request_id": r.request_id, "server": r.server,
                    "worker": r.worker, "push_bytes": r.push_bytes,
                    "pull_bytes": r.pull_bytes, "transport": r.transport}
            to_s, from_w = (1 + r.server, f"to server {r.server}"), (1 + r.worker,
                                                                   f"from worker {r.worker}")
            caller = thread(wn, td[0], "caller", to_s)
            sender = caller if td[1] in (0, td[0]) else thread(wn, td[1], "GPU copy", to_s)
            # On the sending thread the sends to each server follow one another: the slice
            # for server s starts where the send to the previous server ended.
            send = _Slice(wn, sender, "worker send", max(prev, st[0]), st[1], args)
            prev = max(prev, st[1])
            queue = _Slice(sn, thread(sn, td[3], "get_batch", from_w), "server queue", st[2],
                           st[3], args)
            if td[2]:
                instants.append((sn, thread(sn, td[2], "van receive", from_w),
                                 f"request from worker {r.worker}", st[2]))
            compute = _Slice(sn, thread(sn, td[4], "respond", from_w), "server compute",
                             st[3], st[4], args)
            respond = _Slice(sn, thread(sn, td[5], "respond" if td[5] in (0, td[4])
                                        else "GPU copy", from_w), "respond", st[4], st[5],
                             args)
            payload = _Slice(wn, thread(wn, td[6], "van receive", to_s), "payload", st[6],
                             st[7], args)
            if td[7] and td[7] != td[6]:
                instants.append((wn, thread(wn, td[7], "GPU copy", to_s),
                                 f"response of server {r.server} in place", st[7]))
            flow_id += 1
            send.flow("s", flow_id, st[1] - 1)
            queue.flow("f", flow_id, st[2] + 1)
            flow_id += 1
            respond.flow("s", flow_id, st[5] - 1)
            payload.flow("f", flow_id, st[6] + 1)
            slices += [send, queue, compute, respond, payload]
        start = min(r.stamps[0] for r in group)
        done = max(r.stamps[7] for r in group)
        wake = run.wakes.get((w, h))
        end = wake if wake is not None and wake >= done else done
        if wake is not None and wake >= done:
            wt = run.wake_tids.get((w, h), 0)
            slices.append(_Slice(wn, thread(wn, wt, "Wait()", (0, "push_pull")),
                                 WAKE_HOP, done, wake, {"handle": h}))
        # Round trip: not one thread's work (the caller returns before the responses
        # arrive), so an async slice on the worker's "round trip" track.
        for ph, at in (("b", start), ("e", end)):
            async_events.append({"ph": ph, "name": "round trip", "cat": "meshpost",
                                 "id2": {"local": f"{w}:{h}"}, "pid": pid_of[wn],
                                 "tid": 0, "ts": ts(at),
                                 "args": {"handle": h, "servers": len(group)}
                                 if ph == "b" else {}})
    lanes = _assign_lanes(slices)

    events: List[Dict[str, Any]] = []
    for node in nodes:
        host = run.hosts.get(node, "")
        pid = pid_of[node]
        label = f"{node} (pid {run.pids.get(node, '?')}" + (f", {host})" if host else ")")
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": nodes.index(node)}})
    for (node, tid), rs in sorted(roles.items()):
        for k in range(lanes.get((node, tid), 1)):
            if tid >= _PEER_TID:
                name = " / ".join(rs)
            else:
                name = f"{' / '.join(rs)} tid {tid}"
            if k:
                name += f" (overlap {k + 1})"
            events.append({"ph": "M", "name": "thread_name", "pid": pid_of[node],
                           "tid": tid + k * _LANE_TID, "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid_of[node],
                           "tid": tid + k * _LANE_TID,
                           "args": {"sort_index": (tid % _LANE_TID) * 8 + k}})
    slices.sort(key=lambda x: (x.a, -(x.b - x.a)))
    for sl in slices:
        events.append({"ph": "X", "name": sl.name, "cat": "meshpost", "pid": pid_of[sl.node],
                       "tid": sl.tid, "ts": ts(sl.a), "dur": round((sl.b - sl.a) * _US, 3),
                       "args": sl.args})
        for ph, fid, at in sl.flows:
            e = {"ph": ph, "name": "request", "cat": "flow", "id": fid,
                 "pid": pid_of[sl.node], "tid": sl.tid, "ts": ts(at)}
            if ph == "f":
                e["bp"] = "e"  # bind to the slice enclosing ts
            events.append(e)
    for node, tid, name, at in instants:
        events.append({"ph": "i", "s": "t", "name": name, "cat": "meshpost",
                       "pid": pid_of[node], "tid": tid, "ts": ts(at)})
    events += async_events
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
    # Round trips (async "b"/"e" pairs) become slices of a "round trip" row per worker.
    begins = {(e["pid"], json.dumps(e.get("id2", e.get("id")))): e for e in ev
              if e["ph"] == "b"}
    for e in ev:
        b = begins.get((e["pid"], json.dumps(e.get("id2", e.get("id"))))) \
            if e["ph"] == "e" else None
        if b is not None:
            slices.append({"ph": "X", "name": "push_pull", "pid": e["pid"], "tid": -1,
                           "ts": b["ts"], "dur": e["ts"] - b["ts"]})
            names[(e["pid"], -1)] = "round trip"
    rts = sorted((e for e in slices if e["name"] == "push_pull"), key=lambda e: e["ts"])
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
    ax.set_yticklabels([f"{str(names.get((p, None), p)).split(' (')[0]} / "
                        f"{names.get((p, t), t)}" for p, t in rows], fontsize=8)
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
