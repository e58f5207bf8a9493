"""models.attention: blockwise (flash-style) attention from per-token descriptors and decode over
a static cache, each against the dense reference `models.decoder.attention` with the explicit
[B, T, T] mask of `models.masks.tree_mask` built from the same descriptors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention as attn
from models import config, decoder as dec, masks


def _qkv(b, t, h, kh, dh, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, dh), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, kh, dh), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kh, dh), jnp.float32).astype(dtype)
  return q, k, v


def tree_row(prompt_len, n_prompt, b_max, think_len, width, branches, total=None):
  """Descriptors of one packed row, laid out as brpo.packing.pack does:
  [prompt (left-padded) | thinking | branch 1 .. C (width each)] + trailing padding.
  branches: list of (cut, live_len) (live_len 0 = a repeated cut that is not packed)."""
  seg, lim = [], []
  for t in range(prompt_len + b_max):
    ok = (t >= prompt_len - n_prompt) if t < prompt_len else (t - prompt_len < think_len)
    seg.append(0 if ok else -1)
    lim.append(t + 1 if ok else 0)
  for c, (cut, live) in enumerate(branches, start=1):
    for w in range(width):
      seg.append(c if w < live else -1)
      lim.append(prompt_len + cut if w < live else 0)
  total = total or len(seg)
  seg += [-1] * (total - len(seg))
  lim += [0] * (total - len(lim))
  return np.array(seg, np.int32), np.array(lim, np.int32)


def tree_batch():
  """Three rows, T = 61 (odd, not a block multiple): shared cuts, a dropped repeated cut, a
  branch at cut 0, left-padded prompts, short thinkings and trailing padding."""
  spec = [(4, 15, [(4, 7), (8, 5), (8, 6), (15, 3)]),  # shared cut 8
          (6, 9, [(4, 6), (9, 7), (9, 0), (0, 4)]),  # repeated cut 9 dropped, cut 0
          (2, 3, [(3, 2), (3, 7), (3, 0), (3, 0)])]  # thinking of 3, every cut at its end
  t = len(tree_row(6, 6, 15, 15, 7, [(0, 0)] * 4)[0]) + 12
  rows = [tree_row(6, n, 15, tl, 7, br, total=t) for n, tl, br in spec]
  seg = jnp.asarray(np.stack([s for s, _ in rows]))
  lim = jnp.asarray(np.stack([l for _, l in rows]))
  return seg, lim


def causal_batch(t, starts, ends):
  slots = np.arange(t)[None]
  valid = (slots >= np.array(starts)[:, None]) & (slots < np.array(ends)[:, None])
  return attn.causal_descriptor(jnp.asarray(valid))


def reference(q, k, v, seg, lim):
  """models.decoder.attention with the dense tree mask, and which query rows see any key."""
  mask = masks.tree_mask(seg, lim)
  return dec.attention(q, k, v, mask), jnp.any(mask, -1)


def _check(q, k, v, seg, lim, fn, tol, gtol):
  """Values on rows that see a key (others: fast gives 0) and grads of a weighted sum over
  those rows, fast `fn` vs the dense reference (all in one jit, to keep the test fast)."""

  @jax.jit
  def both(q, k, v, seg, lim):
    ref, seen = reference(q, k, v, seg, lim)
    out = fn(q, k, v, seg, lim)
    w = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32) * seen[:, :, None, None]
    loss = lambda g: lambda q, k, v: jnp.sum(g(q, k, v).astype(jnp.float32) * w)
    g_fast = jax.grad(loss(lambda q, k, v: fn(q, k, v, seg, lim)), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(lambda q, k, v: reference(q, k, v, seg, lim)[0]),
                     argnums=(0, 1, 2))(q, k, v)
    return out, ref, seen, g_fast, g_ref

  out, ref, seen, g_fast, g_ref = both(q, k, v, seg, lim)
  assert out.shape == q.shape and out.dtype == q.dtype
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  sel = f32(seen[:, :, None, None])
  np.testing.assert_allclose(f32(out) * sel, f32(ref) * sel, atol=tol, rtol=tol)
  np.testing.assert_array_equal(f32(out)[~np.asarray(seen)], 0.0)
  for a, b in zip(g_fast, g_ref):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(f32(a), f32(b), atol=gtol, rtol=gtol)


BLOCKWISE = lambda bq, bk: (
    lambda q, k, v, s, l: attn.blockwise_attention(q, k, v, s, l, block_q=bq, block_k=bk))


@pytest.mark.parametrize("starts,ends", [([5, 0, 11], [37, 37, 37]),  # left padding
                                         ([0, 0, 0], [20, 37, 1]),  # right padding
                                         ([3, 0, 9], [30, 37, 9])])  # both, and an empty row
@pytest.mark.parametrize("bq,bk", [(8, 16), (16, 8)])
def test_causal_padding_f32(starts, ends, bq, bk):
  seg, lim = causal_batch(37, starts, ends)
  q, k, v = _qkv(3, 37, 4, 2, 16)
  _check(q, k, v, seg, lim, BLOCKWISE(bq, bk), 1e-5, 1e-5)


def test_causal_padding_right_padded_queries_keep_masks_rule():
  """masks.causal_mask gives padding queries limit t + 1; a right-padding query then sees the
  row's earlier tokens in the reference, and must in the kernel too."""
  valid = jnp.arange(29)[None] < jnp.array([[17], [29]])
  q, k, v = _qkv(2, 29, 4, 4, 8, seed=3)
  seg = jnp.where(valid, 0, -1)
  lim = jnp.broadcast_to(jnp.arange(1, 30), valid.shape)
  ref = dec.attention(q, k, v, masks.causal_mask(valid))
  out = jax.jit(BLOCKWISE(8, 8))(q, k, v, seg, lim)
  np.testing.assert_allclose(out, ref, atol=1e-5)  # every row sees a key here


@pytest.mark.parametrize("bq,bk", [(8, 8), (16, 8), (8, 32), (128, 128)])
def test_tree_rows_f32(bq, bk):
  seg, lim = tree_batch()
  t = seg.shape[1]
  assert t % 8 and t % 16
  q, k, v = _qkv(3, t, 6, 2, 16, seed=1)
  _check(q, k, v, seg, lim, BLOCKWISE(bq, bk), 1e-5, 1e-5)


def test_tree_rows_bf16():
  seg, lim = tree_batch()
  q, k, v = _qkv(3, seg.shape[1], 6, 2, 16, jnp.bfloat16, seed=2)
  _check(q, k, v, seg, lim, BLOCKWISE(8, 16), 3e-2, 5e-2)


def test_causal_bf16():
  seg, lim = causal_batch(45, [7, 0], [45, 30])
  q, k, v = _qkv(2, 45, 4, 1, 32, jnp.bfloat16, seed=4)
  _check(q, k, v, seg, lim, BLOCKWISE(16, 16), 3e-2, 5e-2)


def test_schedule_skips_blocks():
  """Causal rows never visit key blocks right of the diagonal; a branch query block skips the
  trunk beyond its cut and the other branches."""
  seg, lim = causal_batch(64, [0], [64])
  count, order = attn._schedule(seg, lim, 16, 16)
  np.testing.assert_array_equal(count, [1, 2, 3, 4])
  np.testing.assert_array_equal(order[3], [0, 1, 2, 3])
  # Left padding over the first two blocks: those key blocks are skipped too.
  seg, lim = causal_batch(64, [32], [64])
  count, order = attn._schedule(seg, lim, 16, 16)
  np.testing.assert_array_equal(count, [0, 0, 1, 2])
  np.testing.assert_array_equal(order[3, :2], [2, 3])
  # Trunk 32 slots, two branches of 16 at cuts 8 and 20: [trunk0 trunk1 | br1 | br2].
  s = np.array([0] * 32 + [1] * 16 + [2] * 16)[None]
  l = np.array(list(range(1, 33)) + [8] * 16 + [20] * 16)[None]
  count, order = attn._schedule(jnp.asarray(s), jnp.asarray(l), 16, 16)
  np.testing.assert_array_equal(count, [1, 2, 2, 3])
  np.testing.assert_array_equal(order[2, :2], [0, 2])
  np.testing.assert_array_equal(order[3, :3], [0, 1, 3])


def test_entry_points_and_xla_route():
  """packed_attention / causal_attention dispatch; the jax.nn.dot_product_attention route
  (implementation='xla' on CPU; rows rolled so padding is on the right) equals dense."""
  q, k, v = _qkv(3, 33, 4, 2, 16, seed=5)
  starts, ends = jnp.array([4, 0, 10]), jnp.array([33, 21, 30])
  seg, lim = causal_batch(33, starts, ends)
  ref, seen = jax.jit(reference)(q, k, v, seg, lim)
  ref = jnp.where(seen[:, :, None, None], ref, 0)
  w = jax.random.normal(jax.random.PRNGKey(1), q.shape) * seen[:, :, None, None]

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl, q, k, v):
    f = lambda q, k, v: attn.causal_attention(q, k, v, starts, ends, impl=impl, block_q=8,
                                              block_k=8)
    return f(q, k, v), jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(
        q, k, v)

  _, g_dense = run("dense", q, k, v)
  for impl in ("xla", "blockwise", "auto"):
    out, g = run(impl, q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=impl)
    for a, b in zip(g, g_dense):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=impl)
  tseg, tlim = tree_batch()
  q, k, v = _qkv(3, tseg.shape[1], 4, 2, 16)
  packed = jax.jit(attn.packed_attention, static_argnames=("impl", "block_q", "block_k"))
  np.testing.assert_allclose(packed(q, k, v, tseg, tlim, block_q=16, block_k=16),
                             packed(q, k, v, tseg, tlim, impl="dense"), atol=1e-5)
  with pytest.raises(ValueError):
    attn.packed_attention(q, k, v, tseg, tlim, impl="cudnn")


def test_decoder_layer_stack_with_blockwise_attention():
  """The kernel drops into models.decoder's `Attend` hook: same hidden states on every token
  that sees a key, same parameter gradients through them."""
  cfg = config.ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           head_dim=16, mlp_dim=128, tie_embeddings=True, max_seq_len=256)
  params = dec.init_params(cfg, jax.random.PRNGKey(0))
  seg, lim = tree_batch()
  tokens = jax.random.randint(jax.random.PRNGKey(1), seg.shape, 0, 64)
  positions = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
  seen = jnp.any(masks.tree_mask(seg, lim), -1)

  def hidden(p, fast):
    if fast:
      att = lambda q, k, v, s: (attn.blockwise_attention(q, k, v, seg, lim, block_q=16,
                                                         block_k=8), s)
    else:
      att = lambda q, k, v, s: (dec.attention(q, k, v, masks.tree_mask(seg, lim)), s)
    h, _ = dec.decoder(p, cfg, tokens, positions, att, [None] * cfg.n_layers)
    return jnp.where(seen[..., None], h, 0)

  hidden = jax.jit(hidden, static_argnums=1)
  np.testing.assert_allclose(hidden(params, True), hidden(params, False), atol=1e-5)
  loss = lambda p, fast: jnp.sum(jnp.sin(hidden(p, fast)))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g1, g2 = grad(params, True), grad(params, False)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # sums of many O(100) terms
    np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.max(jnp.abs(b))), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Decode.


def heads_major(x):
  """Keys or values [B, S, K, Dh] (dec.attention's layout) -> the cache's [B, K, S, Dh]."""
  return jnp.swapaxes(x, 1, 2)


@pytest.mark.parametrize("s_len", [64, 50])
def test_decode_attention_filled_lengths(s_len):
  """Visible slots [start, filled); block 16 so 16, 32, 48, 64 are block boundaries; S = 64 and
  S = 50 (a partial last block). One compiled function for every filled length."""
  b, t, h, kh, dh = 3, 1, 4, 2, 16

  @jax.jit
  def both(q, kc, vc, start, f):
    slots = jnp.arange(s_len)
    mask = ((slots[None] >= start[:, None]) & (slots[None] < f))[:, None, :]
    return (attn.decode_attention(q, heads_major(kc), heads_major(vc), start, f, block=16),
            dec.attention(q, kc, vc, mask))

  for filled in [1, 15, 16, 17, 32, 47, 48, 50, 64]:
    f = min(filled, s_len)
    ks = jax.random.split(jax.random.PRNGKey(filled), 3)
    q = jax.random.normal(ks[0], (b, t, h, dh))
    kc = jax.random.normal(ks[1], (b, s_len, kh, dh))
    vc = jax.random.normal(ks[2], (b, s_len, kh, dh))
    start = jnp.minimum(jnp.array([0, 3, 20]), f - 1)
    out, ref = both(q, kc, vc, start, jnp.int32(f))
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=f"S={s_len} filled={f}")


DECODE = jax.jit(lambda q, k, v, *a, **kw: attn.decode_attention(
    q, heads_major(k), heads_major(v), *a, **kw), static_argnames=("block", "return_lse"))
DENSE = jax.jit(dec.attention)
MERGE = jax.jit(attn.merge_partials)


def test_decode_attention_per_row_filled_query_slots_and_merge():
  b, t, h, kh, dh, s_len = 3, 3, 6, 2, 8, 40
  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  q = jax.random.normal(ks[0], (b, t, h, dh))
  kc = jax.random.normal(ks[1], (b, s_len, kh, dh))
  vc = jax.random.normal(ks[2], (b, s_len, kh, dh))
  start, filled = jnp.array([2, 0, 9]), jnp.array([19, 33, 16])
  qslot = filled[:, None] - t + jnp.arange(t)  # the last t filled slots are the new tokens
  slots = jnp.arange(s_len)
  mask = ((slots[None, None] >= start[:, None, None]) & (slots[None, None] < filled[:, None, None])
          & (slots[None, None] <= qslot[:, :, None]))
  ref = DENSE(q, kc, vc, mask)
  out = DECODE(q, kc, vc, start, filled, query_slot=qslot, block=8)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Two disjoint key sets (a trunk cache and a branch cache) merged == one softmax over both.
  bk = jax.random.normal(ks[3], (b, 5, kh, dh))
  bv = jax.random.normal(ks[4], (b, 5, kh, dh))
  o1, l1 = DECODE(q, kc, vc, start, filled, block=8, return_lse=True)
  o2, l2 = DECODE(q, bk, bv, 0, 4, block=8, return_lse=True)
  both = jnp.concatenate([kc, bk], 1), jnp.concatenate([vc, bv], 1)
  slots2 = jnp.arange(s_len + 5)
  m2 = (((slots2[None] >= start[:, None]) & (slots2[None] < filled[:, None]))
        | ((slots2[None] >= s_len) & (slots2[None] < s_len + 4)))
  ref2 = DENSE(q, *both, jnp.broadcast_to(m2[:, None], (b, t, s_len + 5)))
  np.testing.assert_allclose(MERGE(o1, l1, o2, l2), ref2, atol=1e-5)
  # An empty set merges as nothing.
  o3, l3 = DECODE(q, bk, bv, 0, 0, block=8, return_lse=True)
  np.testing.assert_allclose(MERGE(o1, l1, o3, l3), o1, atol=1e-6)


def test_decode_attention_bf16():
  b, t, h, kh, dh, s_len = 2, 1, 4, 2, 32, 96
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  q = jax.random.normal(ks[0], (b, t, h, dh)).astype(jnp.bfloat16)
  kc = jax.random.normal(ks[1], (b, s_len, kh, dh)).astype(jnp.bfloat16)
  vc = jax.random.normal(ks[2], (b, s_len, kh, dh)).astype(jnp.bfloat16)
  start, filled = jnp.array([0, 11]), 64
  slots = jnp.arange(s_len)
  mask = ((slots[None] >= start[:, None]) & (slots[None] < filled))[:, None, :]
  ref = dec.attention(q, kc, vc, mask)
  out = attn.decode_attention(q, heads_major(kc), heads_major(vc), start, filled, block=32)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), atol=3e-2)


# ---------------------------------------------------------------------------------------------
# Memory.


def _compiled_temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_fwd_bwd_memory_is_linear_at_4096():
  """Compiled (not run) forward + backward at T = 4096: the blockwise kernel's temporaries are
  far below one [H, T, T] float32 score array, which the dense version needs."""
  b, t, h, kh, dh = 1, 4096, 4, 2, 64
  q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, kh, dh), jnp.float32)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def grads(att):
    return lambda q, k, v, s, l: jax.grad(
        lambda q, k, v: jnp.sum(att(q, k, v, s, l)), argnums=(0, 1, 2))(q, k, v)

  dense = _compiled_temp_bytes(grads(lambda q, k, v, s, l: dec.attention(
      q, k, v, masks.tree_mask(s, l))), q, kv, kv, ids, ids)
  fast = _compiled_temp_bytes(grads(lambda q, k, v, s, l: attn.blockwise_attention(
      q, k, v, s, l)), q, kv, kv, ids, ids)
  scores = b * h * t * t * 4
  assert dense >= scores
  assert fast < scores / 20, (fast, dense)


@pytest.mark.parametrize("row_major", [False, True])
def test_attention_layouts_benchmark_computes_the_same_attention(row_major):
  """benchmarks.attention_layouts times the slots-major and blocked cache layouts against
  decode_attention; its kernels must be the same attention (partly filled cache, several
  blocks)."""
  from benchmarks import attention_layouts as al
  rng = np.random.default_rng(3)
  b, s, kh, h, dh, bs, filled = 3, 64, 2, 4, 8, 16, 37
  q = jnp.asarray(rng.standard_normal((b, 1, h, dh)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, kh, dh)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, kh, dh)), jnp.float32)
  want = attn.decode_attention(q, heads_major(k), heads_major(v), 0, filled, block=32)
  np.testing.assert_allclose(al.slots_major_attention(q, k, v, filled, block=bs), want,
                             rtol=1e-5, atol=1e-6)
  got = al.blocked_attention(q, al.to_blocks(k, bs, row_major), al.to_blocks(v, bs, row_major),
                             filled, row_major=row_major)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Slots past `filled` are not read: changing them changes nothing.
  k2 = k.at[:, filled:].set(100.0)
  got2 = al.blocked_attention(q, al.to_blocks(k2, bs, row_major), al.to_blocks(v, bs, row_major),
                              filled, row_major=row_major)
  np.testing.assert_allclose(got2, want, rtol=1e-5, atol=1e-6)
