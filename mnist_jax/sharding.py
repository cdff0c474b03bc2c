"""Data parallelism, stated in one place: a 1-D mesh over devices, batches split on 'data', the rest replicated;
and joining a multi-host run. How many devices a CPU becomes is `backend.use_every_cpu_core`'s business."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax.config import UserError


def initialize_distributed() -> bool:
    """Joins a multi-host run when the environment describes one; returns whether it did.

    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the cluster
    explicitly; under SLURM or Open MPI, jax.distributed.initialize() reads them from the scheduler. After this,
    jax.devices() spans every host and the mesh below covers them all.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    scheduled = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not (explicit or scheduled):
        return False
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
        )
    else:
        jax.distributed.initialize()
    return True


def is_primary_process() -> bool:
    """Only process 0 writes the workdir's files (Orbax coordinates checkpoints across processes itself)."""
    return jax.process_index() == 0


def default_device_count(*batch_sizes: int) -> int:
    """Every device JAX sees, or the most that divide every batch size evenly (6 cores, batch 128: 4)."""
    count = jax.device_count()
    while any(size % count for size in batch_sizes):
        count -= 1
    return count


def make_mesh(num_devices: int | None, *batch_sizes: int) -> Mesh:
    """A mesh over the first `num_devices` devices (None: as many as `default_device_count` allows)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = default_device_count(*batch_sizes)
    if not 1 <= num_devices <= len(devices):
        raise UserError(f"--devices must be between 1 and {len(devices)} (the devices JAX sees), got {num_devices}")
    return Mesh(np.array(devices[:num_devices]), axis_names=("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """Parameters, optimiser state and the datasets: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Batches: split along their leading (example) axis across the mesh's 'data' axis."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_divisible(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    if batch_size % mesh.size:
        raise UserError(f"{flag} {batch_size} must be divisible by the number of devices ({mesh.size})")
