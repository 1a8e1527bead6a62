"""Helpers shared by the test programs (run as separate processes by the tests)."""

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
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
