"""Data parallelism, stated in one place: a 1-D mesh over devices, batches split on 'data', the rest replicated.
How many devices a CPU becomes is `backend.use_every_cpu_core`'s business; joining a multi-process run,
`cluster.py`'s."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax.config import UserError


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
    if jax.process_count() > 1:  # every process's devices take part, or some process would have nothing to run
        if num_devices not in (None, len(devices)):
            raise UserError(f"--devices must be left out of a {jax.process_count()}-process run (it uses all "
                            f"{len(devices)} devices of its processes), got {num_devices}")
        num_devices = len(devices)
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


def place_replicated(tree: Any, mesh: Mesh) -> Any:
    """`tree` with a full copy on every device of the mesh. Through host memory: each process then places its own
    devices' copies, where a device-to-device put onto another process's devices would need cross-host transfers
    that XLA:CPU does not offer. Every process must hold the same values (a run's state does: one seed)."""
    return jax.device_put(jax.device_get(tree), replicated(mesh))


def check_divisible(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    if batch_size % mesh.size:
        raise UserError(f"{flag} {batch_size} must be divisible by the number of devices ({mesh.size})")
