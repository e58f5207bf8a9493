"""Tree packing (DESIGN.md "Training"): one row per thinking holding the prompt, the thinking and
all of its summary branches, so one forward pass scores every trained token and no prefix is
computed twice.

Row layout, T = P + b_m + C * W slots (C = m * A branches, W = I + S slots each):
  [prompt (P, left-padded) | thinking (b_m) | branch 1 (W) | ... | branch C (W)]
A branch holds its inserted tokens, then its summary; the row is then padded (branch -1) up to a
multiple of the attention block (`padded_length`), so the blockwise kernel never copies q/k/v.
Position ids continue from each cut, and the mask of models.masks.tree_mask lets a branch token
see the prompt, the thinking up to its cut and the earlier tokens of its own branch. Training
attention is `models.attention.packed_attention` (flash-style, memory linear in T) on the
(branch, limit) descriptors; the log-probs and entropy of the trained tokens are computed in
chunks of slots (`logprobs_from_hidden`), never as a row's whole [T, V] float32 logits.

Ragged rows (`compact`, --pack_buckets): most rows fill few of their slots (thinkings that end
before b_m, summaries that end before S), so before the update the live slots of each row move
left and the batch is cut to the narrowest of a few widths (`bucket_widths`) that holds its
longest row: the descriptors describe any placement, so the kernel needs no change.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from brpo import rows as rows_lib
from brpo.core import advantages as adv_lib
from brpo.core import budgets as budgets_lib
from brpo.rollout.anytime import AnytimeRollout
from models import attention as attn
from models import decoder as dec
from models import masks
from models.config import ModelConfig

BLOCK = 128  # the blockwise attention kernel's block (models.attention.blockwise_attention)
LOGIT_CHUNK = 512  # slots per chunk of the log-prob / entropy computation


def padded_length(t: int, block: int = BLOCK) -> int:
  """Slots of a packed row of t slots: a multiple of `block` (of 8 for a row shorter than one
  block), the lengths the attention kernel takes without padding q, k and v itself."""
  if t <= block:
    return -(-t // 8) * 8
  return -(-t // block) * block


@flax.struct.dataclass
class PackedBatch:
  """Training rows, all [R, T]. The log-prob of the token at slot t comes from slot t - 1."""

  tokens: jax.Array  # int32
  positions: jax.Array  # int32 rotary positions
  branch: jax.Array  # int32: 0 trunk (prompt + thinking), k >= 1 branch k, -1 padding
  limit: jax.Array  # int32: trunk slots < limit are visible to the token
  loss_mask: jax.Array  # bool: generated thinking and summary tokens of distinct cuts
  old_logp: jax.Array  # float32 sampler log-probs of the trained tokens (0 elsewhere)
  advantages: jax.Array  # float32 per-token advantages (0 elsewhere)
  is_summary: jax.Array  # bool: trained summary tokens (the rest of loss_mask is thinking)
  prompt_len: int = flax.struct.field(pytree_node=False, default=0)
  # Layout: slots [0, trunk_len) are the trunk, then n_branches blocks of equal width.
  # n_branches = 0: plain causal rows (see `unpack`).
  trunk_len: int = flax.struct.field(pytree_node=False, default=0)
  n_branches: int = flax.struct.field(pytree_node=False, default=0)
  branch_width: int = flax.struct.field(pytree_node=False, default=0)
  # Slots after trunk_len + n_branches * branch_width are padding (up to `padded_length`).
  # After `compact` the slots no longer follow this layout; the fields keep the fixed layout's
  # values, for `response_len`.

  @property
  def response_len(self) -> int:
    """The constant of Dr. GRPO's denominator: slots that can hold generated tokens (the
    padding up to the attention block is not counted)."""
    return self.trunk_len + self.n_branches * self.branch_width - self.prompt_len


def pack(ro: AnytimeRollout, thinking_adv, summary_adv, summary_train=None) -> PackedBatch:
  """Packs an anytime rollout into training rows.

  Args:
    ro: the rollout (R rows, m budgets, A summaries).
    thinking_adv: [R, m] advantage of each thinking segment (tokens in (b_{s-1}, b_s]).
    summary_adv: [R, m, A] advantage of each summary. With summaries reused at shared cuts
      (ro.reused), budgets whose cut repeats an earlier budget's are not packed: their
      summaries are trained once.
    summary_train: optional [R, m, A] bool, the summaries to train (e.g. only the one at b_m
      for the GRPO summary baseline); default all distinct cuts.
  Returns:
    PackedBatch [R, T].
  """
  r, p = ro.prompt.shape
  b_max = ro.thinking.shape[1]
  m, a, s = ro.summary.shape[1:]
  n_ins = ro.cuts.insert.shape[2]
  w = n_ins + s
  c = m * a
  n_prompt = jnp.sum(ro.prompt_valid, axis=1)

  # Trunk: prompt then thinking.
  think_valid = jnp.arange(b_max)[None] < ro.thinking_len[:, None]
  trunk_tokens = jnp.concatenate([ro.prompt, ro.thinking], axis=1)
  trunk_valid = jnp.concatenate([ro.prompt_valid, think_valid], axis=1)
  trunk_pos = jnp.concatenate(
      [masks.positions_from_valid(ro.prompt_valid), n_prompt[:, None] + jnp.arange(b_max)], 1)
  trunk_limit = jnp.broadcast_to(jnp.arange(1, p + b_max + 1), trunk_valid.shape)
  seg = budgets_lib.segment_of_tokens(jnp.asarray(ro.budgets), b_max)
  think_adv = adv_lib.token_advantages(jnp.asarray(thinking_adv),
                                       jnp.broadcast_to(seg, (r, b_max)), think_valid)
  zeros_p = jnp.zeros((r, p))
  trunk_train = jnp.concatenate([jnp.zeros((r, p), bool), think_valid], axis=1)

  # Branches, [R, m, A, W]: inserted tokens at [0, insert_len), the summary after them.
  k = jnp.arange(w)
  ins_len = ro.cuts.insert_len[:, :, None, None]
  sum_len = ro.summary_len[..., None]
  if ro.reused:  # Budgets that share a cut repeat its summaries: train each distinct cut once.
    canonical = adv_lib.dedup_mask(ro.cuts.length)[:, :, None, None]
  else:  # Every budget holds its own summaries (the official layout): all are trained.
    canonical = jnp.ones((r, m, 1, 1), bool)
  in_summary = (k >= ins_len) & (k < ins_len + sum_len)
  is_insert = k < ins_len
  live = (is_insert | in_summary) & canonical
  ins = jnp.pad(ro.cuts.insert, ((0, 0), (0, 0), (0, s)))[:, :, None, :]
  gather = jnp.clip(k - ins_len, 0, s - 1)
  sum_tok = jnp.take_along_axis(ro.summary, jnp.broadcast_to(gather, (r, m, a, w)), axis=-1)
  sum_lp = jnp.take_along_axis(ro.summary_logp, jnp.broadcast_to(gather, (r, m, a, w)), -1)
  br_tokens = jnp.where(is_insert, ins, jnp.where(in_summary, sum_tok, 0))
  br_pos = n_prompt[:, None, None, None] + ro.cuts.length[:, :, None, None] + k
  br_id = jnp.arange(1, c + 1).reshape(1, m, a, 1)
  br_branch = jnp.where(live, br_id, masks.PAD)
  br_limit = jnp.where(live, p + ro.cuts.length[:, :, None, None], 0)
  br_train = in_summary & canonical
  if summary_train is not None:
    br_train = br_train & summary_train[..., None]
  br_adv = jnp.where(br_train, summary_adv[..., None], 0.0)
  br_lp = jnp.where(br_train, sum_lp, 0.0)

  flat = lambda x: x.reshape(r, c * w)
  n_pad = padded_length(p + b_max + c * w) - (p + b_max + c * w)

  def cat(t, b, fill=0):
    """Trunk [R, P + b_m] and branches [R, m, A, W] -> the padded row [R, T]."""
    row = jnp.concatenate([t, flat(jnp.broadcast_to(b, (r, m, a, w)))], axis=1)
    return jnp.pad(row, ((0, 0), (0, n_pad)), constant_values=fill)

  return PackedBatch(
      tokens=cat(trunk_tokens, br_tokens).astype(jnp.int32),
      positions=cat(trunk_pos, br_pos).astype(jnp.int32),
      branch=cat(jnp.where(trunk_valid, masks.TRUNK, masks.PAD), br_branch,
                 masks.PAD).astype(jnp.int32),
      limit=cat(jnp.where(trunk_valid, trunk_limit, 0), br_limit).astype(jnp.int32),
      loss_mask=cat(trunk_train, br_train),
      old_logp=cat(jnp.concatenate([zeros_p, jnp.where(think_valid, ro.thinking_logp, 0.0)],
                                   1), br_lp).astype(jnp.float32),
      advantages=cat(jnp.concatenate([zeros_p, think_adv], 1),
                     br_adv).astype(jnp.float32),
      is_summary=cat(jnp.zeros_like(trunk_train), br_train),
      prompt_len=p, trunk_len=p + b_max, n_branches=c, branch_width=w)


def _kept(batch: PackedBatch) -> jax.Array:
  """[R, T] bool: the slots `compact` keeps, the prompt's P slots (left padding included) and
  every slot that is not padding after them."""
  slot = jnp.arange(batch.tokens.shape[1])
  return (slot[None] < batch.prompt_len) | (batch.branch != masks.PAD)


def live_slots(batch: PackedBatch) -> jax.Array:
  """[R] int32: the slots each row keeps under `compact` (the width it needs)."""
  return jnp.sum(_kept(batch), axis=1, dtype=jnp.int32)


def bucket_widths(full: int, n_buckets: int, block: int = BLOCK) -> list[int]:
  """The widths `compact` cuts rows of `full` slots to, one compilation of the train step each:
  `padded_length(full * k / n_buckets, block)` for k = 1 .. n_buckets (the last is `full`).
  `block`: the attention kernel's block (ModelConfig.attention_block), which every width above
  one block is a multiple of."""
  if n_buckets < 1:
    raise ValueError(f"n_buckets={n_buckets}: must be >= 1")
  return sorted({min(full, padded_length(-(-full * k // n_buckets), block))
                 for k in range(1, n_buckets + 1)})


def bucket_width(needed: int, full: int, n_buckets: int, block: int = BLOCK) -> int:
  """The smallest of `bucket_widths(full, n_buckets, block)` that holds `needed` slots."""
  if needed > full:
    raise ValueError(f"{needed} live slots do not fit rows of {full}")
  return next(w for w in bucket_widths(full, n_buckets, block) if w >= needed)


@functools.partial(jax.jit, static_argnames="width")
def compact(batch: PackedBatch, width: int) -> PackedBatch:
  """Ragged packing: in every row, the slots after the prompt that are not padding (the thinking
  up to its length, then each branch's inserted and summary tokens) move left, in order, over
  the padding of the thinking and of the branches; rows are then cut to `width` slots
  (>= `live_slots` of every row; pick it with `bucket_width`). [R, T] -> [R, width].

  Nothing a trained token computes changes: trunk slots keep their indices (the prompt's left
  padding stays, and the thinking's padding is at its end), so every `limit` still names the
  same trunk slots; a branch keeps its id, positions and order, and every trained token keeps
  the slot before it (within its thinking or its branch). Only padding queries and padded keys
  go, which no trained token sees. `response_len`, the constant of the loss, is unchanged.
  """
  order = jnp.argsort(jnp.logical_not(_kept(batch)), axis=1, stable=True)[:, :width]
  take = lambda x: jnp.take_along_axis(x, order, axis=1)
  fields = ("tokens", "positions", "branch", "limit", "loss_mask", "old_logp", "advantages",
            "is_summary")
  return batch.replace(**{f: take(getattr(batch, f)) for f in fields})


def ragged(batch: PackedBatch, n_buckets: int, block: int = BLOCK) -> PackedBatch:
  """`compact` to the narrowest of `bucket_widths(T, n_buckets, block)` that holds every row (one
  host fetch of the longest row, global over processes); n_buckets=1: the batch as it is."""
  if n_buckets <= 1:
    return batch
  needed = int(rows_lib.fetch(jnp.max(live_slots(batch))))
  return compact(batch, bucket_width(needed, batch.tokens.shape[1], n_buckets, block))


def token_logprobs(params, cfg: ModelConfig, batch: PackedBatch, temperature: float = 1.0,
                   with_entropy: bool = False, dense: bool = False, mesh=None,
                   chunk: int = LOGIT_CHUNK):
  """One forward over packed rows -> per-slot log-probs [R, T] (slot 0 gets 0) of each token
  given the slot before it, at `temperature`; and per-slot entropy if asked.

  Attention is the blockwise kernel on the rows' (branch, limit) descriptors; `dense` uses the
  full [T, T] tree mask instead (the reference; a padding query then averages uniformly instead
  of giving 0, which no trained slot reads). `mesh`: activations constrained to it (rows over
  (data, fsdp), heads and MLP over tensor). `chunk`: slots per chunk of the log-prob and entropy
  computation (0: the whole row at once, the reference).
  """
  if dense:
    mask = masks.tree_mask(batch.branch, batch.limit)
    attend = lambda q, k, v, s: (dec.attention(q, k, v, mask), s)
  else:
    bs = cfg.attention_block
    attend = lambda q, k, v, s: (attn.packed_attention(q, k, v, batch.branch, batch.limit,
                                                       block_q=bs, block_k=bs), s)
  h, _ = dec.decoder(params, cfg, batch.tokens, batch.positions, attend, [None] * cfg.n_layers,
                     mesh=mesh)
  return logprobs_from_hidden(params, cfg, h, batch.tokens, temperature, with_entropy, chunk)


def _chunk_size(t: int, target: int) -> int:
  """The largest divisor of t that is <= target (t itself when t <= target)."""
  if t <= target:
    return t
  for c in range(target, 0, -1):
    if t % c == 0:
      return c
  return 1


def logprobs_from_hidden(params, cfg: ModelConfig, h, tokens, temperature: float = 1.0,
                         with_entropy: bool = False, chunk: int = LOGIT_CHUNK):
  """Final hidden states [R, T, D] -> log-probs [R, T] of tokens[:, t] given slot t - 1 (slot 0
  gets 0), and the entropy of slot t - 1's distribution if asked.

  With chunk > 0 the slots go `chunk` at a time through a `lax.scan` whose body is
  `jax.checkpoint`ed: the forward keeps only the [R, chunk, V] float32 logits of one chunk, and
  the backward recomputes them chunk by chunk, so a row's whole [T, V] logits (6 GB at the
  paper's shape) never exist. chunk=0: the whole row at once (the reference).
  """
  b, t, _ = h.shape
  dt = cfg.compute_dtype
  # The head weight is cast once, outside the loop over chunks.
  w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
  w = w.astype(dt)
  spec = "bcd,vd->bcv" if cfg.tie_embeddings else "bcd,dv->bcv"
  tgt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # slot t predicts token t + 1

  def piece(w, h_c, tgt_c):
    logits = jnp.einsum(spec, h_c.astype(dt), w, preferred_element_type=jnp.float32)
    logits = logits / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, tgt_c[..., None], axis=-1)[..., 0] - logz
    if not with_entropy:
      return lp, None
    probs = jax.nn.softmax(logits, axis=-1)
    return lp, logz - jnp.sum(probs * logits, axis=-1)

  if chunk <= 0 or chunk >= t:
    lp, ent = piece(w, h, tgt)
  else:
    c = _chunk_size(t, chunk)
    if c < chunk // 4:  # t has no convenient divisor: pad the slots to whole chunks
      c = chunk
    n = -(-t // c)
    pad = n * c - t
    h_p = jnp.pad(h, ((0, 0), (0, pad), (0, 0))) if pad else h
    tgt_p = jnp.pad(tgt, ((0, 0), (0, pad))) if pad else tgt
    hs = jnp.moveaxis(h_p.reshape(b, n, c, h.shape[-1]), 1, 0)
    ts = jnp.moveaxis(tgt_p.reshape(b, n, c), 1, 0)
    body = jax.checkpoint(piece)
    _, (lp, ent) = jax.lax.scan(lambda _, x: (None, body(w, *x)), None, (hs, ts))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * c)[:, :t]
    lp = unchunk(lp)
    ent = None if ent is None else unchunk(ent)
  shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0)))
  if not with_entropy:
    return shift(lp)
  return shift(lp), shift(ent)


def unpack(ro: AnytimeRollout, thinking_adv, summary_adv, summary_train=None) -> PackedBatch:
  """The plain layout, for equivalence tests and benchmarks: every thinking and every branch
  as its own causal sequence [prompt | thinking[:cut] | inserted | summary], right-padded.

  Returns a PackedBatch of R * (1 + m * A) rows (per thinking: its thinking row, then its
  branches in (budget, summary) order) of L = P + b_m + W slots. Thinking tokens are trained in
  the thinking rows, summary tokens in the branch rows; a repeated cut is an empty row.
  """
  packed = pack(ro, thinking_adv, summary_adv, summary_train)
  r, p = ro.prompt.shape
  tt = p + ro.thinking.shape[1]  # trunk slots
  c = ro.summary.shape[1] * ro.summary.shape[2]
  w = packed.branch_width
  length = tt + w
  # Slot t of a branch row reads trunk slot t while t < P + cut, then branch slot t - P - cut.
  t = jnp.arange(length)[None, None]
  cut = jnp.repeat(ro.cuts.length, ro.summary.shape[2], axis=1)[..., None]  # [R, C, 1]
  from_trunk = t < p + cut
  in_range = from_trunk | (t - p - cut < w)
  src = jnp.where(from_trunk, t, tt + t - p - cut)
  src = jnp.clip(src, 0, tt + w - 1)

  def rows(x, fill, thinking_fill=None):
    """[R, T] packed field -> [R * (1 + C), L] unpacked rows."""
    trunk, br = x[:, :tt], x[:, tt:tt + c * w].reshape(r, c, w)
    both = jnp.concatenate([jnp.broadcast_to(trunk[:, None], (r, c, tt)), br], axis=-1)
    b_rows = jnp.where(in_range, jnp.take_along_axis(both, src, axis=-1), fill)
    if thinking_fill is not None:  # thinking tokens are trained in the thinking row only
      b_rows = jnp.where(from_trunk & (t >= p), thinking_fill, b_rows)
    t_row = jnp.pad(trunk, ((0, 0), (0, w)), constant_values=fill)
    return jnp.concatenate([t_row[:, None], b_rows.astype(t_row.dtype)], 1).reshape(
        r * (1 + c), length)

  branch = rows(packed.branch, masks.PAD)
  # A repeated cut has no branch tokens: its whole row is padding.
  has_own = jnp.any(packed.branch[:, tt:tt + c * w].reshape(r, c, w) != masks.PAD, axis=-1)
  has_own = jnp.concatenate([jnp.ones((r, 1), bool), has_own], 1).reshape(-1, 1)
  valid = (branch != masks.PAD) & has_own
  return PackedBatch(
      tokens=rows(packed.tokens, 0),
      positions=masks.positions_from_valid(valid),
      branch=jnp.where(valid, masks.TRUNK, masks.PAD).astype(jnp.int32),
      limit=jnp.where(valid, jnp.arange(1, length + 1)[None], 0).astype(jnp.int32),
      loss_mask=rows(packed.loss_mask, False, False) & valid,
      old_logp=rows(packed.old_logp, 0.0, 0.0),
      advantages=rows(packed.advantages, 0.0, 0.0),
      is_summary=rows(packed.is_summary, False, False),
      prompt_len=p, trunk_len=length, n_branches=0)
