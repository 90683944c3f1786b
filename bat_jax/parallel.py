"""Where per-device functions become device-parallel programs: pmap or shard_map.

The train and eval steps are written once, per device, with collectives over
the axis ``AXIS`` (``lax.pmean``/``lax.psum``/``lax.axis_index``). A
:class:`Parallel` object turns them into one compiled program and moves state
and batches to and from the devices; swapping ``pmap`` for
``jax.jit(jax.shard_map(...))`` is the ``config.parallel`` field.

Batches arrive from the input pipeline as host-local NumPy arrays shaped
``[local_devices, per_device_batch, ...]``.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bat_jax import errors

AXIS = "batch"


def _mesh(devices) -> Mesh:
  return Mesh(np.array(devices), (AXIS,))


def _first_shard(a):
  """The slice of a device-axis array held by the first local device."""
  if not isinstance(a, jax.Array) or len(a.addressable_shards) == 1:
    return np.asarray(a)[0]
  return np.asarray(a.addressable_shards[0].data)[0]


class Pmap:
  """``jax.pmap`` over the local devices; state carries a leading device axis."""

  def __init__(self, devices=None):
    # By default pmap spans every device of every host (collectives cross
    # hosts); each host passes arrays for its local devices only.
    self._pmap_devices = None if devices is None else list(devices)
    self.devices = list(devices or jax.local_devices())
    self.split = NamedSharding(_mesh(self.devices), P(AXIS))

  def compile(self, step_fn: Callable, donate_state: bool = False) -> Callable:
    return jax.pmap(step_fn, axis_name=AXIS, devices=self._pmap_devices,
                    donate_argnums=(0,) if donate_state else ())

  def put_state(self, tree: Any) -> Any:
    n = len(self.devices)
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(np.stack([np.asarray(a)] * n), self.split), tree)

  def get_state(self, tree: Any) -> Any:
    """The first replica, on the host."""
    return jax.tree_util.tree_map(_first_shard, tree)

  def put_batch(self, batch: Any) -> Any:
    return jax.device_put(batch, self.split)

  def get_output(self, tree: Any) -> Any:
    """Outputs that are identical on every device (pmean-ed metrics)."""
    return jax.tree_util.tree_map(_first_shard, tree)


class ShardMap:
  """``jax.jit(jax.shard_map(...))`` over a 1-D mesh of this host's devices.

  State is replicated over the mesh; the batch is split along its first axis.
  Single-host only (multi-host runs use pmap). Callers must await each step
  (``block_until_ready``) on CPU: loops of collective programs can otherwise
  abort in XLA's CPU rendezvous.
  """

  def __init__(self, devices=None):
    self.devices = list(devices or jax.local_devices())
    self.mesh = _mesh(self.devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.split = NamedSharding(self.mesh, P(AXIS))

  def compile(self, step_fn: Callable, donate_state: bool = False) -> Callable:
    def per_device(state, batch):
      batch = jax.tree_util.tree_map(lambda a: a[0], batch)  # drop the [1] axis
      out = step_fn(state, batch)
      return out

    mapped = jax.shard_map(per_device, mesh=self.mesh,
                           in_specs=(P(), P(AXIS)), out_specs=P(),
                           check_vma=False)
    return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())

  def put_state(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)

  def get_state(self, tree: Any) -> Any:
    return jax.device_get(tree)

  def put_batch(self, batch: Any) -> Any:
    return jax.device_put(batch, self.split)

  def get_output(self, tree: Any) -> Any:
    return tree


def make(kind: str):
  """The parallel wrapper named by ``config.parallel``."""
  if kind == "pmap":
    return Pmap()
  if kind == "shard_map":
    if jax.process_count() > 1:
      raise errors.UserError("config.parallel='shard_map' is single-host only here; "
                             "use --config.parallel=pmap for multi-host runs.")
    return ShardMap()
  errors.choose("config.parallel", kind, ("pmap", "shard_map"))
