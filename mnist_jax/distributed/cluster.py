"""Joining a multi-process run (JAX's multi-controller runtime, `jax.distributed`): the cluster's settings checked
before anything waits on them, then `jax.distributed.initialize` with the run's bounds, which JAX enforces itself.

Every process of a run starts the same command. JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the cluster explicitly; under SLURM or Open MPI,
`jax.distributed.initialize()` reads them from the scheduler. The bounds, passed to JAX as its own timeouts
(docs/multihost.md says what a user sees when one runs out):

- joining: every process must have joined within MNIST_JAX_JOIN_TIMEOUT seconds (`initialization_timeout`);
- a dead peer: a process that sends JAX's coordination service no heartbeat for MNIST_JAX_HEARTBEAT_TIMEOUT
  seconds (`heartbeat_timeout_seconds`) is dead, and JAX ends every other process of the run;
- the end: a finished process waits at most `SHUTDOWN_TIMEOUT` seconds for the others at JAX's exit barrier
  (`shutdown_timeout_seconds`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from mnist_jax.config import UserError

JOIN_TIMEOUT_VARIABLE = "MNIST_JAX_JOIN_TIMEOUT"
HEARTBEAT_TIMEOUT_VARIABLE = "MNIST_JAX_HEARTBEAT_TIMEOUT"
# Long enough for hosts that a scheduler starts a minute apart; a job that waits longer is misconfigured.
DEFAULT_JOIN_TIMEOUT = 120
# JAX sends heartbeats from a thread of its runtime, so compiling, checkpointing or a slow step never delays them;
# a process silent this long is gone, and the survivors should not hold their machines much longer.
DEFAULT_HEARTBEAT_TIMEOUT = 30
# The processes of a run finish their last epoch in lockstep; process 0 then writes plots before it exits.
SHUTDOWN_TIMEOUT = 60


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


def joining_message(settings: ClusterSettings) -> str:
    """The line a process prints before it waits to join: what it waits for and for how long. When the wait runs
    out, JAX ends the process with its own report (docs/multihost.md), and this line says which wait that was."""
    where = settings.coordinator_address or "the scheduler's coordinator"
    who = ("" if settings.process_id is None else
           f" as process {settings.process_id} of {settings.num_processes}")
    return (f"joining the run at {where}{who}: every process must start within {settings.join_timeout} s "
            f"({JOIN_TIMEOUT_VARIABLE})")


def join(settings: ClusterSettings) -> None:
    """`jax.distributed.initialize` with `settings`' bounds as JAX's own timeouts; a UserError where JAX refuses
    the settings before it connects (in practice a scheduler's environment it cannot read: ours are checked)."""
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
            process_id=settings.process_id, initialization_timeout=settings.join_timeout,
            heartbeat_timeout_seconds=settings.heartbeat_timeout, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT)
    except (ValueError, TypeError) as error:  # JAX's checks of the cluster's description, before any connection
        raise UserError(f"cannot join a multi-process run: {error} (start the processes with srun or mpirun, or "
                        "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None


def from_primary(outcome: Callable[[], str]) -> str:
    """`outcome()`, computed by process 0 alone, on every process: a collective, so every process of the run calls
    it at the same point. Sent as bytes through `multihost_utils.broadcast_one_to_all`, its length first, since
    every process must pass an array of the same shape."""
    import jax
    from jax.experimental import multihost_utils

    primary = jax.process_index() == 0
    sent = outcome().encode() if primary else b""
    length = int(multihost_utils.broadcast_one_to_all(np.int32(len(sent))))
    if length == 0:
        return ""
    buffer = np.frombuffer(sent, np.uint8) if primary else np.zeros(length, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8).tobytes().decode()
