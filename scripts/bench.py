#!/usr/bin/python3
"""meshpost same-host benchmark driver (run with /usr/bin/python3).

Runs, interleaved round by round so machine drift hits every system alike:
  meshpost-cma, meshpost-cma-shm (forced fallback), meshpost-tcp  (van level: meshpost_bench)
  meshpost-cluster-cma, -cluster-cma-shm, -cluster-tcp            (the real cluster: scheduler,
      Postoffice, AFTensorWorker/Server processes; meshpost_cluster_bench next to --bin)
  memcpy (one-copy bound), zmq (raw ZeroMQ PAIR round trip)       (meshpost_bench)
  gloo (torch.distributed send/recv), tensorpipe (torch.distributed.rpc rpc_sync)
  python-fserver (StepMesh's fserver_lib API, ordinary torch tensors) and
  python-meshpost-shared (meshpost.empty tensors, Request.outputs, respond() with nothing),
      1x1 local clusters of the installed package (bench/python_afd.py, --python)
for the AFD shape (push uint8[128,7168] + int32[4], pull bf16[128,7168] per server), a 4 KiB
each-way shape and a size sweep; then M x N clusters for the meshpost systems, in the same
round. A cluster system may carry a spin setting, e.g. meshpost-cluster-cma@spin20 runs with
MESHPOST_SPIN_US=20 (without it the library default), and @trace (MESHPOST_TRACE=all,
for the capture-overhead ratio). Writes JSON (every round's raw stats,
medians over rounds, ratios to meshpost-cma, and the issue-4 ratio table as the median of
per-round ratios) and, with --plot, a PNG of latency vs size.

  /usr/bin/python3 scripts/bench.py --bin build-bench/meshpost_bench --rounds 3 \
      --out docs/bench_results.json --plot docs/bench_latency.png
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

AFD = dict(name="afd", push=128 * 7168, push_extra=16, pull=128 * 7168 * 2)
SMALL = dict(name="4KiB", push=4096, push_extra=0, pull=4096)
SWEEP = [dict(name=f"sym{n}", push=n, push_extra=0, pull=n)
         for n in (4096, 65536, 262144, 1048576, 4194304)]


SPIN_NS = 0  # set from --spin-ns


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iters_for(shape, base):
    total = shape["push"] + shape["push_extra"] + shape["pull"]
    return max(50, min(base * 10, int(base * 3_000_000 / max(total, 1))))


class Servers:
    """N meshpost_bench servers (or one zmq server); stops them on exit."""

    def __init__(self, binary, role, n, extra):
        self.procs, self.addrs = [], []
        for _ in range(n):
            p = subprocess.Popen([binary, role] + extra, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            line = p.stdout.readline().split()
            if not line or line[0] != "READY":
                raise RuntimeError(f"{role} did not start: {line}")
            self.procs.append(p)
            self.addrs.append(line[1:4])

    def close(self):
        for p in self.procs:
            try:
                p.stdin.close()
            except Exception:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def run_json(cmd, timeout=600, env=None):
    out = subprocess.run(cmd, stdout=subprocess.PIPE, timeout=timeout, text=True, check=True,
                         env=env)
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def shape_flags(shape, iters, warmup):
    return ["--push", str(shape["push"]), "--push-extra", str(shape["push_extra"]),
            "--pull", str(shape["pull"]), "--iters", str(iters), "--warmup", str(warmup)]


def run_meshpost(binary, transport, shm, shape, m, n, iters, warmup):
    extra = ["--transport", transport, "--cma-disable", "1" if shm else "0",
             "--spin-ns", str(SPIN_NS)]
    srv = Servers(binary, "server", n, extra)
    try:
        servers = ";".join(",".join(a) for a in srv.addrs)
        clients = [subprocess.Popen([binary, "client", "--servers", servers, "--id", str(i)] +
                                    extra + shape_flags(shape, iters, warmup),
                                    stdout=subprocess.PIPE, text=True) for i in range(m)]
        results = []
        for c in clients:
            out, _ = c.communicate(timeout=600)
            results += [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    finally:
        srv.close()
    if len(results) != m:
        raise RuntimeError(f"meshpost {transport} {m}x{n}: {len(results)} of {m} clients reported")
    r = dict(results[0])
    if m > 1:
        r["p50_us"] = statistics.median(x["p50_us"] for x in results)
        r["p99_us"] = max(x["p99_us"] for x in results)
        r["mean_us"] = statistics.mean(x["mean_us"] for x in results)
        r["throughput_gbps"] = sum(x["throughput_gbps"] for x in results)
    return r


def parse_cluster_system(sysname):
    """meshpost-cluster-<transport>[@spin<us>][@trace][@shared][@noprogress][@nostage][@noring]
    -> (transport, spin_us or None, trace, shared, progress, stage, ring). @trace runs the cluster with
    MESHPOST_TRACE=all into a temporary directory (the capture-overhead measurement of
    docs/profiling.md); @shared allocates the push and pull tensors in shared memory and
    answers through the outputs (issue 11); @noprogress sets MESHPOST_CALLER_PROGRESS=0
    (waiters are woken by the van's receive thread, as before caller-driven progress);
    @nostage sets MESHPOST_SHARED_PUSH_MIN=0 (ordinary pushes are read across processes,
    not sent from a shared copy); @noring sets MESHPOST_CMA_RING=0 (every same-host frame
    through the unix socket, as before the frame ring)."""
    base, *mods = sysname.split("@")
    transport = base[len("meshpost-cluster-"):]
    if transport not in ("tcp", "cma", "cma-shm"):
        raise ValueError(f"unknown cluster system {sysname}")
    spin, trace, shared, progress, stage, ring = None, False, False, True, True, True
    for mod in mods:
        if mod == "nostage":
            stage = False
        elif mod == "noring":
            ring = False
        elif mod == "trace":
            trace = True
        elif mod == "shared":
            shared = True
        elif mod == "noprogress":
            progress = False
        elif mod.startswith("spin") and mod[4:].isdigit():
            spin = int(mod[4:])
        else:
            raise ValueError(
                f"{sysname}: expected @spin<microseconds>, @trace, @shared, @noprogress, "
                "@nostage, @noring")
    return transport, spin, trace, shared, progress, stage, ring


def run_cluster(binary, sysname, shape, m, n, iters, warmup):
    transport, spin, trace, shared, progress, stage, ring = parse_cluster_system(sysname)
    cmd = [binary, "--workers", str(m), "--servers", str(n), "--transport", transport] + \
        shape_flags(shape, iters, warmup)
    if shared:
        cmd += ["--shared", "1"]
    if spin is not None:
        cmd += ["--spin-us", str(spin)]
    env = dict(os.environ, MESHPOST_CALLER_PROGRESS="1" if progress else "0")
    if not stage:
        env["MESHPOST_SHARED_PUSH_MIN"] = "0"
    if not ring:
        env["MESHPOST_CMA_RING"] = "0"
    if trace:
        import shutil
        import tempfile
        trace_dir = tempfile.mkdtemp(prefix="meshpost-bench-trace-")
        env.update(MESHPOST_TRACE="all", MESHPOST_TRACE_DIR=trace_dir)
    try:
        r = run_json(cmd, timeout=1800, env=env)[0]
        if trace:
            files = [f for f in os.listdir(trace_dir) if f.endswith(".mptrace")]
            if len(files) < m + n:
                raise RuntimeError(f"{sysname}: {len(files)} trace files for {m + n} nodes")
            r["trace_bytes"] = sum(os.path.getsize(os.path.join(trace_dir, f)) for f in files)
    finally:
        if trace:
            shutil.rmtree(trace_dir, ignore_errors=True)
    used = set(r["worker0"]["transports"].values())
    want = {"tcp": "tcp", "cma": "cma", "cma-shm": "cma-shm"}[transport]
    if used != {want}:
        # e.g. CMA refused here: the run is real but is not the system it is named after.
        raise RuntimeError(f"{sysname}: peers used {sorted(used)}, not {want}")
    return r


def run_python(python, sysname, shape, iters, warmup):
    # python-<mode>[@noprogress][@nostage][@noring][@spin<us>]: as for the cluster systems.
    base, *mods = sysname.split("@")
    mode = {"python-fserver": "fserver", "python-meshpost-shared": "shared"}[base]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench",
                          "python_afd.py")
    env = dict(os.environ, MESHPOST_CALLER_PROGRESS="1")
    for mod in mods:
        if mod == "noprogress":
            env["MESHPOST_CALLER_PROGRESS"] = "0"
        elif mod == "nostage":
            env["MESHPOST_SHARED_PUSH_MIN"] = "0"
        elif mod == "noring":
            env["MESHPOST_CMA_RING"] = "0"
        elif mod.startswith("spin") and mod[4:].isdigit():
            env["MESHPOST_SPIN_US"] = mod[4:]
        else:
            raise ValueError(
                f"{sysname}: expected @noprogress, @nostage, @noring or @spin<microseconds>")
    r = run_json([python, script, "--mode", mode, "--push", str(shape["push"]),
                  "--push-extra", str(shape["push_extra"]), "--pull", str(shape["pull"]),
                  "--iters", str(iters), "--warmup", str(warmup)], env=env)
    if not r:
        raise RuntimeError(f"{sysname}: no result")
    return r[0]


def run_zmq(binary, shape, iters, warmup):
    srv = Servers(binary, "zmq-server", 1, shape_flags(shape, iters, warmup))
    try:
        return run_json([binary, "zmq-client", "--servers", srv.addrs[0][0]] +
                        shape_flags(shape, iters, warmup))[0]
    finally:
        srv.close()


# ---- torch baselines: this file re-executed as rank 0 / rank 1 ----

def torch_peer(args):
    import torch
    import torch.distributed as dist
    rank, kind = args.torch_rank, args.torch_kind
    push = torch.ones(args.push + args.push_extra, dtype=torch.uint8)
    pull = torch.zeros(args.pull // 2, dtype=torch.bfloat16)
    total = args.iters + args.warmup
    lat = []
    if kind == "gloo":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.torch_port}",
                                rank=rank, world_size=2)
        for i in range(total):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(push, 1)
                dist.recv(pull, 1)
            else:
                dist.recv(push, 0)
                dist.send(pull, 0)
            if rank == 0 and i >= args.warmup:
                lat.append((time.perf_counter() - t0) * 1e6)
        dist.destroy_process_group()
    else:
        import torch.distributed.rpc as rpc
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(args.torch_port)
        opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=120)
        rpc.init_rpc(f"r{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
        if rank == 0:
            for i in range(total):
                t0 = time.perf_counter()
                out = rpc.rpc_sync("r1", _rpc_respond, args=(push, args.pull))
                pull.copy_(out)
                if i >= args.warmup:
                    lat.append((time.perf_counter() - t0) * 1e6)
        rpc.shutdown()
    if rank == 0:
        lat.sort()
        b = args.push + args.push_extra + args.pull
        print(json.dumps({"system": kind, "push": args.push + args.push_extra, "pull": args.pull,
                          "iters": len(lat), "p50_us": lat[len(lat) // 2],
                          "p99_us": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                          "mean_us": sum(lat) / len(lat), "min_us": lat[0],
                          "bytes_per_iter": b,
                          "throughput_gbps": b * len(lat) / (sum(lat) / 1e6) / 1e9}), flush=True)


_RESP = {}


def _rpc_respond(push, nbytes):
    import torch
    if nbytes not in _RESP:
        _RESP[nbytes] = torch.full((nbytes // 2,), 1.0, dtype=torch.bfloat16)
    return _RESP[nbytes]


def run_torch(kind, shape, iters, warmup):
    port = free_port()
    base = [sys.executable, os.path.abspath(__file__), "--torch-kind", kind,
            "--torch-port", str(port)] + shape_flags(shape, iters, warmup)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    peer = subprocess.Popen(base + ["--torch-rank", "1"], env=env, stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run(base + ["--torch-rank", "0"], env=env, stdout=subprocess.PIPE,
                             text=True, timeout=600, check=True).stdout
    finally:
        peer.wait(timeout=120)
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")][0]


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1),
            "kernel": platform.release(), "load_avg": os.getloadavg()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="build-bench/meshpost_bench")
    ap.add_argument("--cluster-bin", default="",
                    help="meshpost_cluster_bench (default: next to --bin)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=300, help="iterations for the AFD shape")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--systems", default="memcpy,meshpost-cma,meshpost-cma-shm,meshpost-tcp,"
                    "meshpost-cluster-cma,meshpost-cluster-cma-shm,meshpost-cluster-tcp,"
                    "zmq,gloo,tensorpipe")
    ap.add_argument("--shapes", default="afd,4KiB,sweep")
    ap.add_argument("--clusters", default="1x1,2x2,4x4",
                    help="MxN for the meshpost systems (AFD shape)")
    ap.add_argument("--cluster-shapes", default="afd",
                    help="shapes the MxN (other than 1x1) runs use: afd and/or 4KiB")
    ap.add_argument("--python", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "python"),
                    help="interpreter with the meshpost package installed (python-* systems)")
    ap.add_argument("--out", default="bench_results.json")
    ap.add_argument("--plot", default="")
    ap.add_argument("--spin-ns", type=int, default=0,
                    help="meshpost WaitPolicy spin before blocking (0: block at once; spinning "
                         "on a 2-core shared box steals the copying thread's CPU)")
    # internal: torch peer processes
    ap.add_argument("--torch-kind"), ap.add_argument("--torch-rank", type=int)
    ap.add_argument("--torch-port", type=int)
    ap.add_argument("--push", type=int), ap.add_argument("--push-extra", type=int)
    ap.add_argument("--pull", type=int)
    args = ap.parse_args()
    if args.torch_kind:
        return torch_peer(args)

    global SPIN_NS
    SPIN_NS = args.spin_ns
    cluster_bin = args.cluster_bin or os.path.join(os.path.dirname(args.bin) or ".",
                                                   "meshpost_cluster_bench")
    systems = args.systems.split(",")
    shapes = []
    for s in args.shapes.split(","):
        shapes += {"afd": [AFD], "4KiB": [SMALL], "sweep": SWEEP}[s]
    runs = []  # (system, shape, cluster, stats)
    for rnd in range(args.rounds):
        for shape in shapes:
            it = iters_for(shape, args.iters) if shape is not AFD else args.iters
            for sysname in systems:
                try:
                    if sysname == "memcpy":
                        r = run_json([args.bin, "memcpy"] + shape_flags(shape, it, args.warmup))[0]
                    elif sysname.startswith("meshpost-cluster-"):
                        r = run_cluster(cluster_bin, sysname, shape, 1, 1, it, args.warmup)
                    elif sysname.startswith("python-"):
                        r = run_python(args.python, sysname, shape, it, args.warmup)
                    elif sysname.startswith("meshpost-"):
                        transport = "tcp" if sysname == "meshpost-tcp" else "cma"
                        r = run_meshpost(args.bin, transport, sysname.endswith("shm"), shape, 1, 1,
                                         it, args.warmup)
                    elif sysname == "zmq":
                        r = run_zmq(args.bin, shape, it, args.warmup)
                    else:
                        r = run_torch(sysname, shape, it, args.warmup)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    print(f"round {rnd} {sysname} {shape['name']}: FAILED {e}", file=sys.stderr)
                    continue
                r["system"] = sysname
                runs.append({"round": rnd, "shape": shape["name"], "cluster": "1x1", **r})
                print(f"round {rnd} {shape['name']:>10} {sysname:>30}: p50 {r['p50_us']:9.1f} us"
                      f"  p99 {r['p99_us']:9.1f} us", file=sys.stderr, flush=True)
        cshapes = {"afd": AFD, "4KiB": SMALL}
        for cl in args.clusters.split(","):
            m, n = (int(x) for x in cl.split("x"))
            if (m, n) == (1, 1):
                continue
            for cname in args.cluster_shapes.split(","):
                shape = cshapes[cname]
                base_it = args.iters if shape is AFD else iters_for(shape, args.iters)
                it = max(30, base_it // (m * n))
                for sysname in [s for s in systems if s.startswith("meshpost-")]:
                    try:
                        if sysname.startswith("meshpost-cluster-"):
                            r = run_cluster(cluster_bin, sysname, shape, m, n, it, args.warmup)
                        else:
                            transport = "tcp" if sysname == "meshpost-tcp" else "cma"
                            r = run_meshpost(args.bin, transport, sysname.endswith("shm"), shape,
                                             m, n, it, args.warmup)
                    except Exception as e:
                        print(f"round {rnd} {sysname} {cl}: FAILED {e}", file=sys.stderr)
                        continue
                    r["system"] = sysname
                    runs.append({"round": rnd, "shape": shape["name"], "cluster": cl, **r})
                    print(f"round {rnd} {cl:>5} {shape['name']:>5} {sysname:>30}: p50 "
                          f"{r['p50_us']:9.1f} us  {r['throughput_gbps']:.2f} GB/s",
                          file=sys.stderr, flush=True)

    # medians over rounds
    summary = {}
    for r in runs:
        key = f"{r['shape']}|{r['cluster']}|{r['system']}"
        summary.setdefault(key, []).append(r)
    med = {}
    for key, rs in summary.items():
        med[key] = {f: statistics.median(x[f] for x in rs)
                    for f in ("p50_us", "p99_us", "mean_us", "throughput_gbps")}
        med[key]["bytes_per_iter"] = rs[0]["bytes_per_iter"]
        med[key]["rounds"] = len(rs)
    for key, v in med.items():
        shape, cl, _ = key.split("|")
        ref = med.get(f"{shape}|{cl}|meshpost-cma")
        if ref:
            v["p50_ratio_to_meshpost_cma"] = v["p50_us"] / ref["p50_us"]
    for key, rs in summary.items():
        bd = [r["worker0"]["breakdown_p50_us"] for r in rs if "worker0" in r]
        if bd:
            med[key]["breakdown_p50_us"] = {k: statistics.median(b[k] for b in bd) for k in bd[0]}
    ratios = ratio_table(runs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
              "command": " ".join(sys.argv), "median_over_rounds": med, "ratios": ratios,
              "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(med, indent=1))
    print(json.dumps(ratios, indent=1))
    if args.plot:
        plot(med, args.plot)


# (name, numerator system, denominator system, statistic); ratios are taken within a round
# (the two runs were interleaved) and the median over rounds is reported.
RATIOS = [
    ("cluster-cma p50 / memcpy p50", "meshpost-cluster-cma", "memcpy", "p50_us"),
    # Issue 11: shared tensors + outputs, and StepMesh code with ordinary tensors.
    ("python-meshpost-shared p50 / memcpy p50", "python-meshpost-shared", "memcpy", "p50_us"),
    ("python-fserver p50 / memcpy p50", "python-fserver", "memcpy", "p50_us"),
    ("python-fserver p50 / cluster-cma p50", "python-fserver", "meshpost-cluster-cma", "p50_us"),
    # Ordinary pushes from a shared copy (MESHPOST_SHARED_PUSH_MIN) against reading them
    # across processes (@nostage).
    ("python-fserver p50 / python-fserver@nostage p50", "python-fserver",
     "python-fserver@nostage", "p50_us"),
    ("cluster-cma p50 / cluster-cma@nostage p50", "meshpost-cluster-cma",
     "meshpost-cluster-cma@nostage", "p50_us"),
    ("cluster-cma@shared p50 / memcpy p50", "meshpost-cluster-cma@shared", "memcpy", "p50_us"),
    ("python-meshpost-shared p50 / cluster-cma@shared p50", "python-meshpost-shared",
     "meshpost-cluster-cma@shared", "p50_us"),
    # Caller-driven progress against the receive thread waking the waiter (@noprogress).
    ("cluster-cma@shared p50 / cluster-cma@shared@noprogress p50",
     "meshpost-cluster-cma@shared", "meshpost-cluster-cma@shared@noprogress", "p50_us"),
    ("cluster-cma p50 / cluster-cma@noprogress p50", "meshpost-cluster-cma",
     "meshpost-cluster-cma@noprogress", "p50_us"),
    ("python-fserver p50 / python-fserver@noprogress p50", "python-fserver",
     "python-fserver@noprogress", "p50_us"),
    ("python-meshpost-shared p50 / python-meshpost-shared@noprogress p50",
     "python-meshpost-shared", "python-meshpost-shared@noprogress", "p50_us"),
    ("cluster-cma p50 / van cma p50 (ps overhead)", "meshpost-cluster-cma", "meshpost-cma",
     "p50_us"),
    ("gloo p50 / cluster-cma p50", "gloo", "meshpost-cluster-cma", "p50_us"),
    ("tensorpipe p50 / cluster-cma p50", "tensorpipe", "meshpost-cluster-cma", "p50_us"),
    ("cluster-tcp p50 / zmq p50", "meshpost-cluster-tcp", "zmq", "p50_us"),
    ("cluster-tcp p50 / van tcp p50 (ps overhead)", "meshpost-cluster-tcp", "meshpost-tcp",
     "p50_us"),
    ("cluster-cma-shm p50 / van cma-shm p50", "meshpost-cluster-cma-shm", "meshpost-cma-shm",
     "p50_us"),
    # Trace capture overhead (MESHPOST_TRACE=all vs off, same round): docs/profiling.md.
    ("cluster-cma@trace p50 / cluster-cma p50 (trace overhead)", "meshpost-cluster-cma@trace",
     "meshpost-cluster-cma", "p50_us"),
    ("cluster-cma@trace mean / cluster-cma mean (trace overhead)", "meshpost-cluster-cma@trace",
     "meshpost-cluster-cma", "mean_us"),
    ("cluster-tcp@trace p50 / cluster-tcp p50 (trace overhead)", "meshpost-cluster-tcp@trace",
     "meshpost-cluster-tcp", "p50_us"),
]


def ratio_table(runs):
    by = {}
    for r in runs:
        by[(r["round"], r["shape"], r["cluster"], r["system"])] = r
    out = {}
    shapes = sorted({(r["shape"], r["cluster"]) for r in runs})
    for shape, cl in shapes:
        for name, num, den, stat in RATIOS:
            vals = [by[(rnd, shape, cl, num)][stat] / by[(rnd, shape, cl, den)][stat]
                    for (rnd, s, c, sysname) in by
                    if s == shape and c == cl and sysname == num
                    and (rnd, shape, cl, den) in by and by[(rnd, shape, cl, den)][stat] > 0]
            if vals:
                out[f"{shape}|{cl}|{name}"] = {"median": statistics.median(vals),
                                               "per_round": vals}
        # p99 / p50 of the same run, and per-byte throughput of MxN relative to 1x1.
        for sysname in ("meshpost-cluster-cma", "meshpost-cluster-tcp",
                        "meshpost-cluster-cma-shm", "python-fserver", "python-meshpost-shared",
                        "meshpost-cluster-cma@shared"):
            vals = [r["p99_us"] / r["p50_us"] for r in runs
                    if r["shape"] == shape and r["cluster"] == cl and r["system"] == sysname]
            if vals:
                out[f"{shape}|{cl}|{sysname} p99 / p50"] = {"median": statistics.median(vals),
                                                            "per_round": vals}
            if cl != "1x1":
                vals = [by[(rnd, shape, cl, sysname)]["throughput_gbps"] /
                        by[(rnd, shape, "1x1", sysname)]["throughput_gbps"]
                        for (rnd, s, c, sn) in by if s == shape and c == cl and sn == sysname
                        and (rnd, shape, "1x1", sysname) in by]
                if vals:
                    out[f"{shape}|{cl}|{sysname} GB/s / 1x1 GB/s"] = {
                        "median": statistics.median(vals), "per_round": vals}
    return out


def plot(med, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_sys = {}
    for key, v in med.items():
        shape, cl, sysname = key.split("|")
        if cl != "1x1" or not shape.startswith("sym"):
            continue
        by_sys.setdefault(sysname, []).append((v["bytes_per_iter"] / 2, v["p50_us"]))
    for sysname, pts in sorted(by_sys.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=sysname)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes each way (request = response size)")
    ax.set_ylabel("round-trip p50 (us)")
    ax.set_title("same-host round trip, 1 worker x 1 server")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
