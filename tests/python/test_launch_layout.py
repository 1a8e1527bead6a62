"""Where the multi-host launcher puts each process, and what it derives from Slurm."""

from __future__ import annotations

import pytest

from meshpost.launch import Layout, expand_hostlist, slurm_layout


def test_colocated_layout_gives_stepmesh_coordinates():
    # 2 hosts x (2 workers + 2 servers): rank = DMLC_NODE_RANK * DMLC_GROUP_SIZE + instance.
    h1 = Layout(nnodes=2, node_rank=1, workers_per_node=2, servers_per_node=2)
    assert (h1.num_workers, h1.num_servers, h1.runs_scheduler) == (4, 4, False)
    got = [(c.name, c.node_rank, c.group_size, c.instance) for c in h1.children()]
    assert got == [("server:2", 1, 2, 0), ("server:3", 1, 2, 1),
                   ("worker:2", 1, 2, 0), ("worker:3", 1, 2, 1)]
    for c in h1.children():
        assert c.rank == c.node_rank * c.group_size + c.instance
    assert Layout(2, 0, 2, 2).runs_scheduler


def test_split_layout_numbers_hosts_per_role():
    # AFD: hosts 0-1 attention (workers), hosts 2-4 FFN (servers).
    layouts = [Layout(5, r, workers_per_node=4, servers_per_node=2, worker_nodes=2)
               for r in range(5)]
    assert {(l.num_workers, l.num_servers) for l in layouts} == {(8, 6)}
    names = [[c.name for c in l.children()] for l in layouts]
    assert names[0] == ["worker:0", "worker:1", "worker:2", "worker:3"]
    assert names[1] == ["worker:4", "worker:5", "worker:6", "worker:7"]
    assert names[2] == ["server:0", "server:1"]
    assert names[4] == ["server:4", "server:5"]
    assert [c.node_rank for c in layouts[3].children()] == [1, 1]  # 2nd server host
    every = [n for ns in names for n in ns]
    assert len(every) == len(set(every)) == 14


@pytest.mark.parametrize("kwargs, needle", [
    (dict(nnodes=0, node_rank=0, workers_per_node=1, servers_per_node=1), "nnodes=0"),
    (dict(nnodes=2, node_rank=2, workers_per_node=1, servers_per_node=1), "node_rank=2"),
    (dict(nnodes=2, node_rank=0, workers_per_node=-1, servers_per_node=1), ">= 0 each"),
    (dict(nnodes=2, node_rank=0, workers_per_node=0, servers_per_node=1), "at least one worker"),
    (dict(nnodes=2, node_rank=0, workers_per_node=1, servers_per_node=1, worker_nodes=0),
     "worker_nodes=0"),
])
def test_layout_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Layout(**kwargs)


@pytest.mark.parametrize("spec, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[08-10],cpu1", ["gpu08", "gpu09", "gpu10", "cpu1"]),
    ("a[1,3-4]b,c", ["a1b", "a3b", "a4b", "c"]),
])
def test_expand_hostlist(spec, hosts):
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["", "n[3-1]", "n[a-b]", "n[1-2"])
def test_expand_hostlist_rejects_garbage(spec):
    with pytest.raises(ValueError, match="expand_hostlist"):
        expand_hostlist(spec)


def test_slurm_layout_from_srun_variables():
    env = {"SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NODELIST": "node[07-09]",
           "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x3)"}
    assert slurm_layout(env) == (3, 2, "node07")
    with pytest.raises(ValueError, match="one launcher task per node"):
        slurm_layout(dict(env, SLURM_STEP_TASKS_PER_NODE="2(x3)"))
    with pytest.raises(ValueError, match="names 3 hosts but SLURM_STEP_NUM_NODES=4"):
        slurm_layout(dict(env, SLURM_STEP_NUM_NODES="4"))
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        slurm_layout({k: v for k, v in env.items() if k != "SLURM_NODEID"})


def test_log_lines_keep_one_role_tag():
    from meshpost.launch import _strip_role
    line = "[04:01:02.123456] [worker:3] [ps] [info] server 0 via cma"
    assert _strip_role(line, "worker:3") == "[04:01:02.123456] [ps] [info] server 0 via cma"
    assert _strip_role(line, "worker:1") == line  # another process's tag is content
    assert _strip_role("[scheduler] [x] y", "scheduler") == "[x] y"
    assert _strip_role("plain [worker:3] text", "worker:3") == "plain [worker:3] text"


def test_slurm_flag_derives_layout_master_and_port():
    from meshpost.launch import _parse
    env = {"SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_NODELIST": "gpu[01-04]",
           "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_JOB_ID": "123456"}
    ns = _parse(["--slurm", "--worker-nodes", "2", "--workers-per-node", "8",
                 "--servers-per-node", "8", "prog.py"], environ=env)
    assert (ns.master_addr, ns.master_port) == ("gpu01", 20000 + 123456 % 10000)
    assert (ns.layout.nnodes, ns.layout.node_rank) == (4, 3)
    assert [c.name for c in ns.layout.children()] == [f"server:{i}" for i in range(8, 16)]
    ns = _parse(["--slurm", "--master-addr", "10.0.0.9", "--master-port", "29500",
                 "--workers-per-node", "1", "--servers-per-node", "1", "prog.py"], environ=env)
    assert (ns.master_addr, ns.master_port) == ("10.0.0.9", 29500)
