"""Joining a multi-process run (JAX's multi-controller runtime, `jax.distributed`): the cluster's settings checked
before anything waits on them, every wait bounded, and a peer's death turned into one line and an exit.

Every process of a run starts the same command. JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the cluster explicitly; under SLURM or Open MPI,
`jax.distributed.initialize()` reads them from the scheduler. The bounds (docs/multihost.md):

- joining: every process must have joined within MNIST_JAX_JOIN_TIMEOUT seconds, else a one-line error (exit 2);
- a dead peer: a process that shows no sign of life for MNIST_JAX_HEARTBEAT_TIMEOUT seconds (`PeerWatch`) makes
  each survivor print one line and exit with `PEER_DIED_EXIT`, where JAX would abort with a native stack trace;
  the coordinator's death aborts the others inside JAX's runtime at once, and `stderr_guard` turns that abort's
  report into the same line;
- the end: a finished process waits at most `SHUTDOWN_TIMEOUT` seconds for the others at JAX's exit barrier.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping

from mnist_jax.config import UserError

JOIN_TIMEOUT_VARIABLE = "MNIST_JAX_JOIN_TIMEOUT"
HEARTBEAT_TIMEOUT_VARIABLE = "MNIST_JAX_HEARTBEAT_TIMEOUT"
# Long enough for hosts that a scheduler starts a minute apart; a job that waits longer is misconfigured.
DEFAULT_JOIN_TIMEOUT = 120
# Signs of life come from a thread of their own (`PeerWatch`), so compiling, checkpointing or a slow step never
# delays them; a process silent this long is gone, and a survivor should not hold its machine much longer.
DEFAULT_HEARTBEAT_TIMEOUT = 30
# JAX's own join and heartbeat timeouts are ours plus this, so its native abort never comes first.
JAX_TIMEOUT_MARGIN = 60
# The processes of a run finish their last epoch in lockstep; process 0 then writes plots before it exits.
SHUTDOWN_TIMEOUT = 60
PEER_DIED_EXIT = 75  # EX_TEMPFAIL: the run can be resumed by starting every process again


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How this process joins a run: explicitly (a coordinator address) or from a scheduler (None fields)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    join_timeout: int
    heartbeat_timeout: int


def _integer(environ: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise UserError(f"{name}={text!r} must be an integer of at least {minimum}")
    return value


def _scheduled(environ: Mapping[str, str]) -> bool:
    """Whether SLURM or Open MPI started several tasks, which `jax.distributed.initialize()` detects itself."""
    try:
        return int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def cluster_settings(environ: Mapping[str, str]) -> ClusterSettings | None:
    """The run this environment describes, or None for a single process; a UserError for settings that could
    only hang or crash (a process count without a coordinator, an id out of range, a malformed address)."""
    join_timeout = _integer(environ, JOIN_TIMEOUT_VARIABLE, DEFAULT_JOIN_TIMEOUT, 1)
    heartbeat_timeout = _integer(environ, HEARTBEAT_TIMEOUT_VARIABLE, DEFAULT_HEARTBEAT_TIMEOUT, 2)
    address = environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = _integer(environ, "JAX_NUM_PROCESSES", None, 1)
    process_id = _integer(environ, "JAX_PROCESS_ID", None, 0)
    if address is None:
        if _scheduled(environ):
            return ClusterSettings(None, None, None, join_timeout, heartbeat_timeout)
        if (num_processes or 1) > 1 or process_id:
            raise UserError("JAX_NUM_PROCESSES/JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS is not: set it to "
                            "host:port of process 0, the same on every process")
        return None
    host, colon, port = address.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port (process 0's host, a free port)")
    num_processes = 1 if num_processes is None else num_processes
    process_id = 0 if process_id is None else process_id
    if process_id >= num_processes:
        raise UserError(f"JAX_PROCESS_ID={process_id} is out of range: JAX_NUM_PROCESSES={num_processes} allows "
                        f"0 to {num_processes - 1}")
    return ClusterSettings(address, num_processes, process_id, join_timeout, heartbeat_timeout)


def peer_died_message(num_processes: int, reason: str) -> str:
    """The one line a survivor prints: what happened and how to go on."""
    return (f"error: a peer process of this {num_processes}-process run died or stopped answering ({reason}); "
            f"start all {num_processes} processes again with the same command to resume from the last checkpoint")


def exit_for_dead_peer(num_processes: int, reason: str) -> None:
    """Prints `peer_died_message` and ends the process at once. Not `sys.exit`: it may run on a thread of its own,
    and an orderly exit would wait at JAX's shutdown barrier for the dead peer."""
    print(peer_died_message(num_processes, reason), file=sys.stderr, flush=True)
    os._exit(PEER_DIED_EXIT)


class PeerWatch(threading.Thread):
    """Every process's sign of life, in the coordination service's key-value store: each process counts up its own
    key every `interval` seconds; process 0 watches the others' and they watch process 0's. A peer whose count stays
    still for `timeout` seconds, or a coordinator that no longer answers, calls `on_death(reason)`.

    Why not JAX's own heartbeats: when they stop, JAX's coordination service aborts every survivor natively, and
    the callback its client takes instead cannot be a Python function (the binding fails to pass it the status). JAX's heartbeat timeout is therefore set beyond
    this one (`join`), so this watch always speaks first. Counts, not clocks: hosts' clocks need not agree.
    """

    PREFIX = "mnist_jax/alive/"
    DONE = "done"  # a process that finished its work, now waiting at JAX's exit barrier: not dead

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float,
                 on_death: Callable[[str], None], interval: float = 1.0) -> None:
        super().__init__(name="mnist_jax-peer-watch", daemon=True)
        self._client, self._id, self._count = client, process_id, num_processes
        self._timeout, self._on_death, self.interval = timeout, on_death, interval
        self._stopped = threading.Event()

    def run(self) -> None:
        # Process 0 watches every other process; they watch process 0, which ends when any of them dies: each
        # death is seen everywhere, for a load on the coordinator that grows with the process count, not its square.
        peers = [p for p in range(self._count) if p != self._id] if self._id == 0 else [0]
        seen: dict[int, tuple[str | None, float]] = {p: (None, time.monotonic()) for p in peers}
        beat = 0
        while not self._stopped.is_set():
            beat += 1
            try:
                self._client.key_value_set(f"{self.PREFIX}{self._id}", str(beat), allow_overwrite=True)
                values = {p: self._value(p) for p in peers}
            except Exception as error:  # noqa: BLE001 -- any failure to reach the coordinator
                if not self._stopped.is_set():
                    self._on_death(f"the coordinator, process 0, does not answer: {_first_line(error)}")
                return
            now = time.monotonic()
            for peer, value in values.items():
                if value != seen[peer][0] or value == self.DONE:
                    seen[peer] = (value, now)
                elif now - seen[peer][1] > self._timeout and not self._stopped.is_set():
                    self._on_death(f"process {peer} sent no sign of life for {self._timeout:g} s")
                    return
            self._stopped.wait(self.interval)

    def _value(self, peer: int) -> str | None:
        try:
            return self._client.key_value_try_get(f"{self.PREFIX}{peer}")
        except Exception as error:  # noqa: BLE001 -- a peer that has not written yet reads as NOT_FOUND
            if "NOT_FOUND" in str(error):
                return None
            raise

    def stop(self) -> None:
        """Ends the watch and tells the peers this process is done, before JAX's exit barrier."""
        self._stopped.set()
        try:
            self._client.key_value_set(f"{self.PREFIX}{self._id}", self.DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 -- the coordinator already gone: the peers are past the barrier
            pass


def _exit_with_user_error(message: str) -> None:
    """`cli.run_cli`'s contract (one line, exit 2) from a thread that cannot raise into the main one."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def join(settings: ClusterSettings) -> PeerWatch:
    """`jax.distributed.initialize` with `settings`' bounds, and the started `PeerWatch` of this process (stopped
    at exit, before JAX's exit barrier); a UserError when the run is not complete within the join timeout."""
    import jax
    from jax._src import distributed

    where = settings.coordinator_address or "the scheduler's coordinator"
    failed = (f"could not join the run at {where} within {settings.join_timeout} s; check JAX_COORDINATOR_ADDRESS "
              f"and that all {settings.num_processes or 'the'} processes are started, with distinct JAX_PROCESS_ID "
              f"({JOIN_TIMEOUT_VARIABLE} sets the wait)")
    # A join that times out inside JAX aborts the process natively, so this process's own deadline comes first
    # (JAX's is set later): one line, exit 2. A thread, since the waiting call does not return until then.
    deadline = threading.Timer(settings.join_timeout, _exit_with_user_error, (failed,))
    deadline.daemon = True
    deadline.start()
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
            process_id=settings.process_id, initialization_timeout=settings.join_timeout + JAX_TIMEOUT_MARGIN,
            heartbeat_timeout_seconds=settings.heartbeat_timeout + JAX_TIMEOUT_MARGIN,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
    except Exception as error:  # noqa: BLE001 -- JAX raises its runtime's error type; any failure to join is one
        distributed.global_state.client = distributed.global_state.service = None  # nothing to shut down at exit
        raise UserError(f"{failed} ({_first_line(error)})") from None
    finally:
        deadline.cancel()
    count = jax.process_count()
    _guard_stderr(count)
    watch = PeerWatch(distributed.global_state.client, jax.process_index(), count, settings.heartbeat_timeout,
                      lambda reason: exit_for_dead_peer(count, reason))
    watch.start()
    atexit.register(watch.stop)  # registered after JAX's shutdown hook, so it runs before it
    sys.excepthook = _after_uncaught_error(sys.excepthook, settings.heartbeat_timeout + 2 * watch.interval)
    return watch


def _guard_stderr(num_processes: int) -> None:
    """Points this process's stderr through `python -m mnist_jax.distributed.stderr_guard`, which turns the native abort on a
    lost coordinator into the one-line message."""
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-m", "mnist_jax.distributed.stderr_guard", str(num_processes)], stdin=read)
    os.close(read)
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)


def _after_uncaught_error(report: Callable[..., None], verdict_seconds: float) -> Callable[..., None]:
    """What a process of a multi-process run does with an error nothing caught. A dead peer is the usual cause
    (the collective it was part of fails at once, before the watch can tell): give the watch time to say so, which
    ends the process with the one line. Otherwise the error is this process's own: report it and exit at once,
    without an orderly shutdown that would wait at JAX's exit barrier for peers stuck in a collective; they see
    this process die and end too."""

    def hook(kind: type[BaseException], error: BaseException, traceback: Any) -> None:
        if isinstance(error, Exception):
            time.sleep(verdict_seconds)
        report(kind, error, traceback)
        sys.stderr.flush()
        os._exit(1)

    return hook


def from_primary(key: str, outcome: Callable[[], str], timeout: float = 600) -> str:
    """`outcome()` computed by process 0 and returned on every process, through the coordination service's
    key-value store under `key` (one key per question)."""
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if jax.process_index() == 0:
        value = outcome()
        client.key_value_set(key, value, allow_overwrite=True)
        return value
    return client.blocking_key_value_get(key, int(timeout * 1000))


def join_if_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process run the environment describes; returns whether it did."""
    settings = cluster_settings(os.environ if environ is None else environ)
    if settings is None:
        return False
    join(settings)
    return True
