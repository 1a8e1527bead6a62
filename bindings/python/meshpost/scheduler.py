"""``python -m meshpost.scheduler``: a scheduler-only process (used by meshpost.launch).

Reads its configuration from the DMLC_* / MESHPOST_* variables, waits until every
worker and server registered, then until they all left (or died).
"""

from __future__ import annotations

import sys


def main() -> int:
    from . import Scheduler

    scheduler = Scheduler()
    scheduler.wait_for_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
