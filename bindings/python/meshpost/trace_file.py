"""Reader for meshpost trace files (``*.mptrace``, written with MESHPOST_TRACE=...).

Layout (little-endian; the writer is ps/trace_recorder.cc, the format is in
docs/profiling.md): a 256-byte header, then fixed-size records: 160 bytes in version 2
(the eight stamps plus the OS thread id that took each), 128 bytes in version 1 (no thread
ids; still read). Nothing here needs torch or the C++ extension, so traces can be read on
any machine.
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MAGIC = b"MPTRACE\0"
VERSION = 2  # what the current writer produces
HEADER_BYTES = 256
RECORD_BYTES_BY_VERSION = {1: 128, 2: 160}
RECORD_BYTES = RECORD_BYTES_BY_VERSION[VERSION]

KIND_WORKER_REQUEST = 1
KIND_SERVER_REQUEST = 2
KIND_WAKE = 3
KIND_CLOCK = 4
KIND_STATS = 5

TRANSPORTS = {0: "unknown", 1: "cma", 2: "shm", 3: "tcp", 4: "rdma"}
ROLES = {1: "worker", 2: "server"}
MODES = {0: "off", 1: "sample", 2: "all", 3: "alternate"}

_HEADER = struct.Struct("<8sIIIBBHiiiIIIQQ64s")
_RECORDS = {1: struct.Struct("<BBHiQQQQ3q8Q"), 2: struct.Struct("<BBHiQQQQ3q8Q8I")}
assert all(_RECORDS[v].size == n for v, n in RECORD_BYTES_BY_VERSION.items())
_NO_TIDS = (0,) * 8


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
    tids: Tuple[int, ...] = _NO_TIDS  # OS thread that took stamps[k]; 0 = unknown (v1)


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
    version: int = VERSION
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
    if (RECORD_BYTES_BY_VERSION.get(version) != record_bytes
            or header_bytes != HEADER_BYTES):
        known = ", ".join(f"{v} ({n}-byte records)" for v, n in RECORD_BYTES_BY_VERSION.items())
        raise TraceFormatError(
            f"{path}: trace format version {version} (header {header_bytes} B, records "
            f"{record_bytes} B); this reader understands versions {known}: read it with "
            f"the meshpost that wrote it, or upgrade this one")
    rec = _RECORDS[version]
    if role not in ROLES:
        raise TraceFormatError(f"{path}: role {role}; expected 1 (worker) or 2 (server)")
    tf = TraceFile(path=path, role=ROLES[role], rank=rank, num_workers=nw, num_servers=ns,
                   pid=pid, mode=MODES.get(mode, str(mode)), sample_every=sample_every,
                   seq=seq, opened_mono_ns=mono, opened_wall_ns=wall,
                   host=host.split(b"\0", 1)[0].decode("utf-8", "replace"),
                   version=version)
    body = len(data) - HEADER_BYTES
    tf.truncated_bytes = body % record_bytes
    for off in range(HEADER_BYTES, len(data) - tf.truncated_bytes, record_bytes):
        (kind, transport, nkeys, peer, rid, handle, push_b, pull_b, k0, k1, k2,
         *rest) = rec.unpack_from(data, off)
        stamps, tids = rest[:8], (tuple(rest[8:]) if version >= 2 else _NO_TIDS)
        if kind == KIND_CLOCK:
            off_ns = stamps[1] - (1 << 64) if stamps[1] >= (1 << 63) else stamps[1]
            tf.clocks.append(ClockEstimate(stamps[0], off_ns, stamps[2], stamps[3], stamps[4]))
        elif kind == KIND_STATS:
            tf.dropped = max(tf.dropped, stamps[1])
            tf.written = max(tf.written, stamps[2])
        elif kind in (KIND_WORKER_REQUEST, KIND_SERVER_REQUEST, KIND_WAKE):
            tf.records.append(Record(kind, TRANSPORTS.get(transport, "unknown"), nkeys, peer,
                                     rid, handle, push_b, pull_b, (k0, k1, k2),
                                     tuple(stamps), tids))
        # Unknown kinds are skipped: a newer writer may add kinds within a version.
    return tf


def read_dir(directory: str, notes: Optional[List[str]] = None) -> List[TraceFile]:
    """Every ``*.mptrace`` file in `directory`, oldest rotation first per node.

    Raises FileNotFoundError / NotADirectoryError / TraceFormatError with what is wrong and
    what to do when the directory cannot be read as one run: it is missing or empty, holds
    only subdirectories of traces, holds a foreign file, or mixes runs (one node written by
    two processes, or disagreeing cluster sizes). Conditions that still allow a report
    (empty files of a node killed at start, rotated-away files, cut last records, mixed
    format versions) are described in `notes` instead."""
    if not os.path.exists(directory):
        raise FileNotFoundError(f"trace directory {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} is a file, not a directory; pass the "
                                 f"directory given as MESHPOST_TRACE_DIR")
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "*.mptrace")))
    if not paths:
        nested = sorted({os.path.relpath(os.path.dirname(p), directory) for p in glob.glob(
            os.path.join(glob.escape(directory), "**", "*.mptrace"), recursive=True)})
        if nested:
            raise FileNotFoundError(
                f"no *.mptrace files directly in {directory!r}, but its subdirectories hold "
                f"traces of {len(nested)} run(s): {', '.join(nested[:8])}"
                f"{' ...' if len(nested) > 8 else ''}; pass one of them")
        raise FileNotFoundError(
            f"no *.mptrace files in {directory!r}; run with MESHPOST_TRACE=all "
            f"MESHPOST_TRACE_DIR={directory}")
    notes = [] if notes is None else notes
    files: List[TraceFile] = []
    for p in paths:
        size = os.path.getsize(p)
        if size < HEADER_BYTES:
            with open(p, "rb") as f:
                start = f.read(8)
            if MAGIC.startswith(start):  # ours, cut before its header was written
                notes.append(f"{os.path.basename(p)}: {size} bytes, no complete header "
                             f"(node killed as it started?); skipped")
                continue
        files.append(read_file(p))
    if not files:
        raise TraceFormatError(f"every *.mptrace file in {directory!r} is empty or cut "
                               f"before its header; nothing to report")
    files.sort(key=lambda f: (f.role, f.rank, f.pid, f.seq))
    _check_one_run(directory, files)
    versions = sorted({f.version for f in files})
    if len(versions) > 1:
        old = [os.path.basename(f.path) for f in files if f.version < versions[-1]]
        notes.append(f"mixed trace format versions {versions}: {', '.join(old[:4])}"
                     f"{' ...' if len(old) > 4 else ''} predate thread ids, so their "
                     f"timeline lanes are per peer, not per OS thread")
    for (role, rank), fs in group_by_node(files).items():
        seqs = [f.seq for f in fs]
        if seqs[0] > 0:
            notes.append(f"{role} {rank}: its first {seqs[0]} file(s) were rotated away "
                         f"(MESHPOST_TRACE_MAX_FILES); its requests before "
                         f"{os.path.basename(fs[0].path)} are missing")
        gaps = [q for q in range(seqs[0], seqs[-1]) if q not in seqs]
        if gaps:
            notes.append(f"{role} {rank}: file(s) with sequence {gaps[:8]} are missing "
                         f"between {os.path.basename(fs[0].path)} and "
                         f"{os.path.basename(fs[-1].path)}")
        cut = [f for f in fs if f.truncated_bytes]
        for f in cut:
            notes.append(f"{os.path.basename(f.path)}: ends in a partial record "
                         f"({f.truncated_bytes} bytes, node killed or still running); ignored")
    return files


def _check_one_run(directory: str, files: List[TraceFile]) -> None:
    """Raises TraceFormatError when `files` cannot be one run of one cluster."""
    writers: Dict[Tuple[str, int], Dict[Tuple[str, int], List[str]]] = {}
    for f in files:
        writers.setdefault((f.role, f.rank), {}).setdefault((f.host, f.pid), []).append(
            os.path.basename(f.path))
    for (role, rank), by in sorted(writers.items()):
        if len(by) > 1:
            which = "; ".join(f"pid {pid} on {host}: {', '.join(names[:3])}"
                              f"{' ...' if len(names) > 3 else ''}"
                              for (host, pid), names in sorted(by.items()))
            raise TraceFormatError(
                f"{directory!r} mixes runs: {role} {rank} was written by {len(by)} processes "
                f"({which}); give each run its own MESHPOST_TRACE_DIR, or move the other "
                f"run's files out")
    sizes = {(f.num_workers, f.num_servers) for f in files}
    if len(sizes) > 1:
        desc = ", ".join(f"{w} workers x {s} servers" for w, s in sorted(sizes))
        raise TraceFormatError(f"{directory!r} mixes runs of different clusters ({desc}); "
                               f"give each run its own MESHPOST_TRACE_DIR")


def best_clock(files: List[TraceFile]) -> Optional[ClockEstimate]:
    """The estimate with the smallest error bound among a node's files."""
    clocks = [c for f in files for c in f.clocks]
    return min(clocks, key=lambda c: c.error_ns) if clocks else None


def group_by_node(files: List[TraceFile]) -> Dict[Tuple[str, int], List[TraceFile]]:
    out: Dict[Tuple[str, int], List[TraceFile]] = {}
    for f in files:
        out.setdefault((f.role, f.rank), []).append(f)
    return out
