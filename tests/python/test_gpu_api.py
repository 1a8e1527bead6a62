"""fserver_lib's CUDA API where no GPU is usable (this CI machine): clear errors naming the
reason, the CPU meaning of the flag helpers, and need_event on CPU tensors. The same API
with CUDA tensors is exercised by tests/gpu/ (scripts/gpu_check.sh) on a machine with a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

import fserver_lib as ps
import meshpost
from meshpost import _meshpost

usable, reason = _meshpost.cuda_status()
pytestmark = pytest.mark.skipif(usable, reason="a CUDA device is usable: tests/gpu covers it")


def test_cuda_status_names_the_reason():
    assert usable is False
    assert reason
    if _meshpost.built_with_cuda():
        assert "libcuda" in reason or "CUDA" in reason
    else:
        assert "no CUDA support" in reason


def _expected_error():
    return meshpost.UnavailableError if _meshpost.built_with_cuda() else meshpost.UnimplementedError


def test_simple_notify_init_raises_with_the_reason():
    n = ps.SimpleNotify()
    with pytest.raises(_expected_error()) as info:
        n.init()
    assert "SimpleNotify.init" in str(info.value)
    assert reason in str(info.value)


def test_simple_notify_before_init_is_a_clear_error():
    n = ps.SimpleNotify()
    for call in (lambda: n.stream_wait_event(1), n.wait_event_done, n.block_now_stream,
                 n.block_now_stream_and_get_batch, n.get_future_batch_data):
        with pytest.raises(meshpost.FailedPreconditionError, match="call init"):
            call()


def test_map_pinned_tensor_raises_with_the_reason():
    with pytest.raises(_expected_error(), match="map_pinned_tensor"):
        ps.map_pinned_tensor(torch.zeros(4), 0)


def test_flags_on_cpu_tensors_have_their_cpu_meaning():
    flag = torch.zeros(1, dtype=torch.int64)
    seq = torch.tensor([4], dtype=torch.int64)
    ps.seq_add_one(seq)
    assert int(seq[0]) == 5
    ps.write_flag(flag, seq)
    assert int(flag[0]) == 5
    ps.wait_flag(flag, 5, timeout_ms=1000)  # already reached: returns
    ps.write_flag(flag, 7)
    assert int(flag[0]) == 7


def test_cpu_wait_flag_returns_when_another_thread_writes():
    flag = torch.zeros(1, dtype=torch.int64)
    writer = threading.Thread(target=ps.write_flag, args=(flag, 3))
    writer.start()
    ps.wait_flag(flag, 3, timeout_ms=60_000)
    writer.join()
    assert int(flag[0]) == 3


def test_cpu_wait_flag_times_out():
    flag = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(TimeoutError, match="wait_flag"):
        ps.wait_flag(flag, 1, timeout_ms=20)


def test_flag_helpers_validate_arguments():
    with pytest.raises(ValueError, match="write_flag: flag"):
        ps.write_flag(torch.zeros(1, dtype=torch.float32), 1)
    with pytest.raises(ValueError, match="seq_add_one: seq"):
        ps.seq_add_one(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="wait_flag: flag"):
        ps.wait_flag([0], 1)
