"""Data parallelism, stated in one place: a 1-D mesh over devices, batches split on 'data', the rest replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax.config import UserError


def make_mesh(num_devices: int | None) -> Mesh:
    """A mesh over the first `num_devices` devices (None: every device JAX sees, across hosts)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
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
