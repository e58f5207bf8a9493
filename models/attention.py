"""Memory-efficient attention: packed tree rows, causal prefill, and decode over a static cache.

The mask is never given as a [T, T] array. A row is described per token by two int32 arrays,
the same two that `brpo.packing.PackedBatch` already holds (`branch`, `limit`) and that
`models.masks.tree_mask` turns into the dense mask:

  segment [B, T]: 0 = trunk (prompt + thinking), c >= 1 = branch c, -1 = padding;
  limit   [B, T]: trunk keys at slots < limit are visible to the token.

Query slot t sees key slot s iff
  (segment[s] == 0 and s < limit[t])  or  (segment[s] == segment[t] >= 1 and s <= t),
i.e. exactly `masks.tree_mask(segment, limit)`. A causal row with left or right padding is
segment = where(valid, 0, -1), limit = where(valid, t + 1, 0) (`causal_descriptor`). A query row that sees no key
(padding) gets output 0 here (the dense `models.decoder.attention` gives a uniform average there);
such rows carry no loss, and their keys are invisible to every other row.

`blockwise_attention` is a flash-style kernel in pure JAX: a scan over query blocks, and for each
a dynamic-length loop over just the key blocks that its descriptors can see (computed from
per-block summaries of segment/limit), online softmax in float32. Backward is a custom_vjp that
recomputes scores block by block from (q, k, v, o, logsumexp), so forward and backward memory is
linear in T. `causal_attention` can route prefill to `jax.nn.dot_product_attention` (cuDNN on
GPU). `decode_attention` reads only the filled cache blocks with a dynamic trip count.

Shapes: B batch, T tokens, S cache slots, H query heads, K kv heads (H % K == 0), Dh head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # Finite, so a fully masked (padding) row gives a uniform softmax, not NaN.
_BIG = 2 ** 30
IMPLS = ("auto", "xla", "cudnn", "blockwise", "dense")


# ---------------------------------------------------------------------------------------------
# Descriptors.


def causal_descriptor(valid):
  """[B, T] bool (False = padding, left or right) -> (segment, limit) int32 [B, T] of a causal
  row that never attends to padding. Padding queries get limit 0 (they see nothing, output 0);
  `models.masks.causal_mask` gives them t + 1 instead, which the kernel also follows if asked."""
  t = valid.shape[1]
  segment = jnp.where(valid, 0, -1).astype(jnp.int32)
  limit = jnp.where(valid, jnp.arange(1, t + 1, dtype=jnp.int32), 0).astype(jnp.int32)
  return segment, limit


def visible(seg_q, lim_q, slot_q, seg_k, slot_k):
  """The mask rule. seg_q, lim_q [B, Tq]; slot_q [Tq]; seg_k [B, Tk]; slot_k [Tk] ->
  [B, Tq, Tk] bool."""
  trunk = (seg_k[:, None, :] == 0) & (slot_k[None, None, :] < lim_q[:, :, None])
  own = ((seg_k[:, None, :] == seg_q[:, :, None]) & (seg_k[:, None, :] > 0)
         & (slot_k[None, None, :] <= slot_q[None, :, None]))
  return trunk | own


def masked_attention(q, k, v, mask):
  """Grouped-query attention under a dense mask (`models.decoder.attention`).

  q: [B, Tq, H, Dh]; k, v: [B, Tk, K, Dh]; mask: [B, Tq, Tk] bool -> [B, Tq, H, Dh].
  Scores and softmax in float32.
  """
  b, tq, h, dh = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, tq, kh, h // kh, dh)
  s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k, preferred_element_type=jnp.float32)
  s = s * (dh ** -0.5)
  s = jnp.where(mask[:, None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v)
  return o.reshape(b, tq, h, dh)


def dense_attention(q, k, v, segment, limit):
  """Reference: `masked_attention` with the dense [B, T, T] mask of the descriptors, rows that
  see nothing set to 0. q [B,T,H,Dh]; k, v [B,T,K,Dh] -> [B,T,H,Dh]."""
  t = q.shape[1]
  slots = jnp.arange(t)
  mask = visible(segment, limit, slots, segment, slots)
  o = masked_attention(q, k, v, mask)
  return jnp.where(jnp.any(mask, -1)[:, :, None, None], o, 0).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Blockwise (flash-style) kernel.


def _schedule(segment, limit, bq, bk):
  """Which key blocks each query block needs (for any row of the batch).

  segment, limit [B, Tp] -> (count [nq] int32, order [nq, nk] int32): the first count[i] entries
  of order[i] are the needed key blocks of query block i, ascending. Conservative: a block that
  is listed may still be masked in places; the exact mask is applied inside.
  """
  b, tp = segment.shape
  nq, nk = tp // bq, tp // bk
  slot = jnp.arange(tp, dtype=jnp.int32)
  sq, lq = segment.reshape(b, nq, bq), limit.reshape(b, nq, bq)
  q_lim = jnp.max(lq, -1)  # [B, nq]
  q_smin = jnp.min(jnp.where(sq > 0, sq, _BIG), -1)
  q_smax = jnp.max(jnp.where(sq > 0, sq, -1), -1)
  q_end = (jnp.arange(nq) + 1) * bq - 1
  sk = segment.reshape(b, nk, bk)
  k_tmin = jnp.min(jnp.where(sk == 0, slot.reshape(nk, bk), _BIG), -1)  # [B, nk]
  k_smin = jnp.min(jnp.where(sk > 0, sk, _BIG), -1)
  k_smax = jnp.max(jnp.where(sk > 0, sk, -1), -1)
  k_start = jnp.arange(nk) * bk
  trunk = k_tmin[:, None, :] < q_lim[:, :, None]
  own = ((k_smin[:, None, :] <= q_smax[:, :, None]) & (q_smin[:, :, None] <= k_smax[:, None, :])
         & (k_start[None, None, :] <= q_end[None, :, None]))
  need = jnp.any(trunk | own, axis=0)  # [nq, nk]
  count = jnp.sum(need, -1).astype(jnp.int32)
  order = jnp.argsort(jnp.logical_not(need), axis=-1, stable=True).astype(jnp.int32)
  return count, order


def _blocks(x, n, bs):
  """[B, n*bs, ...] -> [n, B, bs, ...] (scan over the leading axis)."""
  return jnp.moveaxis(x.reshape(x.shape[0], n, bs, *x.shape[2:]), 1, 0)


def _key_block(q_i, k, v, segment, sq, lq, slot_q, j, bk, scale):
  """Key block starting at slot j for query block q_i [B, bq, K, G, Dh] (whose segments, limits
  and slots are sq, lq [B, bq], slot_q [bq]) -> (k_j, v_j [B, bk, K, Dh], visibility
  [B, 1, 1, bq, bk], float32 scores [B, K, G, bq, bk]); the forward and backward passes share it."""
  k_j = jax.lax.dynamic_slice_in_dim(k, j, bk, axis=1)
  v_j = jax.lax.dynamic_slice_in_dim(v, j, bk, axis=1)
  sk = jax.lax.dynamic_slice_in_dim(segment, j, bk, axis=1)
  vis = visible(sq, lq, slot_q, sk, j + jnp.arange(bk))[:, None, None]
  s = jnp.einsum("bqkgd,btkd->bkgqt", q_i, k_j, preferred_element_type=jnp.float32) * scale
  return k_j, v_j, vis, s


def _flash_fwd_impl(q, k, v, segment, limit, bq, bk):
  b, tp, h, dh = q.shape
  kh = k.shape[2]
  g = h // kh
  nq = tp // bq
  scale = dh ** -0.5
  count, order = _schedule(segment, limit, bq, bk)
  qg = q.reshape(b, tp, kh, g, dh)

  def q_step(_, xs):
    i, q_i, sq, lq, cnt, idx = xs
    slot_q = i * bq + jnp.arange(bq)

    def body(n, carry):
      m, l, acc = carry
      j = idx[n] * bk
      k_j, v_j, vis, s = _key_block(q_i, k, v, segment, sq, lq, slot_q, j, bk, scale)
      s = jnp.where(vis, s, NEG_INF)
      m_new = jnp.maximum(m, jnp.max(s, -1))
      p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      l = alpha * l + jnp.sum(p, -1)
      acc = alpha[..., None] * acc + jnp.einsum(
          "bkgqt,btkd->bkgqd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((b, kh, g, bq), NEG_INF, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, dh), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, cnt, body, init)
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (jnp.moveaxis(o, 3, 1).astype(q.dtype), lse)  # [B,bq,K,G,Dh], [B,K,G,bq]

  xs = (jnp.arange(nq), _blocks(qg, nq, bq), _blocks(segment, nq, bq), _blocks(limit, nq, bq),
        count, order)
  _, (o, lse) = jax.lax.scan(q_step, None, xs)
  o = jnp.moveaxis(o, 0, 1).reshape(b, tp, h, dh)
  return o, lse  # lse: [nq, B, K, G, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, segment, limit, bq, bk):
  return _flash_fwd_impl(q, k, v, segment, limit, bq, bk)[0]


def _flash_fwd(q, k, v, segment, limit, bq, bk):
  o, lse = _flash_fwd_impl(q, k, v, segment, limit, bq, bk)
  return o, (q, k, v, segment, limit, o, lse)


def _flash_bwd(bq, bk, res, do):
  q, k, v, segment, limit, o, lse = res
  b, tp, h, dh = q.shape
  kh = k.shape[2]
  g = h // kh
  nq = tp // bq
  scale = dh ** -0.5
  count, order = _schedule(segment, limit, bq, bk)
  qg = q.reshape(b, tp, kh, g, dh)
  dog = do.reshape(b, tp, kh, g, dh)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1).reshape(b, tp, kh, g)
  delta = jnp.moveaxis(_blocks(delta, nq, bq), 2, -1)  # [nq, B, K, G, bq]

  def q_step(carry, xs):
    i, q_i, do_i, lse_i, d_i, sq, lq, cnt, idx = xs
    slot_q = i * bq + jnp.arange(bq)

    def body(n, c):
      dq_i, dk, dv = c
      j = idx[n] * bk
      k_j, v_j, vis, s = _key_block(q_i, k, v, segment, sq, lq, slot_q, j, bk, scale)
      p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lse_i[..., None]), 0.0)
      dv_j = jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do.dtype), do_i,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,btkd->bkgqt", do_i, v_j, preferred_element_type=jnp.float32)
      ds = (p * (dp - d_i[..., None]) * scale).astype(q.dtype)
      dq_i = dq_i + jnp.einsum("bkgqt,btkd->bqkgd", ds, k_j, preferred_element_type=jnp.float32)
      dk_j = jnp.einsum("bkgqt,bqkgd->btkd", ds, q_i, preferred_element_type=jnp.float32)
      add = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
          buf, jax.lax.dynamic_slice_in_dim(buf, j, bk, axis=1) + x, j, axis=1)
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    dq0 = jnp.zeros((b, bq, kh, g, dh), jnp.float32)
    dq_i, dk, dv = jax.lax.fori_loop(0, cnt, body, (dq0, *carry))
    return (dk, dv), dq_i.astype(q.dtype)

  zeros = jnp.zeros((b, tp, kh, dh), jnp.float32)
  xs = (jnp.arange(nq), _blocks(qg, nq, bq), _blocks(dog, nq, bq), lse, delta,
        _blocks(segment, nq, bq), _blocks(limit, nq, bq), count, order)
  (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), xs)
  dq = jnp.moveaxis(dq, 0, 1).reshape(b, tp, h, dh)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, segment, limit, *, block_q: int = 128, block_k: int = 128):
  """Flash-style attention from the (segment, limit) descriptors, differentiable in q, k, v.

  q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; segment, limit: [B, T] int -> [B, T, H, Dh] in q's
  dtype. Any T: the row is padded to a block multiple with padding tokens. Scores and softmax in
  float32; memory O(T) forward and backward; fully masked key blocks are never visited.
  """
  b, t, h, dh = q.shape
  if h % k.shape[2]:
    raise ValueError(f"{h} query heads not a multiple of {k.shape[2]} kv heads")
  round8 = lambda n: -(-n // 8) * 8
  bq, bk = min(block_q, round8(t)), min(block_k, round8(t))
  tp = -(-t // math.lcm(bq, bk)) * math.lcm(bq, bk)
  pad = tp - t
  segment = jnp.asarray(segment, jnp.int32)
  limit = jnp.asarray(limit, jnp.int32)
  if pad:
    p3 = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, p3), jnp.pad(k, p3), jnp.pad(v, p3)
    segment = jnp.pad(segment, ((0, 0), (0, pad)), constant_values=-1)
    limit = jnp.pad(limit, ((0, 0), (0, pad)))
  return _flash(q, k, v, segment, limit, bq, bk)[:, :t]


# ---------------------------------------------------------------------------------------------
# Entry points.


def packed_attention(q, k, v, segment, limit, *, impl: str = "auto", block_q: int = 128,
                     block_k: int = 128):
  """Attention over packed tree rows (or any rows described by segment/limit).

  q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; segment, limit: [B, T] -> [B, T, H, Dh].
  impl: 'auto' / 'blockwise' (the flash kernel), or 'dense' (the [T, T] reference). The
  'xla' / 'cudnn' routes only express causal rows: use `causal_attention` for those.
  """
  if impl in ("auto", "blockwise"):
    return blockwise_attention(q, k, v, segment, limit, block_q=block_q, block_k=block_k)
  if impl == "dense":
    return dense_attention(q, k, v, segment, limit)
  raise ValueError(f"impl={impl!r} cannot express a tree mask; use 'blockwise' or 'dense'")


def _roll_rows(x, shift):
  """Row b of x [B, T, ...] rolled left by shift[b] (slot t takes slot (t + shift) % T)."""
  t = x.shape[1]
  idx = (jnp.arange(t)[None] + shift[:, None]) % t
  return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def causal_attention(q, k, v, start=None, end=None, *, impl: str = "auto", block_q: int = 128,
                     block_k: int = 128):
  """Causal self-attention over rows whose valid tokens are the slots [start, end) (left and/or
  right padding); padding queries get 0. The prefill case.

  q: [B, T, H, Dh]; k, v: [B, T, K, Dh]; start, end: [B] int or None (0, T) -> [B, T, H, Dh].
  impl: 'auto' (cuDNN on GPU for bf16/fp16, else blockwise), 'cudnn' / 'xla' (through
  `jax.nn.dot_product_attention`, rows rolled so padding is on the right and given as sequence
  lengths), 'blockwise', 'dense'.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  b, t = q.shape[:2]
  start = jnp.zeros((b,), jnp.int32) if start is None else jnp.broadcast_to(start, (b,))
  end = jnp.full((b,), t, jnp.int32) if end is None else jnp.broadcast_to(end, (b,))
  start, end = start.astype(jnp.int32), end.astype(jnp.int32)
  if impl == "auto":
    gpu = jax.default_backend() == "gpu"
    impl = "cudnn" if gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "blockwise"
  slots = jnp.arange(t)[None]
  valid = (slots >= start[:, None]) & (slots < end[:, None])
  if impl in ("xla", "cudnn"):
    n = end - start
    qr, kr, vr = (_roll_rows(x, start) for x in (q, k, v))
    o = jax.nn.dot_product_attention(qr, kr, vr, is_causal=True, query_seq_lengths=n,
                                     key_value_seq_lengths=n, implementation=impl)
    o = _roll_rows(o, -start)
    return jnp.where(valid[:, :, None, None], o, 0).astype(q.dtype)
  segment, limit = causal_descriptor(valid)
  return packed_attention(q, k, v, segment, limit, impl=impl, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------------------------------
# Decode.


def decode_attention(q, k_cache, v_cache, start, filled, *, query_slot=None, block: int = 256,
                     return_lse: bool = False):
  """Attention of a few new queries over the filled part of a static KV cache.

  q: [B, T, H, Dh] (T small); k_cache, v_cache: [B, K, S, Dh] (`models.decoder.KVCache`'s
  layout: a block of slots is read as [B, K, block, Dh], the layout of the (row, kv head)-batched
  score and value matmuls, so no block is transposed); start: [B] or scalar int, first visible
  slot of each row; filled: [B] or scalar int, visible slots are < filled; query_slot: optional
  [B, T] or [T] int, additionally slot <= query_slot (causal among several new tokens). Only
  cache blocks [min start // block, ceil(max filled / block)) are read, by a `lax.while_loop`;
  shapes stay static. Returns [B, T, H, Dh] in q's dtype (0 for a query that sees nothing), and
  with return_lse its float32 logsumexp [B, T, H] (NEG_INF where empty), so partial results over
  other key sets can be merged with `merge_partials`.
  """
  b, t, h, dh = q.shape
  kh, s_len = k_cache.shape[1], k_cache.shape[2]
  g = h // kh
  bs = min(block, s_len)
  scale = dh ** -0.5
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))
  filled = jnp.broadcast_to(jnp.asarray(filled, jnp.int32), (b,))
  qs = None if query_slot is None else jnp.broadcast_to(jnp.asarray(query_slot, jnp.int32), (b, t))
  qg = jnp.moveaxis(q.reshape(b, t, kh, g, dh), 1, 3)  # [B, K, G, T, Dh]
  j_lo = jnp.min(start) // bs
  j_hi = jnp.minimum(-(-jnp.max(filled) // bs), -(-s_len // bs))

  def body(carry):
    j, m, l, acc = carry
    lo = j * bs
    off = jnp.minimum(lo, s_len - bs)  # last partial block: slide back, mask the overlap
    k_j = jax.lax.dynamic_slice_in_dim(k_cache, off, bs, axis=2)  # [B, K, bs, Dh]
    v_j = jax.lax.dynamic_slice_in_dim(v_cache, off, bs, axis=2)
    slot = off + jnp.arange(bs)
    vis = (slot >= lo)[None] & (slot[None] >= start[:, None]) & (slot[None] < filled[:, None])
    vis = jnp.broadcast_to(vis[:, None, :], (b, t, bs))
    if qs is not None:
      vis = vis & (slot[None, None] <= qs[:, :, None])
    vis = vis[:, None, None]  # [B,1,1,T,bs]
    s = jnp.einsum("bkgqd,bktd->bkgqt", qg, k_j, preferred_element_type=jnp.float32) * scale
    s = jnp.where(vis, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, -1))
    p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, -1)
    acc = alpha[..., None] * acc + jnp.einsum(
        "bkgqt,bktd->bkgqd", p.astype(v_cache.dtype), v_j, preferred_element_type=jnp.float32)
    return j + 1, m_new, l, acc

  init = (j_lo, jnp.full((b, kh, g, t), NEG_INF, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, dh), jnp.float32))
  _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < j_hi, body, init)
  seen = l > 0
  o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
  o = jnp.moveaxis(o, 3, 1).reshape(b, t, h, dh).astype(q.dtype)
  if not return_lse:
    return o
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG_INF)
  return o, jnp.moveaxis(lse, 3, 1).reshape(b, t, h)


def merge_partials(o1, lse1, o2, lse2):
  """One softmax over two disjoint key sets from their partial results: o [..., H, Dh],
  lse [..., H] float32 (NEG_INF where a set is empty) -> o in o1's dtype."""
  m = jnp.maximum(lse1, lse2)
  w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
  w1 = jnp.where(lse1 <= NEG_INF, 0.0, w1)
  w2 = jnp.where(lse2 <= NEG_INF, 0.0, w2)
  z = jnp.where(w1 + w2 > 0, w1 + w2, 1.0)
  o = (o1.astype(jnp.float32) * (w1 / z)[..., None] + o2.astype(jnp.float32) * (w2 / z)[..., None])
  return o.astype(o1.dtype)
