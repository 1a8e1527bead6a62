"""StepMesh compatibility: StepMesh-style programs under StepMesh's launch environment,
and the launch variables' parsing as seen from Python (see docs/configuration.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fserver_lib
import meshpost
from meshpost import _meshpost, _options

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# The environment StepMesh's test scripts (tests/fserver/run_single_gpu.sh) and its vLLM
# launch set, apart from addresses and ports the local launcher assigns.
STEPMESH_ENV = {
    "DMLC_ENABLE_RDMA": "ibverbs",
    "DMLC_INTERFACE": "auto",
    "STEPMESH_SPLIT_QP_LAG": "0",
    "STEPMESH_BIND_CPU_CORE": "1",
    "STEPMESH_CPU_START_OFFSET": "10",
    "STEPMESH_GPU": "0",
}

# Lines a normal start and stop must not print at INFO.
ALARMING = re.compile(r"\[(error|critical)\]|UNAVAILABLE|Broken pipe|doorbell")


def meshpost_log_lines(output):
    return [line for line in output if re.search(r"\] \[(ps|van|common|tensor)\] \[", line)]


def test_stepmesh_program_runs_unchanged_1x1_and_2x2(cluster):
    lines = {}
    for workers, servers in ((1, 1), (2, 2)):
        results = cluster.run("stepmesh_compat.py", workers=workers, servers=servers,
                              env=STEPMESH_ENV, scheduler_runs_script=True, timeout=240)
        for name, r in results.items():
            bad = [line for line in meshpost_log_lines(r.output) if ALARMING.search(line)]
            assert not bad, f"{name} logged alarming lines on a normal run:\n" + "\n".join(bad)
        for w in range(workers):
            assert any("iterations x 3 stages checked" in line
                       for line in results[f"worker:{w}"].output)
        # "waiting for ..." progress lines depend on how fast the machine starts processes.
        lines[(workers, servers)] = {
            name: [line for line in meshpost_log_lines(r.output) if "waiting for" not in line]
            for name, r in results.items()}
    # At INFO a start/stop prints O(1) lines per process, not one per peer: a worker or
    # server of the 2x2 cluster prints no more than one of the 1x1 cluster; the scheduler
    # may name each node once as it registers.
    small, big = lines[(1, 1)], lines[(2, 2)]
    for name, printed in big.items():
        role = name.split(":")[0]
        ref = "scheduler" if role == "scheduler" else f"{role}:0"
        limit = len(small[ref]) + (3 if role == "scheduler" else 0)
        assert len(printed) <= limit, (
            f"{name} of the 2x2 cluster printed {len(printed)} lines, {ref} of the 1x1 cluster "
            f"{len(small[ref])}:\n" + "\n".join(printed) + "\n-- 1x1:\n" + "\n".join(small[ref]))


def test_unsupported_stepmesh_vans_are_refused_listing_the_supported_ones(clean_env):
    for var, value in (("DMLC_ENABLE_RDMA", "fabric"), ("DMLC_ENABLE_RDMA", "ucx"),
                       ("DMLC_PS_VAN_TYPE", "tp"), ("DMLC_ENABLE_RDMA", "multivan"),
                       ("DMLC_ENABLE_UCX", "1")):
        env = _options.build_env("worker", {"root_uri": "127.0.0.1", "root_port": 1,
                                            "num_workers": 1, "num_servers": 1}, environ={})
        env[var] = value
        with pytest.raises(ValueError) as info:
            _meshpost.Node(env)
        msg = str(info.value)
        assert var in msg and "supported: zmq or 0" in msg and "ibverbs or 1" in msg, msg


def test_stepmesh_launch_values_are_accepted(clean_env):
    env = _options.build_env("scheduler", {"root_uri": "127.0.0.1", "root_port": 0,
                                           "num_workers": 1, "num_servers": 1}, environ={})
    env.update(STEPMESH_ENV)
    env.update({"STEPMESH_DROP_RATE": "0", "PS_VERBOSE": "3", "DMLC_RANK_OFFSET": "0"})
    node = _meshpost.Node(env)  # parses and validates; start() is not called
    assert node.role == "scheduler"
    node.close(0)


def test_rank_arithmetic_follows_stepmesh(clean_env):
    # sglang's one-cluster-per-GPU launch: rank = 0 * 1 + 3 - 3 = 0.
    env = _options.build_env("worker", {"root_uri": "127.0.0.1", "root_port": 1,
                                        "num_workers": 1, "num_servers": 1}, environ={})
    env.update({"STEPMESH_GPU": "3", "DMLC_RANK_OFFSET": "-3"})
    node = _meshpost.Node(env)
    assert node.rank == 0
    node.close(0)
    env["DMLC_RANK_OFFSET"] = "0"  # rank 3 with one worker
    with pytest.raises(ValueError, match="STEPMESH_GPU"):
        _meshpost.Node(env)


def test_option_variables_come_from_the_cpp_table():
    table = {row[0]: row for row in _meshpost.option_table()}
    assert meshpost.OPTION_VARIABLES == {row[1]: var for var, row in table.items() if row[1]}
    # The variables issue 8 found missing from the Python list.
    have = set(meshpost.OPTION_VARIABLES.values())
    assert "MESHPOST_CMA_DISABLE" in have
    rdma = {v for v in table if v.startswith("MESHPOST_RDMA_")}
    assert rdma and rdma <= have
    for var in ("DMLC_ENABLE_RDMA", "DMLC_RANK_OFFSET", "STEPMESH_GPU", "MESHPOST_LOG_LEVEL",
                "STEPMESH_BIND_CPU_CORE", "STEPMESH_CPU_START_OFFSET"):
        assert var in have, var
    ignored = {v for v, row in table.items() if row[2] == "ignored"}
    assert {"STEPMESH_SPLIT_QP_LAG", "STEPMESH_DROP_RATE"} <= ignored


def test_configuration_doc_tables_are_generated_from_the_table():
    doc = DOCS.read_text(encoding="utf-8")
    for group in _options.GROUPS:
        assert _options.doc_block(group) in doc, (
            f"docs/configuration.md's {group} table is stale; run python -m meshpost._options "
            f"--write-docs docs/configuration.md")
    for var, keyword, group, *_ in _meshpost.option_table():
        assert f"`{var}`" in doc, var
