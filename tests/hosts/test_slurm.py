"""meshpost under a real Slurm: Debian's slurmctld and two slurmd "nodes" on this machine
(scripts/slurm_local/slurm_local.sh), a job step with srun and a batch job with the shipped
deploy/slurm/meshpost.sbatch. Skipped with the reason where Slurm cannot start here.

Both Slurm "nodes" are this machine: same hostname and kernel, so meshpost rightly sees
every pair as co-located and picks the same-host van everywhere; the cross-host choice
(tcp) is covered by test_netns.py. What this test proves is the Slurm side: nnodes, node
rank and scheduler host derived from SLURM_* and the node list, one launcher per node.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROGRAMS, launcher_env, same_host_transport

ROOT = Path(__file__).resolve().parents[2]
SLURM_LOCAL = ROOT / "scripts" / "slurm_local" / "slurm_local.sh"
SBATCH = ROOT / "deploy" / "slurm" / "meshpost.sbatch"

JOB = r"""
set -u
cd "$OUT"
# 1. A job step across both nodes, every node running 2 workers + 2 servers.
srun -N2 --ntasks-per-node=1 -l "$PY" -m meshpost.launch --slurm \
    --workers-per-node 2 --servers-per-node 2 --node-host 127.0.0.1 \
    --master-port "$PORT1" --timeout 200 "$PROG" data >srun.out 2>srun.err
echo $? >srun.rc
# 2. The shipped sbatch script: node n1 runs the worker, node n2 the server.
jid=$(PYTHON="$PY" sbatch --parsable -N2 -o "$OUT/batch.out" -e "$OUT/batch.err" "$SBATCH" \
    --worker-nodes 1 --workers-per-node 1 --servers-per-node 1 --node-host 127.0.0.1 \
    --master-port "$PORT2" --timeout 200 "$PROG" data) || { echo sbatch-failed >batch.state; exit 0; }
state=PENDING
for _ in $(seq 2400); do   # up to 240 s; Slurm reports the end within a second
  state=$(scontrol show job "$jid" -o | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  case $state in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break;; esac
  sleep 0.1
done
echo "$state" >batch.state
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path: Path):
    # srun -l labels each line "<task>: "; the launcher's "[role:rank]" follows.
    return [re.sub(r"^\s*\d+: ", "", l) for l in path.read_text().splitlines()] \
        if path.exists() else []


def test_srun_and_sbatch_run_a_cluster_across_two_slurm_nodes(tmp_path):
    env = launcher_env(OUT=str(tmp_path), PY=sys.executable, PROG=str(PROGRAMS / "cross_host.py"),
                       SBATCH=str(SBATCH), PORT1=str(_free_port()), PORT2=str(_free_port()),
                       SLURM_LOCAL_TIMEOUT="420")
    proc = subprocess.run(["bash", str(SLURM_LOCAL), "bash", "-c", JOB], env=env,
                          capture_output=True, text=True, timeout=540)
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    details = proc.stderr[-3000:] + "".join(
        f"\n----- {p.name}\n" + p.read_text()[-3000:] for p in sorted(tmp_path.iterdir()))
    assert proc.returncode == 0, details

    # srun: 2 nodes x (2 workers + 2 servers), scheduler on the first node.
    assert (tmp_path / "srun.rc").read_text().strip() == "0", details
    out = _lines(tmp_path / "srun.out")
    names = {f"{r}:{i}" for r in ("worker", "server") for i in range(4)}
    assert {l.split()[-1] for l in out if " PASS " in l} == names, details
    local = same_host_transport()
    hosts = [json.loads(l.split(" HOST ", 1)[1]) for l in out if " HOST " in l]
    assert {h["name"] for h in hosts} == names, details
    for h in hosts:
        assert set(h["transports"].values()) == {local}, h
    err = _lines(tmp_path / "srun.err")
    placement = [l for l in err if l.startswith("meshpost.launch: node ")]
    assert sorted(placement) == sorted([
        "meshpost.launch: node 0 of 2 runs scheduler, server:0, server:1, worker:0, worker:1; "
        "4 workers and 4 servers in all; scheduler at n1:" + env["PORT1"],
        "meshpost.launch: node 1 of 2 runs server:2, server:3, worker:2, worker:3; "
        "4 workers and 4 servers in all; scheduler at n1:" + env["PORT1"]]), details

    # sbatch with the shipped script: node 0 attention (workers), node 1 FFN (servers).
    assert (tmp_path / "batch.state").read_text().strip() == "COMPLETED", details
    batch = _lines(tmp_path / "batch.out")
    assert {l.split()[-1] for l in batch if " PASS " in l} == {"worker:0", "server:0"}, details
    berr = _lines(tmp_path / "batch.err")
    assert any(l.startswith("meshpost.launch: node 0 of 2 runs scheduler, worker:0;")
               for l in berr), details
    assert any(l.startswith("meshpost.launch: node 1 of 2 runs server:0;") for l in berr), details
