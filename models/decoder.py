"""A decoder-only transformer (Llama / Qwen2) as pure functions over a parameter pytree.

The layer stack is written once, in `decoder`, with attention passed in as a function: full
masked self-attention for training, cache writes for prefill and decode, and the shared-trunk
branch attention of `brpo.rollout.branches`. The parameters are described in models.params.
Shapes: B batch, T tokens, D d_model, H heads, K kv heads, Dh head_dim, F mlp_dim, V vocab,
L layers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models import attention as attn
from models import sharding as shd
from models.config import ModelConfig
# Re-exported: callers reach the parameter table through this module as well.
from models.params import (Params, init_params, is_stacked, param_axes,  # noqa: F401
                           param_shapes, stack_layers, unstack_layers)

NEG_INF = attn.NEG_INF


# ---------------------------------------------------------------------------------------------
# Building blocks.


def rms_norm(x, w, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
  """Rotary embedding, half-split layout (as in Hugging Face Llama/Qwen2).

  x: [..., T, heads, Dh]; positions: [..., T] int.
  """
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, Dh/2]
  cos = jnp.cos(ang)[..., None, :]
  sin = jnp.sin(ang)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# The dense grouped-query attention (a mask [B, Tq, Tk]), defined beside the blockwise kernels.
attention = attn.masked_attention


# An attention function: (q [B,T,H,Dh], k [B,T,K,Dh], v, layer_state) -> (out, new_layer_state).
Attend = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# What remat="dots" keeps: outputs of matmuls without batch dimensions, i.e. the q/k/v/o and MLP
# projections; the attention einsums (batched over B and K) are recomputed in the backward pass.
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _layer(lp: Params, cfg: ModelConfig, x, positions, attend: Attend, state, mesh=None):
  """One pre-norm block. x [B, T, D], positions [B, T] -> (x [B, T, D], new state).

  With a `mesh`, activations are constrained to it: rows over (data, fsdp), heads and the MLP's
  hidden units over tensor (models.sharding.constrain)."""
  dt = cfg.compute_dtype
  rows = lambda y: shd.constrain(y, mesh, ("batch", None, None))
  heads = lambda y, n: shd.constrain(y, mesh, ("batch", None, n, None))
  x = rows(x)
  h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
  q = jnp.einsum("btd,dhk->bthk", h, lp["wq"].astype(dt))
  k = jnp.einsum("btd,dhk->bthk", h, lp["wk"].astype(dt))
  v = jnp.einsum("btd,dhk->bthk", h, lp["wv"].astype(dt))
  if cfg.qkv_bias:
    q, k, v = q + lp["bq"].astype(dt), k + lp["bk"].astype(dt), v + lp["bv"].astype(dt)
  q = heads(rope(q, positions, cfg.rope_theta), "heads")
  k = heads(rope(k, positions, cfg.rope_theta), "kv_heads")
  v = heads(v, "kv_heads")
  o, state = attend(q, k, v, state)
  x = rows(x + jnp.einsum("bthk,hkd->btd", heads(o, "heads"), lp["wo"].astype(dt)))
  h = rms_norm(x, lp["mlp_norm"], cfg.rms_eps)
  g = jnp.einsum("btd,df->btf", h, lp["w_gate"].astype(dt))
  u = jnp.einsum("btd,df->btf", h, lp["w_up"].astype(dt))
  a = shd.constrain(jax.nn.silu(g) * u, mesh, ("batch", None, "mlp"))
  x = rows(x + jnp.einsum("btf,fd->btd", a, lp["w_down"].astype(dt)))
  return x, state


def _stack(trees: Sequence[Any]):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def decoder(params: Params, cfg: ModelConfig, tokens, positions, attend: Attend,
            states: Sequence[Any] | Any, stacked_states: bool = False, mesh=None):
  """The layer stack. tokens, positions: [B, T] -> (final-normed hidden [B, T, D], new states).

  `states[i]` is whatever `attend` keeps for layer i (None, or a KV cache slice). With
  cfg.scan_layers the layers run under `jax.lax.scan`: per-layer states are then stacked on a
  leading [L] axis on the way in and split again on the way out (a copy: a decode loop should
  pass `stacked_states=True`, giving and getting one pytree of [L, ...] arrays). cfg.remat wraps
  each layer in `jax.checkpoint`; neither option changes a value. `mesh`: activations are
  constrained to it at the layer boundaries (see `_layer`); None leaves their layout to XLA.
  """
  if is_stacked(params) != cfg.scan_layers:
    raise ValueError(
        f"cfg.scan_layers={cfg.scan_layers} but params['layers'] is "
        f"{'stacked' if is_stacked(params) else 'a list of layers'}: convert the parameters "
        "with models.params.stack_layers / unstack_layers")
  x = jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)
  layer = lambda lp, x, state: _layer(lp, cfg, x, positions, attend, state, mesh)
  if cfg.remat != "none":
    # prevent_cse only matters outside a scan (where XLA could merge the recomputation with
    # the forward pass); inside one it would only cost speed.
    layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
  x, new_states = _run_layers(params, cfg, x, layer, states, stacked_states)
  return rms_norm(x, params["final_norm"], cfg.rms_eps), new_states


def _run_layers(params: Params, cfg: ModelConfig, x, layer, states, stacked_states: bool):
  """x through `layer(lp, x, state) -> (x, state)` for every layer, unrolled or (cfg.scan_layers)
  under a `lax.scan` with the per-layer states stacked (see `decoder`) -> (x, new states)."""
  if not cfg.scan_layers:
    new_states = []
    for lp, state in zip(params["layers"], states):
      x, state = layer(lp, x, state)
      new_states.append(state)
    return x, new_states
  xs = (params["layers"], states if stacked_states else _stack(list(states)))
  x, new = jax.lax.scan(lambda x, a: layer(a[0], x, a[1]), x, xs)
  return x, new if stacked_states else [
      jax.tree.map(lambda a, i=i: a[i], new) for i in range(cfg.n_layers)]


def logits_from_hidden(params: Params, cfg: ModelConfig, h):
  """[..., D] -> float32 logits [..., V]."""
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    w = params["embed"].astype(dt)
    return jnp.einsum("...d,vd->...v", h.astype(dt), w, preferred_element_type=jnp.float32)
  return jnp.einsum("...d,dv->...v", h.astype(dt), params["lm_head"].astype(dt),
                    preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Full forward (training, scoring).


def forward_hidden(params: Params, cfg: ModelConfig, tokens, positions, mask):
  """tokens, positions [B, T], mask [B, T, T] -> final hidden [B, T, D].

  The stack runs as cfg.remat and cfg.scan_layers say (params stacked for the latter).
  """
  attend = lambda q, k, v, s: (attention(q, k, v, mask), s)
  h, _ = decoder(params, cfg, tokens, positions, attend, [None] * cfg.n_layers)
  return h


def forward(params: Params, cfg: ModelConfig, tokens, positions, mask):
  """tokens, positions [B, T], mask [B, T, T] bool -> float32 logits [B, T, V]."""
  return logits_from_hidden(params, cfg, forward_hidden(params, cfg, tokens, positions, mask))


# ---------------------------------------------------------------------------------------------
# KV cache: static shape, one [B, K, S, Dh] buffer per layer for keys and for values (heads
# before slots: a block of slots read by the decode attention is then already laid out as the
# (row, kv head)-batched matmuls want it, with no transpose per layer and step). With
# cfg.scan_layers, `decoder` stacks these per-layer buffers for its scan and splits them after
# (a copy per call): right for a prefill, wasteful in a long decode loop.


# Logical axes of a cache buffer [B, K, S, Dh] (models.sharding.ACTIVATION_RULES): rows over the
# batch axes (data, fsdp), kv heads over tensor where they divide.
CACHE_AXES = ("batch", "kv_heads", None, None)


@flax.struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # L x [B, K, S, Dh]
  v: tuple[jax.Array, ...]

  @property
  def length(self) -> int:
    return self.k[0].shape[2]

  @property
  def batch(self) -> int:
    return self.k[0].shape[0]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=zeros(), v=zeros())


def write_cache(buf, new, index):
  """Writes new keys or values [B, T, K, Dh] into a cache buffer [B, K, S, Dh] at slots
  [index, index + T) (index: a scalar, traced or not)."""
  new = jnp.swapaxes(new, 1, 2).astype(buf.dtype)
  return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=2)


def cache_slots(buf):
  """A cache buffer [B, K, S, Dh] as [B, S, K, Dh] (the layout of `attention`'s keys)."""
  return jnp.swapaxes(buf, 1, 2)


def prefill(params: Params, cfg: ModelConfig, tokens, positions, mask, cache: KVCache,
            index=0, mesh=None):
  """Runs a chunk of T tokens, attending among themselves, and writes their keys and values
  into cache slots [index, index + T).

  tokens, positions: [B, T]; mask: [B, T, T]. Returns (last-token logits [B, V], cache).
  mesh: constrain the activations to it (`decoder`). Its attention holds [B, H, T, T] float32
  scores and its layers [B, T, F] activations: the dense reference of `prefill_chunked`.
  """

  def attend(q, k, v, kv):
    return attention(q, k, v, mask), (write_cache(kv[0], k, index), write_cache(kv[1], v, index))

  h, states = decoder(params, cfg, tokens, positions, attend, list(zip(cache.k, cache.v)),
                      mesh=mesh)
  new = KVCache(k=tuple(s[0] for s in states), v=tuple(s[1] for s in states))
  return logits_from_hidden(params, cfg, h[:, -1]), new


def prefill_chunked(params: Params, cfg: ModelConfig, tokens, positions, start, cache: KVCache,
                    *, chunk: int, block: int = 256, mesh=None):
  """`prefill` of a left-padded prompt into cache slots [0, P), `chunk` prompt tokens at a time.

  tokens, positions: [B, P]; start: [B] first valid slot of each row (left padding before it).
  Layer by layer, a `fori_loop` over chunks: each chunk writes its keys and values into the
  layer's cache, then attends over the filled slots [start, its own slot] with
  `models.attention.decode_attention` (key blocks of `block`). Memory: the cache, the hidden
  states [B, P, D] (in and out of the layer) and one chunk's activations ([B, chunk, F] in the
  MLP, [B, H, chunk, block] scores), linear in P, not `prefill`'s [B, H, P, P] scores; the loop
  over chunks inside each layer uses (and on a mesh gathers) one layer's weights at a time.
  Chunks are aligned to the prompt's end (chunk i covers [max(P - (n - i) * chunk, 0), + chunk),
  n = ceil(P / chunk)); when chunk does not divide P the first two overlap, and the overlap is
  computed again from the same inputs and keys, writing the same values. A padding query sees no
  key (output 0; `prefill`'s dense mask gives it a uniform average): only cache slots below
  `start`, which nothing reads, differ from `prefill`'s. Logits only for the last slot.
  Returns (last-token logits [B, V], cache). mesh: activations and cache constrained to it.
  """
  if is_stacked(params) != cfg.scan_layers:
    raise ValueError(f"cfg.scan_layers={cfg.scan_layers} does not match params['layers']")
  p = tokens.shape[1]
  c = max(1, min(chunk, p))
  n = -(-p // c)
  fix = lambda y: shd.constrain(y, mesh, CACHE_AXES)
  rows = lambda y: shd.constrain(y, mesh, ("batch", None, None))

  def layer(lp, x, kv):
    def run(i, carry):
      out, ck, cv = carry
      index = jnp.maximum(p - (n - i) * c, 0)

      def attend(q, k, v, kv):
        ck, cv = write_cache(kv[0], k, index), write_cache(kv[1], v, index)
        o = attn.decode_attention(q, ck, cv, start, index + c,
                                  query_slot=index + jnp.arange(c), block=block)
        return o, (fix(ck), fix(cv))

      y, (ck, cv) = _layer(lp, cfg, jax.lax.dynamic_slice_in_dim(x, index, c, axis=1),
                           jax.lax.dynamic_slice_in_dim(positions, index, c, axis=1), attend,
                           (ck, cv), mesh)
      return rows(jax.lax.dynamic_update_slice_in_dim(out, y, index, axis=1)), ck, cv

    # The layer's input x is read, its output written into a second buffer (chunks may overlap).
    out, ck, cv = jax.lax.fori_loop(0, n, run, (x, *kv)) if n > 1 else run(0, (x, *kv))
    return out, (ck, cv)

  x = rows(jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype))
  x, states = _run_layers(params, cfg, x, layer, list(zip(cache.k, cache.v)), False)
  h = rms_norm(x[:, -1], params["final_norm"], cfg.rms_eps)
  new = KVCache(k=tuple(s[0] for s in states), v=tuple(s[1] for s in states))
  return logits_from_hidden(params, cfg, h), new


def decode_step(params: Params, cfg: ModelConfig, tokens, positions, cache: KVCache, index,
                kv_mask, mesh=None):
  """Writes T new tokens at cache slots [index, index + T) and attends over the whole cache (the
  dense reference of the sampler's filled-only decode step).

  tokens, positions: [B, T] (T = 1 for ordinary decoding); kv_mask: [B, T, S] bool over cache
  slots (the caller decides what is visible, e.g. slots >= row start and <= index).
  Returns (logits [B, T, V], cache). mesh: constrain the activations to it (`decoder`).
  """

  def attend(q, k, v, kv):
    ck, cv = write_cache(kv[0], k, index), write_cache(kv[1], v, index)
    return attention(q, cache_slots(ck), cache_slots(cv), kv_mask), (ck, cv)

  h, states = decoder(params, cfg, tokens, positions, attend, list(zip(cache.k, cache.v)),
                      mesh=mesh)
  new = KVCache(k=tuple(s[0] for s in states), v=tuple(s[1] for s in states))
  return logits_from_hidden(params, cfg, h), new
