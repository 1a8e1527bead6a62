"""Prints LINES lines to stdout and to stderr, each line in several separate write()
calls (a partial line sits in the pipe while 16 siblings write theirs), so the launcher
must reassemble and prefix whole lines. Needs no cluster: every role just prints."""
import os
import sys

if os.environ.get("MESHPOST_PORT_FD"):
    # Run as the scheduler: report a port as a real scheduler would, so the launcher
    # starts the others (nobody connects to it).
    fd = int(os.environ["MESHPOST_PORT_FD"])
    os.write(fd, b"1\n")
    os.close(fd)
LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 200
role = os.environ["DMLC_ROLE"]
name = role if role == "scheduler" else f"{role}:{os.environ['DMLC_NODE_RANK']}"
for i in range(LINES):
    for fd, stream in ((1, "out"), (2, "err")):
        line = f"{name} {stream} {i} {'x' * (i * 37 % 300)} end\n".encode()
        # Three pieces per line, cut at different places on every line.
        a, b = (i * 7) % len(line), (i * 13) % len(line)
        cuts = sorted({0, a, b, len(line)})
        for lo, hi in zip(cuts, cuts[1:]):
            os.write(fd, line[lo:hi])
# A last line without a newline: still forwarded whole, as its own line.
os.write(1, f"{name} out tail end".encode())
