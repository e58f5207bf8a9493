"""Row-split global arrays across processes: which rows of a global batch this process holds,
global arrays built from each process's rows, and results read back as this process's rows or as
the whole array.

A batch of R rows is split over the mesh's batch axes (data, fsdp) when they divide R, and
replicated otherwise. With one process every function is a plain device_put or device_get.
A leaf module: the rollout (chunks, compaction) and the run system both use it.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import sharding as shd

log = logging.getLogger("brpo")
_warned: set = set()


def batch_ways(mesh: Mesh) -> int:
  """How many ways a batch's rows split over `mesh` (its data x fsdp size)."""
  s = shd.batch_sharding(mesh, 1)
  return shd._mesh_size(mesh, s.spec[0]) if s.spec and s.spec[0] else 1


def row_sharding(mesh: Mesh, n_rows: int, ndim: int) -> NamedSharding:
  """Sharding of an [n_rows, ...] array of `ndim` dimensions: rows over (data, fsdp) when that
  divides n_rows, else replicated, with a one-line warning (once per row count and mesh): every
  device then holds, and computes on, every row."""
  s = shd.batch_sharding(mesh, ndim)
  ways = batch_ways(mesh)
  if n_rows % ways == 0:
    return s
  if (n_rows, ways) not in _warned:
    _warned.add((n_rows, ways))
    log.warning("%d rows do not divide over data x fsdp = %d devices: replicated (every device "
                "computes every row); change the batch sizes or --mesh", n_rows, ways)
  return NamedSharding(mesh, PartitionSpec())


def process_rows(sharding: NamedSharding, n_rows: int) -> slice:
  """The rows [lo, hi) of an [n_rows, ...] array with `sharding` that this process's devices
  hold. Raises ValueError when they are not one contiguous block (a mesh whose batch axes
  interleave processes)."""
  shape = (n_rows,) + (1,) * (len(sharding.spec) - 1 if sharding.spec else 0)
  spans = sorted({(i[0].start or 0, n_rows if i[0].stop is None else i[0].stop)
                  for i in sharding.addressable_devices_indices_map(shape).values()})
  lo, hi = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  if covered != hi - lo or any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
    raise ValueError(f"process {jax.process_index()} holds rows {spans} of a batch of {n_rows}: "
                     "not one contiguous block; order the mesh devices by process")
  return slice(lo, hi)


def put_rows(local: np.ndarray, sharding: NamedSharding, n_rows: int) -> jax.Array:
  """The global [n_rows, ...] array whose rows `process_rows(sharding, n_rows)` are `local`."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                (n_rows,) + np.shape(local)[1:])


def _rows_sharding_of(x: jax.Array) -> NamedSharding:
  return row_sharding(x.sharding.mesh, x.shape[0], x.ndim)


def local_slice(x: jax.Array) -> slice:
  """The rows of global array `x` that `local_rows(x)` returns."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return slice(0, x.shape[0])
  return process_rows(_rows_sharding_of(x), x.shape[0])


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of `x` (all rows with one process), as numpy.

  `x` may be laid out in any way over a NamedSharding mesh: it is first resharded (a no-op when
  already so) to rows over the batch axes, so that this process holds whole rows.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  x = jax.device_put(x, _rows_sharding_of(x))
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def fetch(tree: Any) -> Any:
  """The whole value of every array in `tree`, as numpy, on every process."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def gather_rows(local: np.ndarray, like: jax.Array) -> np.ndarray:
  """All rows on every process, from each process's `local` rows of an array laid out as `like`
  (e.g. rewards graded per process for the rows of a rollout). One process: `local` itself."""
  if like.is_fully_addressable:
    return np.asarray(local)
  n = like.shape[0]
  return fetch(put_rows(local, row_sharding(like.sharding.mesh, n, np.ndim(local)), n))
