"""The device mesh and the moves between one host's numpy arrays and global, sharded arrays.

Data parallelism uses one 1-D mesh axis, ``data``, over every device of every host.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with a ``data`` axis over all devices of all hosts (or the given ones)."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of a value every device holds whole (the train state)."""
  return NamedSharding(mesh, P())


def steps_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of train batches [steps_per_call, B, ...]: split on B."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def shard_steps(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """This process's [k, B_local, ...] train batches -> the global [k, B, ...] array, split on B."""
  return jax.make_array_from_process_local_data(steps_sharding(mesh), local)


def shard_rows(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split on their leading axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {
    name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for name, value in local.items()
  }


def gather(x: jax.Array) -> np.ndarray:
  """A global array, whole, as numpy on every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, read from this host's first copy."""
  return np.asarray(x.addressable_data(0))


def abstract_rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding of a global array split on its leading axis (``shard_rows``)."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(DATA_AXIS)))


def abstract_replicated(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """Shape, dtype and sharding of a value every device holds whole."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated(mesh))
