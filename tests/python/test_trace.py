"""Trace capture and analysis (docs/profiling.md): a 2x2 cluster with one slowed rank
writes trace files; `python -m meshpost.trace report` must name that rank and hop, and
the Perfetto, timeline and plot exports must be well formed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import meshpost
from meshpost import trace as mtrace
from meshpost import trace_file

# The suite runs twice in CI (transport auto, then MESHPOST_TRANSPORT=tcp); scenarios whose
# logic does not depend on the transport run in the first pass only, to bound CI time.
FIRST_PASS_ONLY = pytest.mark.skipif(os.environ.get("MESHPOST_TRANSPORT") == "tcp",
                                 reason="transport-independent; covered by the default pass")

ITERATIONS = 25
SLEEP_MS = 25  # far above a same-host hop (tens to hundreds of us) even on a loaded box


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshpost.trace", "report", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def slow_server_trace(tmp_path_factory):
    from conftest import ClusterRunner

    d = tmp_path_factory.mktemp("slow_server")
    runner = ClusterRunner()
    try:
        runner.run("trace_capture.py", workers=2, servers=2,
                   args=[str(d), str(ITERATIONS), "server", "1", str(SLEEP_MS)], timeout=180)
    finally:
        runner.close()
    return d


def test_every_node_writes_its_own_file(slow_server_trace):
    files = trace_file.read_dir(str(slow_server_trace))
    nodes = {(f.role, f.rank) for f in files}
    assert nodes == {("worker", 0), ("worker", 1), ("server", 0), ("server", 1)}
    for f in files:
        assert f.mode == "all" and f.dropped == 0 and f.truncated_bytes == 0, f.path
        kinds = {r.kind for r in f.records}
        if f.role == "worker":
            # One record per server per push_pull, plus a wake-up record per wait.
            reqs = [r for r in f.records if r.kind == trace_file.KIND_WORKER_REQUEST]
            assert len(reqs) == 2 * ITERATIONS
            assert trace_file.KIND_WAKE in kinds
            for r in reqs:
                assert r.push_bytes == 4096 and r.pull_bytes == 1024 and r.keys[0] == 7
                assert r.transport in ("cma", "shm", "tcp"), r.transport
                assert all(s > 0 for s in r.stamps) and list(r.stamps) == sorted(r.stamps)
        else:
            reqs = [r for r in f.records if r.kind == trace_file.KIND_SERVER_REQUEST]
            assert len(reqs) == 2 * ITERATIONS
            assert {r.peer for r in reqs} == {0, 1}


def test_report_names_the_slow_server_and_hop(slow_server_trace):
    out = run_report(str(slow_server_trace), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    verdict = result["straggler"]
    assert verdict["rank"] == "server 1", verdict
    assert verdict["hop"] == "server compute", verdict
    assert verdict["p50_us"] >= SLEEP_MS * 1000 * 0.9, verdict
    assert verdict["excess_us"] >= SLEEP_MS * 1000 * 0.5, verdict
    # The worker waits for the slow server's response in (nearly) every round trip.
    assert verdict["evidence"]["last_responder_share"] >= 0.9, verdict
    assert "server 1" in verdict["text"] and "server compute" in verdict["text"]
    hops = result["hops"]
    for node in ("server 0", "server 1", "worker 0", "worker 1"):
        for hop in mtrace.HOP_NAMES[:-1] + ["round trip"]:
            s = hops[node][hop]
            assert s["count"] > 0 and s["p50_us"] <= s["p99_us"] <= s["max_us"], (node, hop, s)
        if node.startswith("worker"):
            assert hops[node]["worker wake-up"]["count"] == ITERATIONS
            assert hops[node]["round trip"]["p50_us"] >= SLEEP_MS * 1000 * 0.9
    assert not result["clock"]["corrected"]  # one host: one clock


def test_heartbeat_clock_estimates_bound_the_true_offset(slow_server_trace):
    # On one host every process reads the same CLOCK_MONOTONIC: the true offset is 0, so
    # each NTP-style estimate must lie within its own error bound of 0. The run lasts
    # longer than several heartbeat periods (25 x 25 ms of sleeps, 200 ms heartbeats).
    estimates = {}
    for f in trace_file.read_dir(str(slow_server_trace)):
        for c in f.clocks:
            assert c.samples >= 1 and c.rtt_ns > 0 and c.error_ns * 2 >= c.rtt_ns, c
            assert abs(c.offset_ns) <= c.error_ns, (f.path, c)
            estimates[(f.role, f.rank)] = c
    assert estimates, "no node recorded a clock estimate"


def test_text_report_states_the_verdict(slow_server_trace):
    out = run_report(str(slow_server_trace))
    assert out.returncode == 0, out.stderr
    assert "straggler: server 1: server compute p50" in out.stdout, out.stdout
    for hop in mtrace.HOP_NAMES + ["round trip"]:
        assert f"\n{hop}:\n" in out.stdout, hop


def _thread_names(ev):
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in ev
            if e["ph"] == "M" and e["name"] == "thread_name"}


def test_perfetto_export_has_per_thread_tracks_slices_and_flows(slow_server_trace, tmp_path):
    pf, png, tl = tmp_path / "t.json", tmp_path / "hops.png", tmp_path / "timeline.png"
    out = run_report(str(slow_server_trace), "--perfetto", str(pf), "--plot", str(png),
                     "--timeline", str(tl))
    assert out.returncode == 0, out.stderr
    trace = json.loads(pf.read_text())
    ev = trace["traceEvents"]
    # A process per node, with the real OS pid of the process that wrote its file.
    pid_of = {f"{f.role} {f.rank}": f.pid for f in trace_file.read_dir(str(slow_server_trace))}
    processes = {e["args"]["name"].split(" (")[0]: e["pid"] for e in ev
                 if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == pid_of
    node_of = {pid: node for node, pid in processes.items()}
    threads = _thread_names(ev)
    slices = [e for e in ev if e["ph"] == "X"]
    # Every slice is on a named track of a real OS thread, named "<what it did> tid <tid>"
    # (an extra "(overlap k)" track of a thread where its hops overlap without nesting).
    for e in slices:
        name = threads[(e["pid"], e["tid"])]
        assert f" tid {e['tid'] % (1 << 22)}" in name, (name, e)
    def track(e):
        return threads[(e["pid"], e["tid"])].split(" tid ")[0]
    on = {}
    for e in slices:
        on.setdefault((node_of[e["pid"]].split()[0], e["name"]), set()).add(track(e))
    # The programs call push_pull / wait / get_batch / respond on their main thread, whose
    # tid is the pid. Responses and requests arrive on the van's receive thread, or, over
    # cma with caller-driven progress (docs/threads.md), on that main thread while it waits
    # in wait() / get_batch(): its track is then named for both.
    # A track's name lists its roles in the order the thread first took them.
    def main_of(name, required):
        roles = set(name.split(" / "))
        return required <= roles <= required | {"van receive"}

    def worker_main(name):
        return main_of(name, {"caller", "Wait()"})

    def server_main(name):
        return main_of(name, {"get_batch", "respond"})

    assert len(on[("worker", "worker send")]) == 1, on
    assert all(worker_main(n) for n in on[("worker", "worker send")]), on
    assert on[("worker", "worker wake-up")] == on[("worker", "worker send")], on
    assert all(worker_main(n) or n == "van receive" for n in on[("worker", "payload")]), on
    for hop in ("server queue", "server compute", "respond"):
        # One kind of track on every server; the order of its roles in the name may
        # differ between servers (which role each main thread took first).
        assert len({frozenset(n.split(" / ")) for n in on[("server", hop)]}) == 1, (hop, on)
        assert all(server_main(n) for n in on[("server", hop)]), (hop, on)
    for e in slices:
        if worker_main(track(e)) or server_main(track(e)):
            assert e["tid"] % (1 << 22) == e["pid"], e  # the main thread
        else:
            assert e["tid"] != e["pid"], e
    # Every worker and server received on some thread: its receive thread or its main one.
    receiving = {pid for (pid, _), n in threads.items() if "van receive" in n}
    assert len(receiving) >= 4, threads
    for hop in ("worker send", "server queue", "server compute", "respond", "payload"):
        assert sum(e["name"] == hop for e in slices) == 4 * ITERATIONS, hop
    assert sum(e["name"] == "worker wake-up" for e in slices) == 2 * ITERATIONS
    for e in slices:
        assert e["dur"] >= 0 and e["ts"] >= 0
    # Slices on one track nest (a trace-event viewer drops or misdraws overlaps).
    by_track = {}
    for e in slices:
        by_track.setdefault((e["pid"], e["tid"]), []).append(
            (round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)))
    for key, spans in by_track.items():
        stack = []
        for a, b in sorted(spans, key=lambda x: (x[0], -(x[1] - x[0]))):
            while stack and stack[-1] <= a:
                stack.pop()
            assert not stack or b <= stack[-1] + 1, (key, a, b, stack[-1])
            stack.append(b)
    # Round trips: an async slice per push_pull on each worker.
    begins = [e for e in ev if e["ph"] == "b" and e["name"] == "round trip"]
    ends = [e for e in ev if e["ph"] == "e" and e["name"] == "round trip"]
    assert len(begins) == len(ends) == 2 * ITERATIONS
    assert {node_of[e["pid"]] for e in begins} == {"worker 0", "worker 1"}
    starts = {e["id"]: e for e in ev if e["ph"] == "s"}
    finishes = {e["id"]: e for e in ev if e["ph"] == "f"}
    # Two arrows per request: worker caller -> server get_batch, server respond -> worker
    # van receive.
    assert len(starts) == len(finishes) == 2 * 4 * ITERATIONS
    assert set(starts) == set(finishes)
    kinds = set()
    for fid, s in starts.items():
        f = finishes[fid]
        assert s["pid"] != f["pid"] and s["ts"] <= f["ts"], (s, f)
        kinds.add((node_of[s["pid"]].split()[0], track(s), node_of[f["pid"]].split()[0],
                   track(f)))
        # Each end lies within a slice of its own track, so the viewer can bind it.
        for x in (s, f):
            assert any(y["pid"] == x["pid"] and y["tid"] == x["tid"] and
                       y["ts"] <= x["ts"] <= y["ts"] + y["dur"] for y in slices), x
    # The response arrow ends where the response was received (see the tracks above).
    assert kinds, kinds
    for k in kinds:
        if k[0] == "worker":
            assert worker_main(k[1]) and k[2] == "server" and server_main(k[3]), k
        else:
            assert server_main(k[1]) and k[2] == "worker", k
            assert worker_main(k[3]) or k[3] == "van receive", k
    assert {k[0] for k in kinds} == {"worker", "server"}, kinds
    for p in (png, tl):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000, p


@FIRST_PASS_ONLY
def test_report_names_a_slow_worker(tmp_path, cluster):
    cluster.run("trace_capture.py", workers=2, servers=2,
                args=[str(tmp_path), str(ITERATIONS), "worker", "1", str(SLEEP_MS)],
                timeout=180)
    result = json.loads(run_report(str(tmp_path), "--json").stdout)
    verdict = result["straggler"]
    assert verdict["rank"] == "worker 1", verdict
    assert verdict["hop"] == "late request", verdict
    assert verdict["evidence"]["late_share"] >= 0.8, verdict


@FIRST_PASS_ONLY
def test_sampling_captures_every_nth_request(tmp_path, cluster):
    cluster.run("trace_capture.py", workers=1, servers=1,
                args=[str(tmp_path), "20", "none", "0", "0", "sample:4"], timeout=120)
    files = trace_file.read_dir(str(tmp_path))
    captured = {}
    for role, kind in (("worker", trace_file.KIND_WORKER_REQUEST),
                       ("server", trace_file.KIND_SERVER_REQUEST)):
        reqs = [r for f in files if f.role == role for r in f.records if r.kind == kind]
        captured[role] = sorted(r.request_id for r in reqs)
        assert all(f.sample_every == 4 and f.mode == "sample" for f in files)
    # Some but not all of the 20 requests, and the same ones at both ends (both decide by
    # the worker's handle).
    assert 0 < len(captured["worker"]) < 20, captured
    assert captured["worker"] == captured["server"], captured


def test_bad_trace_options_are_clear_errors(clean_env):
    base = dict(root_uri="127.0.0.1", root_port=1234, num_workers=1, num_servers=1)
    with pytest.raises(ValueError, match="MESHPOST_TRACE.*sometimes"):
        meshpost.Worker(trace="sometimes", trace_dir="/tmp/x", **base)
    with pytest.raises(ValueError, match="MESHPOST_TRACE_DIR"):
        meshpost.Worker(trace="all", **base)


def test_report_on_missing_or_foreign_files(tmp_path):
    out = run_report(str(tmp_path / "nope"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run_report(str(tmp_path))
    assert out.returncode == 2 and "no *.mptrace files" in out.stderr, out.stderr
    assert "MESHPOST_TRACE_DIR=" in out.stderr
    (tmp_path / "x.mptrace").write_bytes(b"NOTATRACE" * 40)
    out = run_report(str(tmp_path))
    assert out.returncode == 2 and "not a meshpost trace" in out.stderr
    out = run_report(str(tmp_path / "x.mptrace"))
    assert out.returncode == 2 and "is a file, not a directory" in out.stderr, out.stderr


def _one_request(d, name="worker0-p1.0000.mptrace", role="worker", **kw):
    st = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]
    kind = 1 if role == "worker" else 2
    _write_trace(d / name, role, 0, "hostA", [(kind, 0, 1 << 12, 1, st)], **kw)


def test_report_points_at_run_subdirectories(tmp_path):
    # meshpost.bench --trace DIR writes one subdirectory per cluster shape.
    for sub in ("1x1-auto", "2x2-tcp"):
        (tmp_path / sub).mkdir()
        _one_request(tmp_path / sub)
    out = run_report(str(tmp_path))
    assert out.returncode == 2, out.stdout
    assert "subdirectories hold traces of 2 run(s): 1x1-auto, 2x2-tcp" in out.stderr, out.stderr
    assert "pass one of them" in out.stderr
    assert run_report(str(tmp_path / "2x2-tcp")).returncode == 0


def test_report_refuses_mixed_runs(tmp_path):
    # The same MESHPOST_TRACE_DIR reused for a second run: worker 0 from two processes.
    _one_request(tmp_path, "worker0-p1.0000.mptrace", pid=111)
    _one_request(tmp_path, "worker0-p2.0000.mptrace", pid=222)
    out = run_report(str(tmp_path))
    assert out.returncode == 2
    assert "mixes runs: worker 0 was written by 2 processes" in out.stderr, out.stderr
    assert "pid 111" in out.stderr and "pid 222" in out.stderr
    assert "own MESHPOST_TRACE_DIR" in out.stderr
    for f in tmp_path.iterdir():
        f.unlink()
    _one_request(tmp_path, "worker0-p1.0000.mptrace", pid=111)
    _one_request(tmp_path, "server0-p3.0000.mptrace", role="server", pid=333, num_servers=2)
    out = run_report(str(tmp_path))
    assert out.returncode == 2
    assert "different clusters (1 workers x 1 servers, 1 workers x 2 servers)" in out.stderr


def test_report_on_unknown_version(tmp_path):
    _one_request(tmp_path, version=9)
    out = run_report(str(tmp_path))
    assert out.returncode == 2
    assert "trace format version 9" in out.stderr, out.stderr
    assert "understands versions 1 (128-byte records), 2 (160-byte records)" in out.stderr


def test_report_notes_rotated_cut_empty_and_mixed_version_files(tmp_path):
    # Worker 0 kept only its files 2 and 4 (MESHPOST_TRACE_MAX_FILES; 3 lost), the last one
    # cut mid-record; server 0 wrote version 1 (an older meshpost); a worker 1 file is empty
    # (killed as it started).
    _one_request(tmp_path, "worker0-p1.0002.mptrace", version=2, seq=2, num_workers=2)
    _one_request(tmp_path, "worker0-p1.0004.mptrace", version=2, seq=4, num_workers=2)
    with open(tmp_path / "worker0-p1.0004.mptrace", "ab") as f:
        f.write(b"\1" * 50)
    _one_request(tmp_path, "server0-p2.0000.mptrace", role="server", version=1, pid=2,
                 num_workers=2)
    (tmp_path / "worker1-p3.0000.mptrace").write_bytes(b"")
    out = run_report(str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    notes = "\n".join(json.loads(out.stdout)["notes"])
    assert "worker1-p3.0000.mptrace: 0 bytes, no complete header" in notes, notes
    assert "worker 0: its first 2 file(s) were rotated away" in notes, notes
    assert "worker 0: file(s) with sequence [3] are missing" in notes, notes
    assert "worker0-p1.0004.mptrace: ends in a partial record (50 bytes" in notes, notes
    assert "mixed trace format versions [1, 2]: server0-p2.0000.mptrace" in notes, notes
    text = run_report(str(tmp_path)).stdout
    assert "rotated away" in text, text
    (tmp_path / "worker1-p3.0000.mptrace").write_bytes(b"MPTR")
    for name in ("worker0-p1.0002", "worker0-p1.0004", "server0-p2.0000"):
        (tmp_path / f"{name}.mptrace").unlink()
    out = run_report(str(tmp_path))
    assert out.returncode == 2 and "empty or cut before its header" in out.stderr, out.stderr


def test_version_1_files_still_give_a_timeline(tmp_path):
    # Files of an older meshpost (no thread ids): one track per peer, as before.
    _synthetic_two_hosts(tmp_path)
    result = mtrace.analyze(mtrace.load(str(tmp_path)))
    assert result["hops"]["worker 0"]["round trip"]["count"] == 20
    from meshpost.trace_export import to_perfetto
    ev = to_perfetto(mtrace.load(str(tmp_path)))["traceEvents"]
    names = set(_thread_names(ev).values())
    assert names == {"to server 0", "from worker 0", "push_pull"}, names
    assert sum(e["ph"] == "X" and e["name"] == "server compute" for e in ev) == 20


def test_perfetto_tracks_follow_thread_ids(tmp_path):
    # Version 2 files whose stamps were taken on given threads: GetBatch on 501, Respond
    # and the GPU copy of the response on 502/503, the caller 101, the van 102.
    st = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]
    _write_trace(tmp_path / "worker0-p100.0000.mptrace", "worker", 0, "h",
                 [(1, 0, 1 << 12, 1, st), (3, -1, 0, 1, [9000] + [0] * 7)], version=2,
                 pid=100, tids=(101, 101, 0, 0, 0, 0, 102, 102))
    _write_trace(tmp_path / "server0-p500.0000.mptrace", "server", 0, "h",
                 [(2, 0, 1 << 12, 1, st)], version=2, pid=500,
                 tids=(0, 0, 504, 501, 502, 503, 0, 0))
    from meshpost.trace_export import to_perfetto
    ev = to_perfetto(mtrace.load(str(tmp_path)))["traceEvents"]
    names = _thread_names(ev)
    assert names == {(100, 101): "caller / Wait() tid 101", (100, 102): "van receive tid 102",
                     (500, 501): "get_batch tid 501", (500, 502): "respond tid 502",
                     (500, 503): "GPU copy tid 503", (500, 504): "van receive tid 504"}, names
    where = {e["name"]: (e["pid"], e["tid"]) for e in ev if e["ph"] == "X"}
    assert where == {"worker send": (100, 101), "server queue": (500, 501),
                     "server compute": (500, 502), "respond": (500, 503),
                     "payload": (100, 102), "worker wake-up": (100, 101)}, where
    flows = {(e["ph"], e["id"]): (e["pid"], e["tid"]) for e in ev if e["ph"] in "sf"}
    assert flows == {("s", 1): (100, 101), ("f", 1): (500, 501), ("s", 2): (500, 503),
                     ("f", 2): (100, 102)}, flows


# ---- cross-host clock correction, on synthetic files (no cluster needed) ----

def _write_trace(path, role, rank, host, records, clock=None, num_workers=1, num_servers=1,
                 version=1, pid=4242, seq=0, tids=None):
    """A trace file as ps/trace_recorder.cc writes it: version 1 (128-byte records) or 2
    (160 bytes: the stamps' thread ids follow)."""
    import struct
    rec_bytes = {1: 128, 2: 160}.get(version, 128)
    head = struct.pack("<8sIIIBBHiiiIIIQQ64s", b"MPTRACE\0", version, 256, rec_bytes,
                       1 if role == "worker" else 2, 2, 0, rank, num_workers, num_servers,
                       pid, 1, seq, 0, 0, host.encode()).ljust(256, b"\0")
    body = b""
    rec = struct.Struct("<BBHiQQQQ3q8Q")

    def pack(*fields, t=(0,) * 8):
        return rec.pack(*fields) + (struct.pack("<8I", *t) if version >= 2 else b"")
    if clock is not None:  # (offset_ns, error_ns)
        body += pack(4, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0, 1, clock[0] % (1 << 64), clock[1],
                     2 * clock[1], 5, 0, 0, 0)
    for kind, peer, rid, handle, stamps in records:
        body += pack(kind, 3, 1, peer, rid, handle, 64, 64, 1, 0, 0, *stamps,
                     t=tids or (0,) * 8)
    path.write_bytes(head + body)


def _synthetic_two_hosts(d, with_server_clock=True):
    w_off, s_off = 7_000_000_000, -3_000_000_000  # local - scheduler, per host
    wrecs, srecs = [], []
    for h in range(1, 21):
        base = 10_000_000_000 + h * 1_000_000
        true = [base, base + 1000, base + 11000, base + 12000, base + 112000, base + 113000,
                base + 123000, base + 124000]  # transfers 10 us each way
        st = [t + (s_off if 2 <= i <= 5 else w_off) for i, t in enumerate(true)]
        wrecs.append((1, 0, h << 12, h, st))
        wrecs.append((3, -1, 0, h, [true[7] + 500 + w_off] + [0] * 7))
        srecs.append((2, 0, h << 12, h, [0, 0] + st[2:6] + [0, 0]))
    _write_trace(d / "worker0-p1.0000.mptrace", "worker", 0, "hostA", wrecs,
                 clock=(w_off, 2000))
    _write_trace(d / "server0-p2.0000.mptrace", "server", 0, "hostB", srecs,
                 clock=(s_off, 3000) if with_server_clock else None)


def test_cross_host_stamps_are_corrected_by_clock_offsets(tmp_path):
    _synthetic_two_hosts(tmp_path)
    result = mtrace.analyze(mtrace.load(str(tmp_path)))
    assert result["clock"]["corrected"]
    assert result["clock"]["nodes"]["server 0"] == {"offset_ns": -3_000_000_000,
                                                    "error_ns": 3000, "rtt_ns": 6000,
                                                    "samples": 5}
    hops = result["hops"]["worker 0"]
    assert hops["request transfer"]["p50_us"] == pytest.approx(10.0)
    assert hops["response transfer"]["p50_us"] == pytest.approx(10.0)
    assert hops["server compute"]["p50_us"] == pytest.approx(100.0)
    assert hops["worker wake-up"]["p50_us"] == pytest.approx(0.5)
    assert hops["round trip"]["p50_us"] == pytest.approx(124.5)
    assert "+/- 3.0 us" in mtrace.format_text(result)


def test_cross_host_without_estimate_is_flagged(tmp_path):
    _synthetic_two_hosts(tmp_path, with_server_clock=False)
    result = mtrace.analyze(mtrace.load(str(tmp_path)))
    assert any("server 0" in n and "NOT corrected" in n for n in result["notes"])


@FIRST_PASS_ONLY
@pytest.mark.parametrize("progress", ["1", "0"])
def test_waiting_threads_receive_themselves_over_cma(tmp_path, cluster, progress):
    # Caller-driven progress (docs/threads.md): the worker's response is received on the
    # thread waiting in wait() (the one that called push_pull), the server's request on the
    # thread waiting in get_batch(); with MESHPOST_CALLER_PROGRESS=0, on the van's receive
    # thread. The server sleeps 5 ms per request, so the worker is waiting when each response
    # arrives; the server waits in get_batch while the worker prepares its next request.
    iterations = 30
    cluster.run("trace_capture.py", workers=1, servers=1,
                args=[str(tmp_path), str(iterations), "server", "0", "5"],
                env={"MESHPOST_CALLER_PROGRESS": progress, "MESHPOST_TRANSPORT": "cma"},
                timeout=120)
    files = trace_file.read_dir(str(tmp_path))
    worker = [r for f in files if f.role == "worker" for r in f.records
              if r.kind == trace_file.KIND_WORKER_REQUEST]
    server = [r for f in files if f.role == "server" for r in f.records
              if r.kind == trace_file.KIND_SERVER_REQUEST]
    assert len(worker) == iterations and len(server) == iterations
    assert all(r.transport == "cma" for r in worker), {r.transport for r in worker}
    # tids[0]: push_pull's caller, tids[6]: the thread that took the response header;
    # tids[2]: the thread that received the request, tids[3]: get_batch's caller.
    on_waiter = sum(r.tids[6] == r.tids[0] != 0 for r in worker)
    on_get_batch = sum(r.tids[2] == r.tids[3] != 0 for r in server)
    if progress == "1":
        # Nearly all; a request or response that arrives before its waiter waits (the
        # first request, a descheduled caller) is legitimately the receive thread's.
        assert on_waiter >= iterations // 2, (on_waiter, [r.tids for r in worker[:3]])
        assert on_get_batch >= iterations // 2, (on_get_batch, [r.tids for r in server[:3]])
    else:
        assert on_waiter == 0 and on_get_batch == 0, (on_waiter, on_get_batch)
