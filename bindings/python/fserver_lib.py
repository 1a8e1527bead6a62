"""fserver_lib: StepMesh's Python API, served by meshpost.

Code written as ``import fserver_lib as ps`` for StepMesh runs unchanged: same function
names, signatures and defaults, configuration from the DMLC_* variables. Differences
that keep compatibility:

* errors raise exceptions (subclasses of meshpost.Error and of ValueError, TypeError,
  TimeoutError or ConnectionError) instead of aborting the process;
* ``get_batch(timeout_ms=None)`` accepts an optional timeout;
* ``push_pull`` allocates StepMesh's ids (one per push tensor and per pull slot position,
  the handler first); ``get_all_handlers``, ``wait`` and ``fetch_trace`` accept each of
  them. ``fetch_trace(x)`` gives the 8 stamps of the request that carried x's tensors (the
  server that answered last); ``fetch_traces(handler)`` gives every server's;
* ``need_event`` orders the transfer after the work queued so far on the current CUDA
  stream when the tensors are CUDA tensors (ignored for CPU tensors, which need no event);
* the CUDA API (``SimpleNotify``, ``map_pinned_tensor``, ``write_flag``, ``wait_flag``,
  ``seq_add_one``) raises ``UnimplementedError``/``ConnectionError`` naming the reason where
  CUDA is unusable (CPU-only build, no driver, no device); ``write_flag``, ``wait_flag`` and
  ``seq_add_one`` also accept CPU tensors, with the obvious CPU meaning. A second
  ``SimpleNotify.stream_wait_event`` before ``wait_event_done`` queues behind the first
  instead of terminating the process. See docs/gpu.md.

Tensors returned by ``get_batch`` view the received bytes without a copy and stay valid
for as long as they are referenced (see docs/python.md for the registered-buffer case).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import List, Optional, Sequence, Tuple

import torch


from meshpost import _meshpost
from meshpost.errors import (FailedPreconditionError, InvalidArgumentError, UnavailableError,
                             UnimplementedError)
from meshpost._options import build_env
from meshpost.node import _event_stream, track  # need_event: the same rule as meshpost

__all__ = [
    "init", "stop", "push_pull", "wait", "get_batch", "respond", "respond_vec",
    "register_recv_buffer", "barrier", "get_all_handlers", "fetch_trace", "fetch_traces",
    "get_nanosecond", "SimpleNotify", "map_pinned_tensor", "write_flag", "wait_flag",
    "seq_add_one", "empty",
]

_node: Optional["_meshpost.Node"] = None


def _require() -> "_meshpost.Node":
    if _node is None:
        raise FailedPreconditionError("fserver_lib: call init() first")
    return _node


def init() -> None:
    """Joins the cluster described by the DMLC_* variables (all roles, scheduler too)."""
    global _node
    if _node is not None:
        raise FailedPreconditionError("fserver_lib.init: already initialised; call stop() first")
    node = track(_meshpost.Node(build_env(None, {})))
    node.start()
    _node = node


def stop() -> None:
    """Leaves the cluster. The scheduler waits until every worker and server left."""
    global _node
    node = _require()
    _node = None
    node.stop(-1)
    node.close(0)


def push_pull(push_tensors: Sequence[torch.Tensor], push_keys: Sequence[int],
              pull_tensors: Sequence[torch.Tensor], pull_keys: Sequence[int],
              need_event: bool = True) -> int:
    """Pushes to every server and pulls into pull_tensors (server-major); returns a handler."""
    stream = _event_stream(need_event, list(push_tensors) + list(pull_tensors))
    return _require().push_pull(push_tensors, push_keys, pull_tensors, pull_keys, stream)


def wait(handler: int, timeout_ms: int = 10000) -> None:
    """Blocks until `handler` completed; TimeoutError after timeout_ms."""
    _require().wait(handler, timeout_ms)


def get_batch(timeout_ms: Optional[int] = None) -> List[Tuple[int, List[torch.Tensor], List[int]]]:
    """One (handler, [tensors], [keys]) per worker, in worker-rank order."""
    batch = _require().get_batch(-1 if timeout_ms is None else timeout_ms)
    return [(handle, tensors, keys) for handle, _rank, tensors, keys in batch]


def respond(tensors: Sequence[torch.Tensor], handler: int, need_event: bool = False) -> None:
    """Answers `handler` into the worker's pull slots (sizes and dtypes must match)."""
    _require().respond(tensors, handler, _event_stream(need_event, tensors))


def respond_vec(ret_buffer: torch.Tensor, tensors_vec: Sequence[torch.Tensor],
                handler_vec: Sequence[int]) -> None:
    """handler_vec[i] gets rows [off_i, off_i + tensors_vec[i].shape[0]) of ret_buffer."""
    # StepMesh orders respond_vec after the current stream (its first response has an event).
    _require().respond_vec(ret_buffer, tensors_vec, handler_vec,
                           _event_stream(True, [ret_buffer]))


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """meshpost extension: a CPU tensor in shared memory (meshpost.empty). Pushed from or
    pulled into on the same host, it moves without a cross-process copy; elsewhere it is an
    ordinary tensor. Not in StepMesh: code that wants to stay portable can fall back to
    torch.empty when fserver_lib has no `empty`."""
    from meshpost.shared import empty as _empty
    return _empty(shape, dtype)


def register_recv_buffer(tensor: torch.Tensor, worker_ranks: Sequence[int],
                         push_keys: Sequence[int]) -> None:
    """Pushes of push_keys[i] from worker_ranks[i] land in chunk i of `tensor`."""
    _require().register_recv_buffer(tensor, worker_ranks, push_keys)


def barrier(include_server: bool, include_worker: bool, instance_barrier: bool = True) -> None:
    """Blocks until every live member of the chosen groups arrived.

    meshpost has one barrier domain per group set, so instance_barrier is accepted for
    compatibility and has no further effect.
    """
    node = _require()
    mask = (_meshpost.SERVER_GROUP if include_server else 0) | (
        _meshpost.WORKER_GROUP if include_worker else 0)
    if mask == 0:
        raise InvalidArgumentError(
            "barrier: include_server=False and include_worker=False; expected at least one group")
    if node.role == "scheduler":
        # Workers and servers barrier among themselves: a scheduler barrier could never be
        # joined, so it would block until they left (ps-lite refuses it too).
        raise FailedPreconditionError(
            "barrier: called on the scheduler, which is not a member of the server or worker "
            "group; expected only workers and servers to call barrier")
    node.barrier(mask, -1)


def get_all_handlers(handler: int) -> List[int]:
    """The ids of `handler`'s batch, `handler` first: one per push tensor and one per pull
    slot position (StepMesh's numbering). Each is accepted by wait() and fetch_trace()."""
    return list(_require().get_all_handlers(handler))


def fetch_trace(handler: int) -> List[int]:
    """The 8 stamps (get_nanosecond() clock) of the request that carried `handler`'s
    tensors: request start, posted, received, processed; response start, posted,
    received, processed. `handler` may be any id from get_all_handlers(); the request is
    the one to the server that answered last (the batch's critical path)."""
    return list(_require().fetch_trace(handler))


def fetch_traces(handler: int) -> List[List[int]]:
    """The 8 trace stamps of `handler`'s request to every server, in server-rank order."""
    return [list(t) for t in _require().fetch_traces(handler)]


def get_nanosecond() -> int:
    """Monotonic nanoseconds on the trace clock."""
    return _meshpost.get_nanosecond()


# --- CUDA -----------------------------------------------------------------------------

def _require_cuda(fn: str) -> None:
    usable, reason = _meshpost.cuda_status()
    if not usable:
        # No CUDA in this build: UnimplementedError; a CUDA build on a machine without a
        # usable driver or device: UnavailableError. Both carry the backend's reason.
        cls = UnavailableError if _meshpost.built_with_cuda() else UnimplementedError
        raise cls(f"{fn}: CUDA is not usable in this process: {reason}")


def _int64_flag(t: torch.Tensor, fn: str, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{fn}: {arg} is a {type(t).__name__}; expected a torch.Tensor")
    if t.dtype != torch.int64 or t.numel() < 1:
        raise InvalidArgumentError(
            f"{fn}: {arg} is {t.dtype} with {t.numel()} elements; expected an int64 tensor "
            "with at least one element (element 0 is used)")


def _stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def map_pinned_tensor(tensor: torch.Tensor, device_index: int) -> torch.Tensor:
    """A CUDA tensor on device_index viewing `tensor`'s pinned host memory (no copy)."""
    _require_cuda("map_pinned_tensor")
    if not isinstance(tensor, torch.Tensor) or tensor.is_cuda or not tensor.is_pinned():
        raise InvalidArgumentError(
            "map_pinned_tensor: tensor must be a pinned CPU tensor (torch.empty(..., "
            "pin_memory=True))")
    return _meshpost.map_pinned_tensor(tensor, int(device_index))


def write_flag(flag: torch.Tensor, seq) -> None:
    """flag[0] = seq (an int, or element 0 of an int64 tensor read when the op runs), after
    the work queued so far on the current stream; on CPU tensors, immediately."""
    _int64_flag(flag, "write_flag", "flag")
    if isinstance(seq, torch.Tensor):
        _int64_flag(seq, "write_flag", "seq")
    if not flag.is_cuda:
        if isinstance(seq, torch.Tensor) and seq.is_cuda:
            raise InvalidArgumentError("write_flag: flag is a CPU tensor but seq is on CUDA")
        value = int(seq[0]) if isinstance(seq, torch.Tensor) else int(seq)
        _meshpost.host_write_flag(flag.data_ptr(), value)
        return
    _require_cuda("write_flag")
    value_addr = seq.data_ptr() if isinstance(seq, torch.Tensor) else 0
    value = 0 if isinstance(seq, torch.Tensor) else int(seq)
    _meshpost.cuda_write_flag(flag.data_ptr(), value, value_addr, _stream_of(flag))


def wait_flag(flag: torch.Tensor, seq, timeout_ms: Optional[int] = None) -> None:
    """The current stream waits (on the GPU) until flag[0] >= seq; with CPU tensors the
    calling thread waits, up to timeout_ms (TimeoutError after)."""
    _int64_flag(flag, "wait_flag", "flag")
    if isinstance(seq, torch.Tensor):
        _int64_flag(seq, "wait_flag", "seq")
    if not flag.is_cuda:
        target = int(seq[0]) if isinstance(seq, torch.Tensor) else int(seq)
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        delay = 1e-5
        while _meshpost.host_read_flag(flag.data_ptr()) < target:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"wait_flag: flag is {_meshpost.host_read_flag(flag.data_ptr())}, not >= "
                    f"{target} after timeout_ms={timeout_ms}")
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)
        return
    _require_cuda("wait_flag")
    value_addr = seq.data_ptr() if isinstance(seq, torch.Tensor) else 0
    value = 0 if isinstance(seq, torch.Tensor) else int(seq)
    _meshpost.cuda_wait_flag(flag.data_ptr(), value, value_addr, _stream_of(flag))


def seq_add_one(seq: torch.Tensor) -> None:
    """seq[0] += 1, on the current stream for CUDA tensors (capturable in CUDA Graphs)."""
    _int64_flag(seq, "seq_add_one", "seq")
    if not seq.is_cuda:
        seq[0] += 1
        return
    _require_cuda("seq_add_one")
    _meshpost.cuda_seq_add_one(seq.data_ptr(), _stream_of(seq))


# How long SimpleNotify's background thread waits for one handler before reporting it.
_NOTIFY_WAIT_TIMEOUT_MS = 600_000


class SimpleNotify:
    """StepMesh's stream/CPU notifier. A pinned counter flag is signalled by a background
    thread, in order: stream_wait_event(h) and block_now_stream_and_get_batch() each make
    the current stream wait (on the GPU) for the next signal and queue the work that sends
    it (waiting for handler h; fetching a batch). block_now_stream() makes the stream wait
    for the next signal without queueing work. wait_event_done() blocks the CPU until every
    queued wait finished; get_future_batch_data() returns the oldest fetched batch.
    Unlike StepMesh, calls may be repeated before the matching wait_event_done (they queue),
    and errors (a failed handler, a timeout) are raised by wait_event_done /
    get_future_batch_data instead of ending the process."""

    def __init__(self) -> None:
        self._flag: Optional[torch.Tensor] = None
        self._issued = 0
        self._lock = threading.Lock()
        self._jobs: "queue.Queue" = queue.Queue()
        self._pending_waits: List[threading.Event] = []
        self._errors: List[BaseException] = []
        self._batches: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def init(self) -> None:
        _require_cuda("SimpleNotify.init")
        if self._flag is not None:
            return
        self._flag = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._flag_dev = map_pinned_tensor(self._flag, torch.cuda.current_device())
        self._thread = threading.Thread(target=self._run, name="meshpost-notify", daemon=True)
        self._thread.start()

    def _require_init(self, fn: str) -> None:
        if self._flag is None:
            raise FailedPreconditionError(f"SimpleNotify.{fn}: call init() first")

    def _next_signal(self) -> int:
        with self._lock:
            self._issued += 1
            return self._issued

    def _stream_wait(self, target: int) -> None:
        _meshpost.cuda_wait_flag(self._flag_dev.data_ptr(), target, 0,
                                 torch.cuda.current_stream().cuda_stream)

    def _signal(self, target: int) -> None:
        _meshpost.host_write_flag(self._flag.data_ptr(), target)

    def _run(self) -> None:
        while True:
            kind, target, arg, done = self._jobs.get()
            try:
                if kind == "wait":
                    wait(arg, timeout_ms=_NOTIFY_WAIT_TIMEOUT_MS)
                else:
                    self._batches.put(get_batch())
            except BaseException as e:  # reported by wait_event_done / get_future_batch_data
                if kind == "wait":
                    self._errors.append(e)
                else:
                    self._batches.put(e)
            finally:
                # Signalled on failure too: a GPU stream stuck forever is worse than one that
                # runs on while the CPU side reports the error.
                self._signal(target)
                done.set()

    def stream_wait_event(self, handler: int) -> None:
        self._require_init("stream_wait_event")
        target = self._next_signal()
        self._stream_wait(target)
        done = threading.Event()
        self._pending_waits.append(done)
        self._jobs.put(("wait", target, handler, done))

    def wait_event_done(self) -> None:
        self._require_init("wait_event_done")
        waits, self._pending_waits = self._pending_waits, []
        for done in waits:
            done.wait()
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def block_now_stream(self) -> None:
        self._require_init("block_now_stream")
        with self._lock:
            target = self._issued + 1
        self._stream_wait(target)

    def block_now_stream_and_get_batch(self) -> None:
        self._require_init("block_now_stream_and_get_batch")
        target = self._next_signal()
        self._stream_wait(target)
        self._jobs.put(("batch", target, None, threading.Event()))

    def get_future_batch_data(self):
        self._require_init("get_future_batch_data")
        result = self._batches.get()
        if isinstance(result, BaseException):
            raise result
        return result

