"""For the launcher test: worker 1 crashes (no clean leave, so it is the first process to
exit); the others block until the launcher stops them or they notice the dead peer."""
import os

import meshpost
from common import rank, role

if role() == "worker":
    w = meshpost.Worker()
    print("worker ready", flush=True)
    if rank() == 1:
        os._exit(3)
    w.barrier(servers=False, workers=True)  # never released: worker 1 is gone
elif role() == "server":
    s = meshpost.Server()
    s.get_batch()
