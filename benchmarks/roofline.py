"""The roofline of a decode step (benchmarks/decode.py): the machine's memory bandwidth and matmul
peak measured here, the bytes a step must read, and the floor set by the step's matmuls alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.platform import best_time


def memory_bandwidth(mb: int = 512) -> float:
  """Bytes/s of a jitted reduction that reads `mb` MB once (the roofline's denominator)."""
  x = jnp.ones((mb * 2 ** 20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  t = best_time(lambda: f(x).block_until_ready(), 5)
  return x.nbytes / t


def matmul_peak(dtype: str = "float32", n: int = 2048) -> float:
  """FLOP/s of a jitted n x n x n matmul (the compute roofline's denominator)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  t = best_time(lambda: f(a).block_until_ready(), 5)
  return 2 * n ** 3 / t


def matmul_floor(params, cfg, batch: int) -> float:
  """Seconds of one decode step's matmuls alone at `batch` rows (the per-layer weights and the
  output head applied to a [batch, d_model] activation): what the step costs at best with XLA's
  own dot kernels on this machine."""
  dt = cfg.compute_dtype
  head = params["embed"] if cfg.tie_embeddings else params["lm_head"]

  def f(params, x):
    for lp in params["layers"]:
      q = jnp.einsum("bd,dhk->bhk", x, lp["wq"].astype(dt))
      k = jnp.einsum("bd,dhk->bhk", x, lp["wk"].astype(dt))
      v = jnp.einsum("bd,dhk->bhk", x, lp["wv"].astype(dt))
      # k and v feed x (negligibly) so that XLA does not drop their matmuls as dead code.
      x = x + jnp.einsum("bhk,hkd->bd", q, lp["wo"].astype(dt)) + (k.sum() + v.sum()) * 1e-9
      a = (jnp.einsum("bd,df->bf", x, lp["w_gate"].astype(dt))
           * jnp.einsum("bd,df->bf", x, lp["w_up"].astype(dt)))
      x = x + jnp.einsum("bf,fd->bd", a, lp["w_down"].astype(dt))
    spec = "bd,vd->bv" if cfg.tie_embeddings else "bd,dv->bv"
    return jnp.einsum(spec, x, head.astype(dt))

  g = jax.jit(f)
  x = jnp.ones((batch, cfg.d_model), dt) * 1e-3
  return best_time(lambda: g(params, x).block_until_ready(), 5)


def step_bytes(cfg, params, batch: int, filled: float) -> float:
  """Bytes one decode step must read: all parameters, and K and V of `filled` slots per row."""
  p = sum(x.nbytes for x in jax.tree.leaves(params))
  kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  return p + batch * filled * kv


def t_floor_roof(r) -> float:
  """The memory roofline fraction of a step that took only its matmul floor."""
  return r["roofline"] * r["ours_s"] / r["new_tokens"] / r["matmul_floor_s"]
