"""One training run per workdir: an exclusive OS lock (`flock`) on DIR/run.lock, held for as long as the run lives.

The kernel releases the lock when its process ends, however it ends (`kill -9` included), so a crash never leaves a
stale lock to clean up by hand. While held, the file names its holder (pid and host) for the message a second run
prints; a run that ends cleanly empties it again, so finishing or resuming a run leaves the workdir's bytes as they
were. In a multi-process run process 0 holds the one lock and tells the others whether it got it. The reading
tools (evaluate, predict, serve, export) never take it. docs/multihost.md says what holds on shared filesystems.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from typing import Iterator

from mnist_jax.config import UserError

LOCK_FILE = "run.lock"


def _holder(fd: int) -> str:
    """'pid N on HOST' from the lock file; the holder writes it just after locking, so wait a moment for it."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if text:
            pid, _, host = text.partition(" ")
            return f"pid {pid} on {host}"
        time.sleep(0.05)
    return "a process that has not said which"


def _busy(workdir: str, fd: int) -> UserError:
    return UserError(f"{workdir} is in use by another training run ({_holder(fd)}); wait for it to end or stop it, "
                     "or use another --workdir")


def check_free(workdir: str) -> None:
    """Fails at once, before any work, when a live process holds the workdir's lock; creates and changes nothing."""
    try:
        fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no workdir or no lock file yet: nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(workdir, fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock (creating the workdir) for the body; a UserError naming the holder when a live
    process has it."""
    os.makedirs(workdir, exist_ok=True)
    # O_CLOEXEC: a program this process executes must not inherit, and so keep, the lock.
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(workdir, fd) from None
        except OSError as error:  # a filesystem without flock (Lustre mounted without -o flock, some FUSE ones)
            raise UserError(f"cannot lock {os.path.join(workdir, LOCK_FILE)} ({error.strerror}): put --workdir on "
                            "a filesystem that supports flock (docs/multihost.md)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
    """`exclusive`, for a run of any number of processes: process 0 takes the lock, and every process fails with
    its message when it could not."""
    import jax

    if jax.process_count() == 1:
        with exclusive(workdir):
            yield
        return
    from mnist_jax.distributed import cluster

    with contextlib.ExitStack() as stack:
        def take() -> str:
            try:
                stack.enter_context(exclusive(workdir))
            except UserError as error:
                return str(error)
            return ""

        refusal = cluster.from_primary(take)
        if refusal:
            raise UserError(refusal)
        yield
