"""Shared helpers for the meshpost pytest suite.

Every multi-process test runs a program from tests/python/programs/ as a local cluster
(meshpost.launch.Cluster: scheduler on an OS-assigned port reported through a pipe),
with a per-test time limit; processes are killed by pid when the test ends. Programs
assert on the data they receive and print "PASS <role>:<rank>" as their last act.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import pytest

from meshpost.launch import Cluster, ProcessResult

PROGRAMS = Path(__file__).resolve().parent / "programs"

# Fast failure detection so dead-peer tests finish quickly.
FAST_HEARTBEATS = {
    "MESHPOST_HEARTBEAT_INTERVAL_MS": "200",
    "MESHPOST_HEARTBEAT_TIMEOUT_MS": "1500",
}
# Under CPU emulation (the soft-RoCE VM stage, scripts/rdma_vm/) heartbeats arrive seconds
# late and every process spends tens of seconds importing torch: the stage sets a longer
# heartbeat timeout, so only a real death counts, and scales the per-cluster time limits.
TIMEOUT_SCALE = float(os.environ.get("MESHPOST_PYTEST_TIMEOUT_SCALE", "1"))
if os.environ.get("MESHPOST_PYTEST_HEARTBEAT_TIMEOUT_MS"):
    FAST_HEARTBEATS = {
        "MESHPOST_HEARTBEAT_INTERVAL_MS": "1000",
        "MESHPOST_HEARTBEAT_TIMEOUT_MS": os.environ["MESHPOST_PYTEST_HEARTBEAT_TIMEOUT_MS"],
    }


def describe(results: List[ProcessResult]) -> str:
    lines = []
    for r in results:
        lines.append(f"--- {r.describe()}")
        lines.extend(r.output[-40:])
    return "\n".join(lines)


class ClusterRunner:
    def __init__(self) -> None:
        self._clusters: List[Cluster] = []

    def run(self, program: str, workers: int, servers: int, *, args: Optional[List[str]] = None,
            env: Optional[Mapping[str, str]] = None,
            env_for: Optional[Mapping[str, Mapping[str, str]]] = None,
            timeout: float = 90.0, fail_fast: bool = True,
            scheduler_runs_script: bool = False, expect_ok: bool = True) -> Dict[str, ProcessResult]:
        argv = [sys.executable, str(PROGRAMS / program)] + list(args or [])
        merged = dict(FAST_HEARTBEATS)
        merged.update(env or {})
        cluster = Cluster(argv, workers=workers, servers=servers, env=merged, env_for=env_for,
                          scheduler_argv=argv if scheduler_runs_script else None)
        self._clusters.append(cluster)
        cluster.start()
        results = cluster.wait(timeout=timeout * TIMEOUT_SCALE, fail_fast=fail_fast)
        by_name = {r.name: r for r in results}
        if expect_ok:
            assert all(r.ok for r in results), describe(results)
            for name, r in by_name.items():
                if name != "scheduler" or scheduler_runs_script:
                    want = "PASS scheduler:0" if name == "scheduler" else f"PASS {name}"
                    assert want in r.output, describe(results)
        return by_name

    def close(self) -> None:
        for c in self._clusters:
            c.kill()


@pytest.fixture
def cluster():
    runner = ClusterRunner()
    yield runner
    runner.close()


@pytest.fixture
def clean_env(monkeypatch):
    """An environment without launch variables, for in-process tests."""
    for name in list(os.environ):
        if name.startswith(("DMLC_", "MESHPOST_", "STEPMESH_")):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch
