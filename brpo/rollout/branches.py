"""Branch decoding over a shared trunk cache (SPEC §4): the C = m * A summary branches of a row,
each reading its parent's thinking KV cache in place up to its own cut, in one jitted loop.

Shapes: R rows, C branches per row, K kv heads, H heads, Dh head dim, Tt trunk cache slots,
W = I + S branch slots (inserted tokens, then the summary), P padded prompt length. Used by
`brpo.rollout.anytime` (which re-exports these names).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from brpo import rows as rows_lib
from brpo.rollout import sampling
from models import attention as attn
from models import decoder as dec
from models import sharding as shd
from models.config import ModelConfig


def branch_attention(q, k_new, v_new, trunk_k, trunk_v, trunk_mask, br_k, br_v, step):
  """One decode step of C branches per row against their parent's trunk cache and their own,
  reading every trunk slot (the dense reference of `branch_attention_filled`).

  q: [R, C, H, Dh]; k_new, v_new: [R, C, K, Dh]; trunk_k/v: [R, K, Tt, Dh] (read in place, never
  copied per branch); trunk_mask: [R, C, Tt]; br_k/v: [R, C, K, W, Dh]; step: the branch slot of
  this token. Both score blocks go through one softmax. Returns (out [R, C, H, Dh], br_k, br_v).
  """
  r, c, h, dh = q.shape
  kh = k_new.shape[2]
  br_k, br_v = _write_branch(br_k, br_v, k_new, v_new, step)
  qg = q.reshape(r, c, kh, h // kh, dh)
  scale = dh ** -0.5
  s_trunk = jnp.einsum("rckgd,rktd->rckgt", qg, trunk_k,
                       preferred_element_type=jnp.float32) * scale
  s_own = jnp.einsum("rckgd,rcksd->rckgs", qg, br_k, preferred_element_type=jnp.float32) * scale
  s_trunk = jnp.where(trunk_mask[:, :, None, None, :], s_trunk, dec.NEG_INF)
  own_mask = jnp.arange(br_k.shape[3]) <= step
  s_own = jnp.where(own_mask, s_own, dec.NEG_INF)
  p = jax.nn.softmax(jnp.concatenate([s_trunk, s_own], axis=-1), axis=-1)
  tt = trunk_k.shape[2]
  p_trunk, p_own = p[..., :tt].astype(trunk_v.dtype), p[..., tt:].astype(br_v.dtype)
  o = (jnp.einsum("rckgt,rktd->rckgd", p_trunk, trunk_v)
       + jnp.einsum("rckgs,rcksd->rckgd", p_own, br_v))
  return o.reshape(r, c, h, dh), br_k, br_v


def _write_branch(br_k, br_v, k_new, v_new, step):
  """k_new, v_new [R, C, K, Dh] into branch slot `step` of br_k, br_v [R, C, K, W, Dh]."""
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
      buf, x[:, :, :, None].astype(buf.dtype), step, 3)
  return put(br_k, k_new), put(br_v, v_new)


def branch_attention_filled(q, k_new, v_new, trunk_k, trunk_v, start, trunk_end, br_k, br_v,
                            step, *, block: int = 256):
  """`branch_attention` reading only the trunk blocks below the longest cut of the batch.

  start: [R] first visible trunk slot; trunk_end: [R, C] a branch sees trunk slots
  [start, trunk_end) (prompt + cut). The trunk part is `models.attention.decode_attention` over
  the filled blocks with the C branches of a row as its C queries (the parent cache is read once
  per row, not per branch); the branch's own slots [0, step] are a small dense block; the two
  partial softmaxes are merged (`merge_partials`), which is one softmax over both key sets.
  """
  r, c, h, dh = q.shape
  kh = k_new.shape[2]
  br_k, br_v = _write_branch(br_k, br_v, k_new, v_new, step)
  o_t, lse_t = attn.decode_attention(q, trunk_k, trunk_v, start, jnp.max(trunk_end, axis=1),
                                     query_slot=trunk_end - 1, block=block, return_lse=True)
  qg = q.reshape(r, c, kh, h // kh, dh)
  s = jnp.einsum("rckgd,rcksd->rckgs", qg, br_k, preferred_element_type=jnp.float32)
  s = jnp.where(jnp.arange(br_k.shape[3]) <= step, s * dh ** -0.5, dec.NEG_INF)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  o_own = jnp.einsum("rckgs,rcksd->rckgd", p.astype(br_v.dtype), br_v,
                     preferred_element_type=jnp.float32) / l[..., None]
  lse_own = (m + jnp.log(l)).reshape(r, c, h)
  o = attn.merge_partials(o_t, lse_t, o_own.reshape(r, c, h, dh).astype(q.dtype), lse_own)
  return o, br_k, br_v


# Per device, float32 logits [R, C, V] larger than this are computed C / n branches at a time.
LOGITS_BYTES = 2 ** 29


def logit_chunks(rows: int, c: int, vocab: int, limit: int = LOGITS_BYTES) -> int:
  """The fewest chunks n (a divisor of C) whose float32 logits [rows, C / n, V] fit `limit`
  bytes (C when none does). rows: the rows one device holds."""
  return next((n for n in range(1, c + 1) if c % n == 0 and rows * (c // n) * vocab * 4 <= limit),
              c)


def sample_branches(params, cfg: ModelConfig, h, keys, strategy, chunks: int = 1):
  """The next token of C branches per row and its log-prob: logits, draw, log-prob.

  h: [R, C, D] final hidden states; keys: one key, or per-branch keys [R * C, 2] (raw) or
  [R * C] (typed). chunks: a divisor of C; with chunks > 1 (per-branch keys only) the branches
  go C / chunks at a time through `lax.map`, so that only [R, C / chunks, V] float32 logits are
  live at once (the paper-shape vocabulary makes the full ones 0.6 GB per device). A branch's
  draw depends only on its own key and logits, so chunking changes no sample.
  Returns (tokens [R, C] int32, logp [R, C] float32).
  """
  r, c, d = h.shape

  def one(h, keys):  # h [R, k, D], keys [R * k, ...]
    logits = dec.logits_from_hidden(params, cfg, h)  # [R, k, V]
    tok = strategy(keys, logits.reshape(-1, logits.shape[-1])).reshape(h.shape[:2])
    return tok, sampling.token_logprobs(logits, tok, strategy.temperature)

  if chunks == 1:
    return one(h, keys)
  if not sampling.per_row(keys):
    raise ValueError("sample_branches: chunks > 1 needs per-branch keys (one key draws for the "
                     "whole batch at once)")
  k = c // chunks
  split = lambda x: x.reshape(r, chunks, k, *x.shape[2:]).swapaxes(0, 1)  # [n, R, k, ...]
  ks = split(keys.reshape(r, c, *keys.shape[1:]))
  tok, lp = jax.lax.map(lambda x: one(x[0], x[1].reshape(r * k, *x[1].shape[2:])),
                        (split(h), ks))  # [n, R, k]
  join = lambda x: x.swapaxes(0, 1).reshape(r, c)
  return join(tok), join(lp)


@flax.struct.dataclass
class BranchState:
  k: tuple[jax.Array, ...]  # L x [R, C, K, W, Dh]
  v: tuple[jax.Array, ...]
  tokens: jax.Array  # [R, C, W] inserted tokens, then the summary
  logp: jax.Array  # [R, C, W] float32 (0 at inserted slots)
  gen_len: jax.Array  # [R, C]
  done: jax.Array  # [R, C] bool
  step: jax.Array  # scalar: slots [0, step) have keys/values in the branch cache
  rng: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "prompt_len", "summary_len", "strategy",
                                             "eos_id", "pad_id", "dense", "block", "mesh",
                                             "logits_bytes"))
def decode_branches(params, cfg: ModelConfig, trunk: dec.KVCache, start, n_prompt, cut_len,
                    insert, insert_len, active, rng, *, prompt_len: int, summary_len: int,
                    strategy, eos_id: int, pad_id: int, dense: bool = False,
                    block: int | None = None, mesh=None, logits_bytes: int = LOGITS_BYTES):
  """Decodes C branches per row, each reading its parent's trunk cache up to its own cut.

  Args:
    trunk: the thinking cache, [R, K, Tt, Dh] per layer; slots [P, P + b_m) hold the thinking
      (P = prompt_len). Only read: no branch copies it.
    start: [R] first valid prompt slot; n_prompt: [R] valid prompt tokens.
    cut_len: [R, C] thinking tokens the branch sees; insert: [R, C, I]; insert_len: [R, C].
    active: [R, C] bool; inactive branches generate nothing (shared cuts are decoded once).
    rng: one key, or per-branch keys [R, C, 2] (step k draws with fold_in(key, k)).
    dense: read every trunk slot under a mask (the reference) instead of only the blocks below
      the longest cut (`branch_attention_filled`). block: the trunk's key block (None:
      cfg.decode_block).
    logits_bytes: with per-branch keys, each step's logits, draws and log-probs are computed in
      the fewest chunks along C whose float32 logits fit this many bytes per device
      (`sample_branches`, `logit_chunks`); the samples are the same.
    mesh: the branch caches are sharded like the trunk (rows over the batch axes, kv heads over
      tensor: `sampling.CACHE_AXES`), the activations constrained to it.
  Returns:
    (tokens [R, C, W], logp [R, C, W], gen_len [R, C]) with the summary at slots
    [insert_len, insert_len + gen_len).
  """
  r, c, n_ins = insert.shape
  w = n_ins + summary_len
  trunk_block = sampling.key_block(cfg, block)
  # The trunk is [prompt (P slots, left-padded) | thinking]; a branch sees [start, P + cut).
  slots = jnp.arange(trunk.length)
  trunk_end = prompt_len + cut_len
  trunk_mask = (slots[None, None] >= start[:, None, None]) & (
      slots[None, None] < trunk_end[..., None]) if dense else None
  chunks = 1
  if sampling.per_row(rng):
    rng = rng.reshape(r * c, *rng.shape[2:])
    ways = rows_lib.batch_ways(mesh) if mesh is not None else 1
    local = r // ways if r % ways == 0 else r  # rows per device (replicated when not divisible)
    chunks = logit_chunks(local, c, cfg.vocab_size, logits_bytes)
  dtype = trunk.k[0].dtype
  branch_axes = (sampling.CACHE_AXES[0], None) + sampling.CACHE_AXES[1:]  # [R, C, K, W, Dh]
  constrain = lambda xs: tuple(shd.constrain(x, mesh, branch_axes) for x in xs)
  zeros = lambda: constrain(jnp.zeros((r, c, cfg.n_kv_heads, w, cfg.head_dim), dtype)
                            for _ in range(cfg.n_layers))
  tokens = jnp.concatenate([insert, jnp.full((r, c, summary_len), pad_id, jnp.int32)], axis=2)
  state = BranchState(k=zeros(), v=zeros(), tokens=tokens,
                      logp=jnp.zeros((r, c, w), jnp.float32),
                      gen_len=jnp.zeros((r, c), jnp.int32), done=~active, step=jnp.int32(0),
                      rng=rng)

  def cond(s: BranchState):
    return (s.step < w - 1) & jnp.any(~s.done)

  def body(s: BranchState):
    k = s.step
    tok = jax.lax.dynamic_index_in_dim(s.tokens, k, axis=2, keepdims=False)  # [R, C]
    pos = n_prompt[:, None] + cut_len + k

    def attend(q, kn, vn, layer):
      tk, tv, bk, bv = layer
      if dense:
        o, bk, bv = branch_attention(q, kn, vn, tk, tv, trunk_mask, bk, bv, k)
      else:
        o, bk, bv = branch_attention_filled(q, kn, vn, tk, tv, start, trunk_end, bk, bv, k,
                                            block=trunk_block)
      return o, (tk, tv, bk, bv)

    layers = list(zip(trunk.k, trunk.v, s.k, s.v))
    h, new = dec.decoder(params, cfg, tok, pos, attend, layers, mesh=mesh)
    nxt = k + 1
    rng, key = sampling.step_keys(s.rng, nxt)
    sampled, lp = sample_branches(params, cfg, h, key, strategy, chunks)  # [R, C]
    live = ~s.done & (nxt >= insert_len)
    cur = jax.lax.dynamic_index_in_dim(s.tokens, nxt, axis=2, keepdims=False)
    tokens = jax.lax.dynamic_update_index_in_dim(
        s.tokens, jnp.where(live, sampled, cur), nxt, axis=2)
    logp = jax.lax.dynamic_update_index_in_dim(s.logp, jnp.where(live, lp, 0.0), nxt, axis=2)
    gen_len = s.gen_len + live.astype(jnp.int32)
    done = s.done | (live & ((sampled == eos_id) | (gen_len >= summary_len)))
    return BranchState(k=constrain(x[2] for x in new), v=constrain(x[3] for x in new),
                       tokens=tokens,
                       logp=logp, gen_len=gen_len, done=done, step=nxt, rng=rng)

  s = jax.lax.while_loop(cond, body, state)
  return s.tokens, s.logp, s.gen_len
