"""python -m meshpost.bench: a small sweep end to end (table, JSON, plot, traces)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from meshpost import bench


def test_size_parsing():
    assert bench.parse_sizes("4K:64K") == [4096, 16384, 65536]
    assert bench.parse_sizes("4K:64K", 2) == [4096, 8192, 16384, 32768, 65536]
    assert bench.parse_sizes("100,1M") == [100, 1 << 20]
    assert bench.parse_clusters("1x1,2X3") == [(1, 1), (2, 3)]
    for bad in ("0", "4Q", "-4K", ""):
        with pytest.raises(ValueError):
            bench.parse_size(bad)
    with pytest.raises(ValueError, match="MxN"):
        bench.parse_clusters("2by2")


def test_bad_arguments_exit_with_a_message():
    out = subprocess.run([sys.executable, "-m", "meshpost.bench", "--dtypes", "complex7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "complex7" in out.stderr


def test_trace_directory_of_an_earlier_sweep_is_refused_up_front(tmp_path):
    (tmp_path / "1x1-auto").mkdir()
    (tmp_path / "1x1-auto" / "worker0-p1.0000.mptrace").write_bytes(b"MPTRACE\0")
    out = subprocess.run([sys.executable, "-m", "meshpost.bench", "--trace", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout
    assert "already holds 1 trace file(s) of an earlier run" in out.stderr, out.stderr


@pytest.mark.skipif(os.environ.get("MESHPOST_TRANSPORT") == "tcp",
                    reason="transport-independent; covered by the default pass (CI time)")
def test_sweep_writes_table_json_plot_and_traces(tmp_path):
    js, png, tr = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "trace"
    out = subprocess.run(
        [sys.executable, "-m", "meshpost.bench", "--sizes", "4K,64K", "--dtypes",
         "float32,bfloat16", "--clusters", "1x2", "--iters", "10", "--warmup", "2",
         "--json", str(js), "--plot", str(png), "--trace", str(tr)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # Live progress (not a tty here: one line per point) and the final table.
    assert out.stderr.count("[1x2 auto]") == 4, out.stderr
    assert "p50 (us)" in out.stdout and "64 KiB" in out.stdout and "bfloat16" in out.stdout
    rows = json.loads(js.read_text())["results"]
    assert {(r["size"], r["dtype"]) for r in rows} == {
        (4096, "float32"), (65536, "float32"), (4096, "bfloat16"), (65536, "bfloat16")}
    for r in rows:
        assert r["cluster"] == "1x2" and r["workers"] == 1
        assert 0 < r["p50_us"] <= r["p99_us"] and r["gbps"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    rep = subprocess.run([sys.executable, "-m", "meshpost.trace", "report",
                          str(tr / "1x2-auto"), "--json"], capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0, rep.stderr
    # (10 + 2) iterations x 4 points, to each of 2 servers.
    assert json.loads(rep.stdout)["requests"] == 2 * 4 * 12
