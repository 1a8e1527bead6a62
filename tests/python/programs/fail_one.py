"""For the launcher test: worker 1 fails; the server blocks in get_batch until stopped."""
import sys

import meshpost
from common import rank, role

if role() == "worker":
    w = meshpost.Worker()
    print("worker ready", flush=True)
    if rank() == 1:
        sys.exit(3)
    w.barrier(servers=False, workers=True)  # never released: worker 1 is gone
elif role() == "server":
    s = meshpost.Server()
    s.get_batch()
