"""Reader for meshpost trace files (``*.mptrace``, written with MESHPOST_TRACE=...).

Layout (little-endian, version 1; the writer is ps/trace_recorder.cc, the format is in
docs/profiling.md): a 256-byte header, then 128-byte records. Nothing here needs torch or
the C++ extension, so traces can be read on any machine.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MAGIC = b"MPTRACE\0"
VERSION = 1
HEADER_BYTES = 256
RECORD_BYTES = 128

KIND_WORKER_REQUEST = 1
KIND_SERVER_REQUEST = 2
KIND_WAKE = 3
KIND_CLOCK = 4
KIND_STATS = 5

TRANSPORTS = {0: "unknown", 1: "cma", 2: "shm", 3: "tcp", 4: "rdma"}
ROLES = {1: "worker", 2: "server"}
MODES = {0: "off", 1: "sample", 2: "all"}

_HEADER = struct.Struct("<8sIIIBBHiiiIIIQQ64s")
_RECORD = struct.Struct("<BBHiQQQQ3q8Q")
assert _RECORD.size == RECORD_BYTES


class TraceFormatError(ValueError):
    """A file is not a meshpost trace, or is of a version this reader does not know."""


@dataclass
class Record:
    kind: int
    transport: str
    num_keys: int
    peer: int
    request_id: int
    handle: int
    push_bytes: int
    pull_bytes: int
    keys: Tuple[int, int, int]
    stamps: Tuple[int, ...]


@dataclass
class ClockEstimate:
    measured_at: int
    offset_ns: int  # local - scheduler
    error_ns: int
    rtt_ns: int
    samples: int


@dataclass
class TraceFile:
    path: str
    role: str
    rank: int
    num_workers: int
    num_servers: int
    pid: int
    mode: str
    sample_every: int
    seq: int
    opened_mono_ns: int
    opened_wall_ns: int
    host: str
    records: List[Record] = field(default_factory=list)
    clocks: List[ClockEstimate] = field(default_factory=list)
    dropped: int = 0
    written: int = 0
    truncated_bytes: int = 0  # a partial last record (file still being written, or cut)


def read_file(path: str) -> TraceFile:
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < HEADER_BYTES:
        raise TraceFormatError(f"{path}: {len(data)} bytes, shorter than the "
                               f"{HEADER_BYTES}-byte meshpost trace header")
    (magic, version, header_bytes, record_bytes, role, mode, _r, rank, nw, ns, pid,
     sample_every, seq, mono, wall, host) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise TraceFormatError(f"{path}: not a meshpost trace file (magic {magic!r})")
    if version != VERSION or record_bytes != RECORD_BYTES or header_bytes != HEADER_BYTES:
        raise TraceFormatError(
            f"{path}: trace format version {version} (header {header_bytes} B, records "
            f"{record_bytes} B); this reader understands version {VERSION}")
    if role not in ROLES:
        raise TraceFormatError(f"{path}: role {role}; expected 1 (worker) or 2 (server)")
    tf = TraceFile(path=path, role=ROLES[role], rank=rank, num_workers=nw, num_servers=ns,
                   pid=pid, mode=MODES.get(mode, str(mode)), sample_every=sample_every,
                   seq=seq, opened_mono_ns=mono, opened_wall_ns=wall,
                   host=host.split(b"\0", 1)[0].decode("utf-8", "replace"))
    body = len(data) - HEADER_BYTES
    tf.truncated_bytes = body % RECORD_BYTES
    for off in range(HEADER_BYTES, len(data) - tf.truncated_bytes, RECORD_BYTES):
        (kind, transport, nkeys, peer, rid, handle, push_b, pull_b, k0, k1, k2,
         *stamps) = _RECORD.unpack_from(data, off)
        if kind == KIND_CLOCK:
            off_ns = stamps[1] - (1 << 64) if stamps[1] >= (1 << 63) else stamps[1]
            tf.clocks.append(ClockEstimate(stamps[0], off_ns, stamps[2], stamps[3], stamps[4]))
        elif kind == KIND_STATS:
            tf.dropped = max(tf.dropped, stamps[1])
            tf.written = max(tf.written, stamps[2])
        elif kind in (KIND_WORKER_REQUEST, KIND_SERVER_REQUEST, KIND_WAKE):
            tf.records.append(Record(kind, TRANSPORTS.get(transport, "unknown"), nkeys, peer,
                                     rid, handle, push_b, pull_b, (k0, k1, k2),
                                     tuple(stamps)))
        # Unknown kinds are skipped: a newer writer may add kinds within version 1.
    return tf


def read_dir(directory: str) -> List[TraceFile]:
    """Every ``*.mptrace`` file in `directory`, oldest rotation first per node."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"trace directory {directory!r} does not exist")
    paths = sorted(glob.glob(os.path.join(directory, "*.mptrace")))
    if not paths:
        raise FileNotFoundError(
            f"no *.mptrace files in {directory!r}; run with MESHPOST_TRACE=all "
            f"MESHPOST_TRACE_DIR={directory}")
    files = [read_file(p) for p in paths]
    files.sort(key=lambda f: (f.role, f.rank, f.pid, f.seq))
    return files


def best_clock(files: List[TraceFile]) -> Optional[ClockEstimate]:
    """The estimate with the smallest error bound among a node's files."""
    clocks = [c for f in files for c in f.clocks]
    return min(clocks, key=lambda c: c.error_ns) if clocks else None


def group_by_node(files: List[TraceFile]) -> Dict[Tuple[str, int], List[TraceFile]]:
    out: Dict[Tuple[str, int], List[TraceFile]] = {}
    for f in files:
        out.setdefault((f.role, f.rank), []).append(f)
    return out
