"""meshpost across "hosts": network namespaces with their own hostnames, one launcher
(multi-node mode) per host, scheduler on host 0.

What meshpost must choose: it treats two processes as co-located when their host identity
(hostname + kernel boot id) is equal. Processes in different namespaces here share the
kernel and even the PID namespace, so the same-host van (process_vm_writev) would
technically work between them; meshpost must still pick tcp, because on real machines a
different hostname means a different kernel. Co-located ranks keep the same-host van.
"""

from __future__ import annotations

import json
import re
import time
from typing import Dict, List

from conftest import PROGRAMS, Run, launch_argv, launcher_env, same_host_transport

PORT = "29500"  # free by construction: the namespaces are brand new


def _start(fabric_factory, hosts: int, per_node: List[str], mode: str,
           extra: List[str] = ()) -> List[Run]:
    fabric = fabric_factory(hosts)
    runs = []
    for i in range(hosts):
        argv = launch_argv("--nnodes", str(hosts), "--node-rank", str(i),
                           "--master-addr", fabric.addrs[0], "--master-port", PORT,
                           *per_node, *extra, "--timeout", "240",
                           str(PROGRAMS / "cross_host.py"), mode)
        run = Run(fabric.command(i, argv), launcher_env())
        fabric_factory.runs.append(run)
        runs.append(run)
    return runs, fabric


def _reports(runs: List[Run]) -> Dict[str, dict]:
    out = {}
    for run in runs:
        for line in run.out:
            m = re.fullmatch(r"\[(\S+)\] HOST (.*)", line)
            if m:
                info = json.loads(m.group(2))
                assert info["name"] == m.group(1), line
                out[info["name"]] = info
    return out


def _texts(runs: List[Run]) -> str:
    return "\n".join(f"===== host {i}\n{r.text()}" for i, r in enumerate(runs))


def _peer_name(peer: str) -> str:  # transports() keys are "server 2" / "worker 0"
    role, rank = peer.split()
    return f"{role}:{rank}"


def test_two_hosts_pick_tcp_across_and_same_host_within(fabric_factory):
    runs, fabric = _start(fabric_factory, 2, ["--workers-per-node", "2",
                                              "--servers-per-node", "2"], "data")
    codes = [r.finish(timeout=300) for r in runs]
    assert codes == [0, 0], _texts(runs)
    # Host 0 runs the scheduler, servers 0-1 and workers 0-1; host 1 the rest.
    host_of = {f"{role}:{r}": r // 2 for role in ("worker", "server") for r in range(4)}
    reports = _reports(runs)
    assert set(reports) == set(host_of), _texts(runs)
    local = same_host_transport()
    for name, info in reports.items():
        assert info["hostname"] == fabric.hostnames[host_of[name]], info
        peers = info["transports"]
        other_role = "server" if name.startswith("worker") else "worker"
        assert {_peer_name(p) for p in peers} >= {f"{other_role}:{r}" for r in range(4)}, info
        for peer, transport in peers.items():
            want = local if host_of[_peer_name(peer)] == host_of[name] else "tcp"
            assert transport == want, (name, peer, transport, want)
    passes = {line.split()[-1] for r in runs for line in r.out if " PASS " in line}
    assert passes == set(host_of), _texts(runs)
    assert any("scheduler" in line for line in runs[0].err), _texts(runs)
    assert not any(line.startswith("[scheduler]") for line in runs[1].out + runs[1].err)


def test_split_hosts_use_tcp_and_a_cut_host_fails_its_peers_clearly(fabric_factory):
    # --worker-nodes 1: host 0 runs the scheduler and the workers (attention), host 1 the
    # servers (FFN); every data pair crosses hosts. After the data rounds, host 1's link
    # goes down while every worker waits on it.
    runs, fabric = _start(fabric_factory, 2, ["--workers-per-node", "2",
                                              "--servers-per-node", "2", "--worker-nodes", "1"],
                          "kill")
    ready = lambda lines: sum(" READY " in l for l in lines) == 2  # noqa: E731
    for r in runs:
        assert r.wait_for(ready, timeout=400), _texts(runs)
    reports = _reports(runs)
    assert set(reports) == {"worker:0", "worker:1", "server:0", "server:1"}, _texts(runs)
    for name, info in reports.items():
        assert info["hostname"] == fabric.hostnames[0 if name.startswith("worker") else 1], info
        assert set(info["transports"].values()) == {"tcp"}, info
    # Every process passed its data checks (READY comes after them); the last request is
    # posted or about to be, and nobody will answer it.
    cut_at = time.time()
    fabric.cut(1)
    errors = lambda lines: sum(" PEER_ERROR " in l for l in lines) == 2  # noqa: E731
    assert runs[0].wait_for(errors, timeout=280), _texts(runs)
    for line in runs[0].out:
        if " PEER_ERROR " not in line:
            continue
        m = re.fullmatch(r"\[(worker:[01])\] PEER_ERROR (\S+) (\w+) (True|False) (.*)", line)
        assert m, line
        when, kind, is_conn, message = float(m.group(2)), m.group(3), m.group(4), m.group(5)
        # A ConnectionError naming a server of the cut host, raised by heartbeat detection:
        # the worker's own wait would only give up after 300 s (with a TimeoutError).
        assert is_conn == "True" and kind != "TimeoutError", line
        assert re.search(r"server [01]\b", message), line
        assert when - cut_at < 280, line
    for r in runs:
        r.kill()
