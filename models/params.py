"""The parameter table: each decoder weight described once (shape, logical axes, init, dtype).

`init_params`, `param_shapes`, `param_axes`, `abstract_params` and `param_shardings` all read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from models import sharding as shd
from models.config import ModelConfig

Params = dict[str, Any]
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """N(0, 0.02) drawn in float32, then cast (so every storage dtype rounds the same draw)."""
  return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def ones(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  del key  # Still drawn by init_params, so every leaf's key is the same whatever its init.
  return jnp.ones(shape, dtype)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  del key
  return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
  """One weight: its shape, a logical axis name per dimension (models.sharding.RULES), how it
  starts, and its storage dtype. A leaf of the `param_info` tree (not itself a pytree)."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: Initializer
  dtype: Any

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"shape {self.shape} and logical axes {self.axes} differ in rank")

  def stacked(self, n: int) -> "ArrayInfo":
    """The same weight for n layers on a leading, replicated 'layers' axis."""
    return dataclasses.replace(self, shape=(n, *self.shape), axes=("layers", *self.axes))


def _is_info(x) -> bool:
  return isinstance(x, ArrayInfo)


def _layer_info(cfg: ModelConfig) -> dict[str, ArrayInfo]:
  d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
  dt = jnp.dtype(cfg.param_dtype)
  mat = lambda shape, axes: ArrayInfo(shape, axes, normal, dt)
  norm = ArrayInfo((d,), ("embed",), ones, dt)
  layer = {
      "attn_norm": norm,
      "wq": mat((d, h, dh), ("embed", "heads", "head_dim")),
      "wk": mat((d, k, dh), ("embed", "kv_heads", "head_dim")),
      "wv": mat((d, k, dh), ("embed", "kv_heads", "head_dim")),
      "wo": mat((h, dh, d), ("heads", "head_dim", "embed")),
      "mlp_norm": norm,
      "w_gate": mat((d, f), ("embed", "mlp")),
      "w_up": mat((d, f), ("embed", "mlp")),
      "w_down": mat((f, d), ("mlp", "embed")),
  }
  if cfg.qkv_bias:  # Qwen2.
    layer.update(bq=ArrayInfo((h, dh), ("heads", "head_dim"), zeros, dt),
                 bk=ArrayInfo((k, dh), ("kv_heads", "head_dim"), zeros, dt),
                 bv=ArrayInfo((k, dh), ("kv_heads", "head_dim"), zeros, dt))
  return layer


def param_info(cfg: ModelConfig) -> Params:
  """The table: {"embed": [V, D], "layers": L x {name: ...} (or {name: [L, ...]} when
  cfg.scan_layers), "final_norm": [D], "lm_head": [D, V] unless embeddings are tied}."""
  dt = jnp.dtype(cfg.param_dtype)
  layer = _layer_info(cfg)
  if cfg.scan_layers:
    layers: Any = {name: info.stacked(cfg.n_layers) for name, info in layer.items()}
  else:
    layers = [dict(layer) for _ in range(cfg.n_layers)]
  info = {"embed": ArrayInfo((cfg.vocab_size, cfg.d_model), ("vocab", "embed"), normal, dt),
          "layers": layers,
          "final_norm": ArrayInfo((cfg.d_model,), ("embed",), ones, dt)}
  if not cfg.tie_embeddings:
    info["lm_head"] = ArrayInfo((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), normal, dt)
  return info


def param_shapes(cfg: ModelConfig) -> Params:
  """Shape tuple of every parameter, same tree as `init_params`."""
  return jax.tree.map(lambda i: i.shape, param_info(cfg), is_leaf=_is_info)


def param_axes(cfg: ModelConfig) -> Params:
  """Logical axis names of every parameter, same tree as `init_params` (see models.sharding)."""
  return jax.tree.map(lambda i: i.axes, param_info(cfg), is_leaf=_is_info)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters: N(0, 0.02) matrices, unit norms, zero biases, in cfg.param_dtype.

  One key per leaf of the per-layer tree, split from `rng` in its flattening order, so a
  scanned config gets exactly the stacked values of the unscanned one.
  """
  info = param_info(cfg.replace(scan_layers=False))
  leaves, treedef = jax.tree.flatten(info, is_leaf=_is_info)
  keys = jax.random.split(rng, len(leaves))
  params = jax.tree.unflatten(treedef, [i.init(key, i.shape, i.dtype)
                                        for key, i in zip(keys, leaves)])
  return stack_layers(params) if cfg.scan_layers else params


def param_shardings(cfg: ModelConfig, mesh: Mesh,
                    rules: Mapping[str, Any] = shd.RULES) -> Params:
  """NamedSharding of every parameter on `mesh` (a layers axis is always replicated)."""
  return jax.tree.map(
      lambda i: NamedSharding(mesh, shd.logical_to_spec(i.axes, i.shape, mesh, rules)),
      param_info(cfg), is_leaf=_is_info)


def abstract_params(cfg: ModelConfig, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] = shd.RULES) -> Params:
  """ShapeDtypeStructs of the parameters (with their shardings on `mesh` if given): the target
  of a restore, or the input of ahead-of-time compilation, without allocating anything."""
  info = param_info(cfg)
  if mesh is None:
    return jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), info, is_leaf=_is_info)
  return jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=s), info,
                      param_shardings(cfg, mesh, rules), is_leaf=_is_info)


def decay_mask(cfg: ModelConfig) -> Params:
  """True for the parameters that are matrices within one layer (weight decay applies to them,
  not to norms), same tree as `init_params`; a stacked [L, D] norm still counts as a vector."""
  return jax.tree.map(lambda i: len([a for a in i.axes if a != "layers"]) > 1,
                      param_info(cfg), is_leaf=_is_info)


def is_stacked(params: Params) -> bool:
  """Whether params["layers"] is one dict of [L, ...] arrays rather than a list of L dicts."""
  return isinstance(params["layers"], Mapping)


def stack_layers(params: Params) -> Params:
  """L x {name: [...]} -> {name: [L, ...]}: the layout of a cfg.replace(scan_layers=True)."""
  if is_stacked(params):
    return params
  layers = params["layers"]
  stacked = {name: jnp.stack([lp[name] for lp in layers]) for name in layers[0]}
  return dict(params, layers=stacked)


def unstack_layers(params: Params) -> Params:
  """{name: [L, ...]} -> L x {name: [...]}: the layout of an unscanned config."""
  if not is_stacked(params):
    return params
  layers = params["layers"]
  n = len(next(iter(layers.values())))
  return dict(params, layers=[{name: x[i] for name, x in layers.items()} for i in range(n)])


def _is_params(x) -> bool:
  return isinstance(x, Mapping) and "layers" in x and "embed" in x


def _stack_abstract(params: Params) -> Params:
  layers = params["layers"]

  def stack(*xs):
    x = xs[0]
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
      sharding = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)

  return dict(params, layers={name: stack(*[lp[name] for lp in layers]) for name in layers[0]})


def _unstack_abstract(params: Params) -> Params:
  layers = params["layers"]

  def one(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
      sharding = NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)

  n = next(iter(layers.values())).shape[0]
  return dict(params, layers=[{name: one(x) for name, x in layers.items()} for _ in range(n)])


def relayout(tree: Any, scan_layers: bool) -> Any:
  """Every parameter tree inside `tree` (params, a TrainState's params, ref_params and optimizer
  moments: any dict with "embed" and "layers") in the stacked (scan_layers) or per-layer layout.
  Works on arrays and on ShapeDtypeStructs (a restore target; NamedShardings follow, the layers
  axis replicated)."""

  def convert(p):
    if not _is_params(p) or is_stacked(p) == scan_layers:
      return p
    abstract = isinstance(jax.tree.leaves(p["layers"])[0], jax.ShapeDtypeStruct)
    if scan_layers:
      return _stack_abstract(p) if abstract else stack_layers(p)
    return _unstack_abstract(p) if abstract else unstack_layers(p)

  return jax.tree.map(convert, tree, is_leaf=_is_params)


def for_decoding(params: Params, cfg):
  """(params, cfg) for sampling: the per-layer layout, no remat, and the weight matrices in the
  compute dtype. A scanned stack would stack and split every layer's KV cache at each decode step
  (models.decoder.decoder), remat only matters under a gradient, and every matrix is cast to the
  compute dtype where it is used: cast once here, a bfloat16-compute run with float32 parameters
  holds (and each decode step reads) half the bytes. Outputs are unchanged (norm weights and
  biases, used in float32, keep their dtype). `params` may be ShapeDtypeStructs."""
  dcfg = cfg.replace(scan_layers=False, remat="none")
  dt = jnp.dtype(cfg.compute_dtype)

  def cast(x):
    if x.ndim < 2 or jnp.dtype(x.dtype).itemsize <= dt.itemsize:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
    return x.astype(dt)

  if not is_stacked(params):
    return jax.tree.map(cast, params), dcfg
  if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
    return jax.tree.map(cast, _unstack_abstract(params)), dcfg
  return jax.tree.map(cast, unstack_layers(params)), dcfg
