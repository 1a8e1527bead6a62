"""Helpers shared by the test programs (run as separate processes by the tests)."""

import ctypes
import os
import sys


def role() -> str:
    return os.environ["DMLC_ROLE"]


def rank() -> int:
    return int(os.environ.get("DMLC_NODE_RANK", "0"))


def name() -> str:
    return f"{role()}:{rank()}"


def passed() -> None:
    print(f"PASS {name()}", flush=True)


def rss_bytes() -> int:
    # Return freed heap pages to the OS first: freed-but-cached malloc memory (fragmented by
    # allocations and frees on different threads) is allocator noise, not a leak, and left
    # in place it made the soak's RSS reading swing between 0 and 80 MB run to run.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
