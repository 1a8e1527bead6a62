"""Multi-process tests: each runs a program from programs/ as a local cluster and asserts
every process exited 0 after checking its data (see conftest.py)."""

from __future__ import annotations

import signal


def test_sum_roundtrip_stepmesh_style(cluster):
    # The scheduler runs the script too, like a StepMesh launch (init() then stop()).
    cluster.run("sum_roundtrip.py", workers=2, servers=1, scheduler_runs_script=True)


def test_routing_2x2_and_get_batch_order(cluster):
    cluster.run("routing_2x2.py", workers=2, servers=2)


def test_three_microbatches_in_flight(cluster):
    cluster.run("microbatches.py", workers=2, servers=2)


def test_bf16_int32_with_changing_rows(cluster):
    cluster.run("dtypes_rows.py", workers=1, servers=1)


def test_respond_vec_two_workers(cluster):
    cluster.run("respond_vec.py", workers=2, servers=1)


def test_register_recv_buffer_in_place(cluster):
    cluster.run("recv_buffer.py", workers=2, servers=1)


def test_fetch_trace_ordering(cluster):
    cluster.run("trace.py", workers=1, servers=2)


def test_bad_inputs_raise_and_process_keeps_working(cluster):
    cluster.run("bad_inputs.py", workers=1, servers=1)


def test_wait_timeout_raises_timeout_error(cluster):
    cluster.run("wait_timeout.py", workers=1, servers=1)


def test_ctrl_c_interrupts_wait(cluster):
    cluster.run("interrupt.py", workers=1, servers=1)


def test_killed_server_fails_worker_wait(cluster):
    results = cluster.run("killed_server.py", workers=1, servers=2, fail_fast=False,
                          expect_ok=False, timeout=60)
    dead = results["server:1"]
    assert dead.returncode == -signal.SIGKILL, dead.describe()
    for name in ("worker:0", "server:0"):
        assert results[name].ok, results[name].describe() + "\n" + "\n".join(results[name].output)
        assert f"PASS {name}" in results[name].output
    assert any("wait failed as expected" in line for line in results["worker:0"].output)


def test_soak_rss_does_not_grow(cluster):
    cluster.run("soak.py", workers=1, servers=1, timeout=300)


def test_shared_tensors_and_outputs_same_host(cluster):
    cluster.run("shared_tensors.py", workers=2, servers=2)


def test_shared_tensors_and_outputs_over_tcp(cluster):
    # The same program where memory cannot be shared: outputs are fresh tensors, copied.
    cluster.run("shared_tensors.py", workers=2, servers=2, env={"MESHPOST_TRANSPORT": "tcp"})


def test_forever_timeout_waits_instead_of_timing_out_at_once(cluster):
    cluster.run("forever_timeout.py", workers=1, servers=1)


def test_tensor_over_the_frame_cap_is_refused_and_the_pair_keeps_working(cluster):
    cluster.run("frame_cap.py", workers=1, servers=1,
                env={"MESHPOST_TRANSPORT": "tcp", "MESHPOST_MAX_MESSAGE_BYTES": "65536"})


def test_a_connection_the_receiver_closed_authenticates_again(cluster):
    # Only the server has the small cap, so the worker sends the frame and the server
    # closes the (authenticated) connection under it.
    cluster.run("receiver_cap.py", workers=1, servers=1, env={"MESHPOST_TRANSPORT": "tcp"},
                env_for={"server:0": {"MESHPOST_MAX_MESSAGE_BYTES": "65536"}})


def test_scheduler_barrier_fails_at_once_and_the_others_complete(cluster):
    cluster.run("scheduler_barrier.py", workers=1, servers=1, scheduler_runs_script=True)
