"""`python -m mnist_jax.distributed.stderr_guard N`: the stderr of one process of an N-process run, passed through unchanged
except for the native abort JAX's runtime ends a process with when it loses the coordinator (process 0): that
abort's log lines and stack trace become the one line of `cluster.peer_died_message`.

`cluster.join` starts it and points the process's stderr at it. Needed because this abort comes from a thread of
JAX's runtime the moment the coordinator's connection drops: nothing in the process can intercept it, and the
process's exit status stays the abort's (SIGABRT). Every other failure of a peer is caught in the process itself
(`cluster.PeerWatch`).
"""

from __future__ import annotations

import re
import select
import signal
import sys

from mnist_jax.distributed.cluster import peer_died_message

FATAL_MARKER = b"Terminating process because the JAX distributed service detected fatal errors"
# absl's log lines (E1207 01:02:03.456 ...): held back for a moment, since the fatal line follows such error lines.
NATIVE_LOG = re.compile(rb"^[EWF]\d{4} \d\d:\d\d:\d\d")
HOLD_SECONDS = 2.0


def guard(source, sink, num_processes: int) -> None:
    """Copies `source` to `sink` (binary streams) line by line until EOF, replacing the abort."""
    held: list[bytes] = []
    fd = source.fileno()
    while True:
        if held and not select.select([fd], [], [], HOLD_SECONDS)[0]:
            sink.writelines(held)  # no abort followed: the native lines were only that
            sink.flush()
            held = []
            continue
        line = source.readline()
        if not line:
            break
        if FATAL_MARKER in line:
            sink.write(peer_died_message(num_processes, "the coordinator, process 0, is gone").encode() + b"\n")
            sink.flush()
            for _ in iter(source.readline, b""):  # the stack trace, until the process is gone
                pass
            return
        if held or NATIVE_LOG.match(line):
            held.append(line)
            continue
        sink.write(line)
        sink.flush()
    sink.writelines(held)
    sink.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # Ctrl-C or a scheduler's SIGTERM reaches the whole process group: this guard outlives its process, and ends
    # when the process's end closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) as source:  # unbuffered: `select` sees all
        guard(source, sys.stderr.buffer, int(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
