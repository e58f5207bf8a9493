"""Device mesh (axes data, fsdp, tensor) and the logical-axis rules that place parameters on it.

Parameters carry logical names (models.params.param_info); `RULES` maps each name to mesh axes.
A dimension that a mesh axis does not divide evenly is replicated instead (e.g. SmolLM2's 3 kv
heads on tensor=2), so every named config runs on every mesh.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "length": None,
    "layers": None,  # The stacked-layers axis of scanned parameters: every device holds all.
}


def make_mesh(shape: Sequence[int] = (1, 1, 1), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh. One entry may be -1: it takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {shape}: expected 3 sizes (data, fsdp, tensor)")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one size may be -1")
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if len(devices) % rest:
      raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"mesh shape {tuple(shape)} (data, fsdp, tensor) needs {math.prod(shape)} devices, "
        f"but {len(devices)} are available")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_size(mesh: Mesh, axis) -> int:
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  spec, used = [], set()
  for name, size in zip(axes, shape):
    mesh_axis = rules.get(name) if name is not None else None
    flat = () if mesh_axis is None else (
        mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,))
    # Skip mesh axes already used by an earlier dimension and those of size 1.
    flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
    if not flat or size % _mesh_size(mesh, flat):
      spec.append(None)
      continue
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  return P(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Mapping[str, Any] = RULES):
  """NamedSharding for every leaf. `shapes_tree` holds arrays, ShapeDtypeStructs or shapes."""
  axes_leaves, treedef = jax.tree.flatten(axes_tree, is_leaf=_is_axes)
  shape_leaves = treedef.flatten_up_to(shapes_tree)
  out = []
  for axes, x in zip(axes_leaves, shape_leaves):
    shape = x if isinstance(x, tuple) else x.shape
    out.append(NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules)))
  return jax.tree.unflatten(treedef, out)


def shard_tree(tree, axes_tree, mesh: Mesh, rules: Mapping[str, Any] = RULES):
  """Places `tree` on `mesh` according to its logical axes."""
  return jax.device_put(tree, tree_shardings(axes_tree, tree, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] = RULES) -> NamedSharding:
  """Sharding of a [batch, ...] array: batch over (data, fsdp), the rest replicated."""
  batch_axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
  first = None if not batch_axes else (batch_axes[0] if len(batch_axes) == 1 else batch_axes)
  return NamedSharding(mesh, P(first, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Logical axis -> mesh axes for activations: rows over (data, fsdp), heads and the MLP's hidden
# units over tensor; d_model, the sequence and the head dimension whole.
ACTIVATION_RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def constrain(x, mesh: Mesh | None, axes: Sequence[str | None]):
  """`jax.lax.with_sharding_constraint` of activation `x` whose dimensions have logical names
  `axes` (ACTIVATION_RULES; a dimension a mesh axis does not divide stays whole). No-op without
  a mesh or on a one-device mesh."""
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(axes, x.shape, mesh, ACTIVATION_RULES)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
