"""The launcher CLI: output prefixes, exit codes, stopping the others on a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
