"""Where each checkpoint tensor goes: Hugging Face names -> our parameters, with shape checks.

Shared by models.hf and models.gguf; `assemble` builds each parameter in its target sharding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from models import params as params_lib
from models import sharding as shd
from models.config import ModelConfig

Array = np.ndarray
Index = tuple[slice, ...]


class CheckpointError(ValueError):
  """A checkpoint that cannot be imported; the message names the file and the tensor or key."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a source tensor (numpy order, HF Linear is [out, in]) maps onto our parameter.

  kind: "same"; "transpose" ([a, b] <- [b, a]); "heads_in" (our [D, n, Dh] <- [n*Dh, D]);
  "heads_out" (our [n, Dh, D] <- [D, n*Dh]); "bias_heads" (our [n, Dh] <- [n*Dh]).
  `read` turns a block of our parameter into the block of the source that holds it, so a shard
  is read without reading the whole tensor.
  """

  kind: str = "same"
  heads: int = 0
  head_dim: int = 0

  def _rows(self, s: slice) -> slice:  # A range of heads -> its rows of the [n*Dh] axis.
    return slice(s.start * self.head_dim, s.stop * self.head_dim)

  def read(self, get: Callable[[Index], Array], index: Index) -> Array:
    """Our block `index` (slices with explicit start/stop) from `get(source index)`."""
    k = self.kind
    if k == "same":
      return get(index)
    if k == "transpose":
      return get((index[1], index[0])).T
    if k == "heads_in":
      d, h, dh = index
      block = get((self._rows(h), d)).T  # [d, h*Dh]
      return block.reshape(block.shape[0], -1, self.head_dim)[:, :, dh]
    if k == "heads_out":
      h, dh, d = index
      block = get((d, self._rows(h))).T  # [h*Dh, d]
      return block.reshape(-1, self.head_dim, block.shape[1])[:, dh, :]
    if k == "bias_heads":
      h, dh = index
      return get((self._rows(h),)).reshape(-1, self.head_dim)[:, dh]
    raise ValueError(f"unknown layout {k!r}")


@dataclasses.dataclass(frozen=True)
class Slot:
  """One source tensor: where it goes in our params, its shape in the file, and its layout."""

  path: tuple[Any, ...]  # Key path into the unscanned params tree, e.g. ("layers", 3, "wq").
  shape: tuple[int, ...]
  layout: Layout = Layout()


def hf_slots(cfg: ModelConfig) -> dict[str, Slot]:
  """Hugging Face Llama/Qwen2 tensor names -> slots (lm_head only when untied)."""
  d, h, k, dh, f, v = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim,
                       cfg.vocab_size)
  t = Layout("transpose")
  slots = {"model.embed_tokens.weight": Slot(("embed",), (v, d)),
           "model.norm.weight": Slot(("final_norm",), (d,))}
  if not cfg.tie_embeddings:
    slots["lm_head.weight"] = Slot(("lm_head",), (v, d), t)
  for i in range(cfg.n_layers):
    layer = {
        "input_layernorm.weight": ("attn_norm", (d,), Layout()),
        "self_attn.q_proj.weight": ("wq", (h * dh, d), Layout("heads_in", h, dh)),
        "self_attn.k_proj.weight": ("wk", (k * dh, d), Layout("heads_in", k, dh)),
        "self_attn.v_proj.weight": ("wv", (k * dh, d), Layout("heads_in", k, dh)),
        "self_attn.o_proj.weight": ("wo", (d, h * dh), Layout("heads_out", h, dh)),
        "post_attention_layernorm.weight": ("mlp_norm", (d,), Layout()),
        "mlp.gate_proj.weight": ("w_gate", (f, d), t),
        "mlp.up_proj.weight": ("w_up", (f, d), t),
        "mlp.down_proj.weight": ("w_down", (d, f), t),
    }
    if cfg.qkv_bias:
      layer.update({
          "self_attn.q_proj.bias": ("bq", (h * dh,), Layout("bias_heads", h, dh)),
          "self_attn.k_proj.bias": ("bk", (k * dh,), Layout("bias_heads", k, dh)),
          "self_attn.v_proj.bias": ("bv", (k * dh,), Layout("bias_heads", k, dh)),
      })
    for name, (ours, shape, layout) in layer.items():
      slots[f"model.layers.{i}.{name}"] = Slot(("layers", i, ours), shape, layout)
  return slots


def check_dtype(dtype: str) -> Any:
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
  return jnp.dtype(dtype)


def check_zero(path: str, name: str, value: Array):
  # Llama's attention_bias also puts a bias on the output projection, which models.decoder has
  # no slot for: a zero bias is a no-op and can be dropped, any other value cannot.
  if np.any(value != 0):
    raise CheckpointError(f"{path}: tensor {name!r} is a nonzero attention output bias, which "
                          "models.decoder does not support")


def check_tensors(path: str, found: Mapping[str, tuple[int, ...]], slots: Mapping[str, Slot],
                  where: Callable[[str], str], what: str, ignored: Callable[[str], bool]):
  """Missing, unexpected and wrongly shaped tensors, each named with its file."""
  for name, slot in slots.items():
    if name not in found:
      raise CheckpointError(f"{path}: missing tensor {name!r} (shape {slot.shape}, as "
                            f"{what} implies)")
  for name, shape in found.items():
    if name not in slots:
      if ignored(name):
        continue
      raise CheckpointError(f"{where(name)}: unexpected tensor {name!r} with shape {shape} "
                            f"(nothing in {what} calls for it)")
    if tuple(shape) != slots[name].shape:
      raise CheckpointError(f"{where(name)}: tensor {name!r} has shape {tuple(shape)} but "
                            f"{what} implies {slots[name].shape}")


def _bounds(index: Index, shape: tuple[int, ...]) -> Index:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def assemble(cfg: ModelConfig, slots: Mapping[str, Slot],
             read: Callable[[str, Index], Array], mesh: Mesh | None = None,
             rules: Mapping[str, Any] = shd.RULES) -> params_lib.Params:
  """Builds every parameter of `cfg` (stacked when cfg.scan_layers) in cfg.param_dtype.

  `read(name, index)` returns the block `index` of source tensor `name` (already shape-checked
  by the caller). With a mesh, each parameter is made by `jax.make_array_from_callback` in its
  sharding (models.params.param_shardings), so a process reads only the blocks its devices
  hold; without one, parameters are whole arrays on the default device.
  """
  dtype = jnp.dtype(cfg.param_dtype)
  by_path = {slot.path: (name, slot) for name, slot in slots.items()}

  def block(path, index: Index) -> Array:
    name, slot = by_path[path]
    # Converted in float32, so bf16/f16 sources and every target dtype take one path.
    get = lambda i: np.asarray(read(name, i)).astype(np.float32)
    return np.ascontiguousarray(slot.layout.read(get, index)).astype(dtype)

  def stacked_block(key: str, index: Index) -> Array:
    layers = range(cfg.n_layers)[index[0]]
    return np.stack([block(("layers", i, key), index[1:]) for i in layers])

  def make(path, info: params_lib.ArrayInfo, sharding):
    fn = (lambda ix: stacked_block(path[1], ix)) if (
        cfg.scan_layers and path[0] == "layers") else (lambda ix: block(path, ix))
    full = _bounds((slice(None),) * len(info.shape), info.shape)
    if sharding is None:
      return jnp.asarray(fn(full))
    memo: dict[Any, Array] = {}  # Devices that hold the same block read it once.

    def callback(index):
      ix = _bounds(index, info.shape)
      key = tuple((s.start, s.stop) for s in ix)
      if key not in memo:
        memo[key] = fn(ix)
      return memo[key]

    return jax.make_array_from_callback(info.shape, sharding, callback, dtype=dtype)

  is_info = lambda x: isinstance(x, params_lib.ArrayInfo)
  info = params_lib.param_info(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(info, is_leaf=is_info)
  shardings = ([None] * len(flat) if mesh is None else
               treedef.flatten_up_to(params_lib.param_shardings(cfg, mesh, rules)))
  out = []
  for (keypath, leaf), sharding in zip(flat, shardings):
    path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keypath)
    out.append(make(path, leaf, sharding))
  return jax.tree.unflatten(treedef, out)
