"""The launcher CLI: output prefixes, exit codes, stopping the others on a failure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_HEARTBEATS, PROGRAMS


def _launch(args, timeout):
    env = dict(os.environ)
    env.update(FAST_HEARTBEATS)
    proc = subprocess.Popen([sys.executable, "-m", "meshpost.launch"] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # its children die with it (PR_SET_PDEATHSIG)
        out, err = proc.communicate()
        raise AssertionError(f"launcher did not finish in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out, err


def test_launch_runs_cluster_and_prefixes_output():
    rc, out, err = _launch(["--workers", "2", "--servers", "2", "--transport", "tcp",
                            str(PROGRAMS / "routing_2x2.py")], timeout=120)
    assert rc == 0, out + err
    for name in ("worker:0", "worker:1", "server:0", "server:1"):
        assert f"[{name}] PASS {name}" in out, out
    # meshpost's log lines go to stderr, and name the process once (the launcher's prefix),
    # not twice (prefix + the log pattern's own role tag).
    logs = [line for line in err.splitlines()
            if re.search(r"\[(trace|debug|info|warning|error|critical)\] ", line)]
    assert logs, err
    for line in logs:
        name = line[1:line.index("]")]
        assert line.count(f"[{name}]") == 1, line


def test_launch_stops_others_and_fails_when_one_fails():
    rc, out, err = _launch(["--workers", "2", "--servers", "1",
                            str(PROGRAMS / "fail_one.py")], timeout=120)
    assert rc != 0, out + err
    assert "[worker:1] worker ready" in out, out
    assert any(line.startswith("meshpost.launch: worker:1 (pid ") and line.endswith("exited with 3")
               for line in err.splitlines()), err


def test_launch_reports_bad_env_argument():
    rc, out, err = _launch(["--env", "NOEQUALS", str(PROGRAMS / "fail_one.py")], timeout=60)
    assert rc == 2 and "NAME=VALUE" in err


def test_launch_forwards_whole_lines_from_16_children_on_both_streams(tmp_path):
    lines = 300
    rc, out, err = _launch(["--workers", "8", "--servers", "8", "--scheduler-runs-script",
                            "--log-dir", str(tmp_path), str(PROGRAMS / "chatty.py"),
                            str(lines)], timeout=180)
    assert rc == 0, err[-2000:]
    names = ["scheduler"] + [f"{r}:{i}" for r in ("worker", "server") for i in range(8)]
    for text, stream in ((out, "out"), (err, "err")):
        seen = {n: [] for n in names}
        pattern = re.compile(r"\[([a-z]+(?::\d+)?)\] (\S+) " + stream + r" (\d+) (x*) end")
        for line in text.splitlines():
            if stream == "out" and line.endswith(" out tail end"):
                n = line[1:line.index("]")]
                assert line == f"[{n}] {n} out tail end", line
                continue
            m = pattern.fullmatch(line)
            assert m is not None, f"split or interleaved {stream} line: {line!r}"
            prefix, name, i, xs = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            assert prefix == name, line  # the prefix names the process that wrote it
            assert len(xs) == i * 37 % 300, line
            seen[name].append(i)
        for n in names:
            assert seen[n] == list(range(lines)), (stream, n, seen[n][:5])
    # --log-dir: raw lines per process and stream, no prefix.
    w3 = (tmp_path / "worker-3.out").read_text().splitlines()
    assert w3[0] == "worker:3 out 0  end" and w3[-1] == "worker:3 out tail end", w3[:2]
    assert len((tmp_path / "server-7.err").read_text().splitlines()) == lines


@pytest.mark.parametrize("args, needle", [
    (["--nnodes", "2", "--node-rank", "0", "--workers-per-node", "1",
      "--servers-per-node", "1"], "--master-addr is required"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h0", "--master-port", "1",
      "--workers-per-node", "1", "--servers-per-node", "1"], "--node-rank 2"),
    (["--nnodes", "2", "--master-addr", "h0", "--master-port", "9"],
     "--workers-per-node and --servers-per-node are required"),
    (["--nnodes", "2", "--workers", "2", "--master-addr", "h0", "--master-port", "9",
      "--workers-per-node", "1", "--servers-per-node", "1"], "cannot be combined"),
    (["--nnodes", "2", "--master-addr", "h0", "--master-port", "70000",
      "--workers-per-node", "1", "--servers-per-node", "1"], "--master-port 70000"),
    (["--nnodes", "2", "--master-addr", "h0", "--master-port", "9", "--worker-nodes", "2",
      "--workers-per-node", "1", "--servers-per-node", "1"], "worker_nodes=2"),
    (["--nnodes", "1", "--workers-per-node", "0", "--servers-per-node", "1"],
     "at least one worker"),
    (["--slurm", "--workers-per-node", "1", "--servers-per-node", "1"], "run the launcher under srun"),
    (["--workers", "0"], "--workers 0; expected >= 1"),
])
def test_launch_rejects_bad_flags_clearly(args, needle):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-m", "meshpost.launch"] + args +
                          [str(PROGRAMS / "fail_one.py")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr, proc.stderr
