"""One decode step's attention over a filled KV cache: the cache layout the sampler uses against
the slots-major layout it had before and two blocked layouts (measurements for layout changes).

  python -m benchmarks.attention_layouts [--model=tiny|smollm2-135m|qwen2.5-1.5b] [--batch=128]
      [--slots=1024] [--filled=0] [--blocks=64,128,256] [--platform=cpu|gpu|..]

Baseline: `models.attention.decode_attention` on the sampler's heads-major [B, K, S, Dh] cache
(blocks of 256 slots, its default, read up to the filled length; also timed at each --blocks
size): a block read is [B, K, bs, Dh], already the layout of its (row, kv head)-batched score and
value matmuls. The alternatives run the same filled-only online softmax on the slots-major
[B, S, K, Dh] cache (the sampler's layout before 2026-12-06, whose every block read is first
transposed to [B, K, bs, Dh]), and on caches stored in blocks, [nb, B, K, bs, Dh]
("block-major") or [B, nb, K, bs, Dh] ("row-major"). Every alternative's output is checked
against the baseline before it is timed. Times are the best of --repeats calls of one layer's
attention, in milliseconds; speedups are over the baseline. The last line is one JSON object
(`slots_major_over_sampler`: the slots-major layout's best time over the sampler's best;
`blocked_over_best_sampler`: the best blocked layout against the sampler's best).
"""

from __future__ import annotations

import argparse
import json

from benchmarks.platform import best_time, set_platform

set_platform()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models import attention as attn  # noqa: E402
from models import config as config_lib  # noqa: E402
from models.decoder import NEG_INF  # noqa: E402


def _online_softmax(q, read, kh: int, bs: int, filled, keys: str):
  """The filled-only online softmax of `decode_attention`, one whole block per step, blocks read
  up to ceil(filled / bs). q [B, 1, H, Dh]; read(j) -> block j's keys and values, laid out as
  `keys` says ("btkd": [B, bs, K, Dh], "bktd": [B, K, bs, Dh]) -> [B, 1, H, Dh]."""
  b, _, h, dh = q.shape
  g = h // kh
  qg = q.reshape(b, kh, g, dh).astype(jnp.float32)

  def body(c):
    j, m, l, acc = c
    k_j, v_j = read(j)
    s = jnp.einsum(f"bkgd,{keys}->bkgt", qg, k_j, preferred_element_type=jnp.float32) * dh ** -0.5
    s = jnp.where(j * bs + jnp.arange(bs) < filled, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, -1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    acc = alpha[..., None] * acc + jnp.einsum(f"bkgt,{keys}->bkgd", p, v_j,
                                              preferred_element_type=jnp.float32)
    return j + 1, m_new, alpha * l + jnp.sum(p, -1), acc

  n = -(-filled // bs)
  init = (jnp.int32(0), jnp.full((b, kh, g), NEG_INF, jnp.float32),
          jnp.zeros((b, kh, g), jnp.float32), jnp.zeros((b, kh, g, dh), jnp.float32))
  _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n, body, init)
  return (acc / l[..., None]).reshape(b, 1, h, dh).astype(q.dtype)


def slots_major_attention(q, k, v, filled, *, block: int):
  """q [B, 1, H, Dh]; k, v [B, S, K, Dh]; slots < filled visible -> [B, 1, H, Dh]. Each block
  read, [B, bs, K, Dh], is contracted over (row, kv head) batches, which XLA does by transposing
  it first (the sampler before 2026-12-06)."""
  read = lambda j: tuple(jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1) for x in (k, v))
  return _online_softmax(q, read, k.shape[2], block, filled, "btkd")


def blocked_attention(q, kb, vb, filled, *, row_major: bool):
  """q [B, 1, H, Dh]; kb, vb [B, nb, K, bs, Dh] (row_major) or [nb, B, K, bs, Dh]; slots
  < filled visible -> [B, 1, H, Dh]."""
  axis = 1 if row_major else 0
  read = lambda j: tuple(jax.lax.dynamic_index_in_dim(x, j, axis, keepdims=False) for x in (kb, vb))
  return _online_softmax(q, read, kb.shape[2], kb.shape[3], filled, "bktd")


def to_blocks(cache, bs: int, row_major: bool):
  """[B, S, K, Dh] -> [B, nb, K, bs, Dh] or [nb, B, K, bs, Dh]."""
  b, s, k, d = cache.shape
  x = cache.reshape(b, s // bs, bs, k, d).transpose(0, 1, 3, 2, 4)
  return x if row_major else x.transpose(1, 0, 2, 3, 4)


def best_ms(fn, repeats: int) -> float:
  return best_time(lambda: jax.block_until_ready(fn()), repeats) * 1e3


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="tiny", help="named model config whose attention shapes "
                  "are used")
  ap.add_argument("--batch", type=int, default=128, help="decode rows")
  ap.add_argument("--slots", type=int, default=1024, help="cache slots S")
  ap.add_argument("--filled", type=int, default=0, help="filled slots (0: all)")
  ap.add_argument("--blocks", default="64,128,256", help="block sizes of the blocked layouts")
  ap.add_argument("--repeats", type=int, default=10, help="timed calls per variant (the best "
                  "counts)")
  ap.add_argument("--platform", default="cpu", help="cpu, gpu, tpu or auto (read before jax "
                  "is imported)")
  args = ap.parse_args()
  cfg = config_lib.get_config(args.model)
  b, s, kh, h, dh = args.batch, args.slots, cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
  filled = args.filled or s
  if not 0 < filled <= s:
    raise SystemExit(f"--filled={args.filled}: expected 1..{s} (--slots)")
  try:
    blocks = [int(x) for x in args.blocks.split(",")]
  except ValueError:
    raise SystemExit(f"--blocks={args.blocks}: expected comma-separated integers") from None
  for bs in blocks:
    if s % bs:
      raise SystemExit(f"--blocks: {bs} does not divide --slots={s}")
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((b, 1, h, dh)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, kh, dh)), jnp.float32)  # slots-major
  v = jnp.asarray(rng.standard_normal((b, s, kh, dh)), jnp.float32)
  kc, vc = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # the sampler's [B, K, S, Dh]
  kv_mb = 2 * b * filled * kh * dh * 4 / 1e6
  print(f"{args.model}: batch {b}, {s} slots ({filled} filled), {kh} kv heads x {h // kh} "
        f"queries, head_dim {dh}; float32 keys and values read: {kv_mb:.0f} MB per layer")
  sampler_name = "[B, K, S, Dh] (sampler)"
  base = jax.jit(lambda q, k, v: attn.decode_attention(q, k, v, 0, filled, block=256))
  want = np.asarray(base(q, kc, vc))
  t_base = best_ms(lambda: base(q, kc, vc), args.repeats)
  rows = [(sampler_name, 256, t_base)]

  def timed(name, bs, fn, *xs):
    np.testing.assert_allclose(np.asarray(fn(q, *xs)), want, rtol=2e-4, atol=2e-5)
    rows.append((name, bs, best_ms(lambda: fn(q, *xs), args.repeats)))

  for bs in blocks:
    if bs != 256:
      timed(sampler_name, bs, jax.jit(
          lambda q, k, v, bs=bs: attn.decode_attention(q, k, v, 0, filled, block=bs)), kc, vc)
  for bs in sorted(x for x in set(blocks) | {256} if s % x == 0):
    timed("[B, S, K, Dh] (slots-major)", bs, jax.jit(
        lambda q, k, v, bs=bs: slots_major_attention(q, k, v, filled, block=bs)), k, v)
  for row_major in (False, True):
    fn = jax.jit(lambda q, kb, vb, rm=row_major: blocked_attention(q, kb, vb, filled,
                                                                    row_major=rm))
    for bs in blocks:
      timed("[B, nb, K, bs, Dh]" if row_major else "[nb, B, K, bs, Dh]", bs, fn,
            to_blocks(k, bs, row_major), to_blocks(v, bs, row_major))
  print(f"{'layout':>28} {'block':>5} {'ms':>7} {'GB/s':>6} {'speedup':>7}")
  for name, bs, t in rows:
    print(f"{name:>28} {bs:5d} {t:7.2f} {kv_mb / t:6.1f} {t_base / t:7.2f}")
  best = lambda pred: min((r for r in rows if pred(r[0])), key=lambda r: r[2])
  sampler = best(lambda n: n == sampler_name)
  slots_major = best(lambda n: n.endswith("(slots-major)"))
  blocked = best(lambda n: "nb" in n)
  print(json.dumps({"model": args.model, "batch": b, "slots": s, "filled": filled,
                    "sampler_ms": t_base, "sampler_best_block": sampler[1],
                    "sampler_best_ms": sampler[2], "slots_major_best_block": slots_major[1],
                    "slots_major_best_ms": slots_major[2],
                    "slots_major_over_sampler": slots_major[2] / sampler[2],
                    "blocked_best_layout": blocked[0],
                    "blocked_best_block": blocked[1], "blocked_best_ms": blocked[2],
                    "blocked_over_best_sampler": sampler[2] / blocked[2]}))


if __name__ == "__main__":
  main()
