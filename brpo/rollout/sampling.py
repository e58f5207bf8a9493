"""Jitted sampling: prefill, then a `lax.while_loop` decode over a static-shape KV cache that
reads only the filled cache blocks.

Strategies are small frozen dataclasses; stop conditions are token sequences (one id for
`</think>` in R1-style vocabularies, several for models without that token). Log-probs are
float32, at the sampling temperature (the PPO ratio's old policy). Shapes: B rows, P padded prompt
length, N new tokens, S = P + N cache slots, V vocab.

Random keys: one key (the batch is sampled with one draw per step, as it always was) or per-row
keys [B, 2] (row b's step-i draw uses fold_in(key_b, i), so a row's sample does not depend on
which other rows share its batch: chunked rollouts and compacted batches need this).

On a mesh (prompts given as global arrays with a NamedSharding, or `mesh=`), the KV cache is
sharded explicitly: rows over the batch axes (data, fsdp), kv heads over tensor where they
divide (`CACHE_AXES`), and the decoder's activations are constrained to the same mesh.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from brpo import rows as rows_lib
from brpo.rollout.strategies import (  # noqa: F401  (re-exported: sampling.Greedy, ...)
    Greedy, Temperature, TopK, TopP, draw, make_strategy, per_row, row_keys, step_keys,
    token_logprobs)
from models import attention as attn
from models import decoder as dec
from models import masks
from models import sharding as shd
from models.config import ModelConfig

# Logical axes of a cache buffer [B, K, S, Dh] (models.sharding.ACTIVATION_RULES).
CACHE_AXES = dec.CACHE_AXES


def mesh_of(x):
  """The mesh of a global array laid out on more than one device (None otherwise)."""
  sharding = getattr(x, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return mesh if mesh is not None and mesh.size > 1 else None


def constrain_cache(cache: dec.KVCache, mesh) -> dec.KVCache:
  """The cache with every buffer constrained to CACHE_AXES on `mesh` (no-op without one)."""
  c = lambda x: shd.constrain(x, mesh, CACHE_AXES)
  return dec.KVCache(k=tuple(map(c, cache.k)), v=tuple(map(c, cache.v)))

# ---------------------------------------------------------------------------------------------
# Stop sequences.


def stop_array(stop_sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """Right-aligned [n_stop, W] int32 array of stop sequences, left-padded with -1."""
  if not stop_sequences or any(len(s) == 0 for s in stop_sequences):
    raise ValueError(f"stop sequences must be non-empty: {stop_sequences}")
  w = max(len(s) for s in stop_sequences)
  out = np.full((len(stop_sequences), w), -1, np.int32)
  for i, s in enumerate(stop_sequences):
    out[i, w - len(s):] = s
  return out


def match_stop(recent, stops):
  """recent [B, W] last tokens (newest last), stops [n, W] -> index of the matching stop
  sequence per row, or -1. A -1 in `recent` (not yet generated) matches nothing."""
  eq = (recent[:, None, :] == stops[None]) | (stops[None] == -1)
  hit = jnp.all(eq, axis=-1)  # [B, n]
  return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Prompts: left padding to a length bucket, so that batches of similar length share a compile.


def bucket_length(n: int, bucket: int = 64) -> int:
  """The padded prompt length for a prompt of n tokens: the next power of two up to `bucket`,
  then the next multiple of `bucket`."""
  if n <= bucket:
    p = 8
    while p < n:
      p *= 2
    return p
  return -(-n // bucket) * bucket


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None,
                bucket: int = 64):
  """Left-pads token lists -> (tokens [B, P] int32, valid [B, P] bool)."""
  if not prompts:
    raise ValueError("no prompts to sample from")
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ValueError("empty prompt (0 tokens)")
  length = bucket_length(longest, bucket) if length is None else length
  if longest > length:
    raise ValueError(f"prompt of {longest} tokens is longer than the padded length {length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    valid[i, length - len(p):] = True
  return tokens, valid


# ---------------------------------------------------------------------------------------------
# The sampler.


@flax.struct.dataclass
class SampleState:
  """Decode loop state. `written` tokens of every row have their keys/values in the cache."""

  cache: dec.KVCache
  tokens: jax.Array  # [B, N] int32, pad after the end
  logprobs: jax.Array  # [B, N] float32, 0 after the end
  lengths: jax.Array  # [B] tokens generated (the stop sequence included)
  stop_reason: jax.Array  # [B] index of the stop sequence that ended the row, -1 if none
  recent: jax.Array  # [B, W] the last W tokens (newest last), for stop matching
  start: jax.Array  # [B] first valid prompt slot (left padding before it)
  n_prompt: jax.Array  # [B] number of valid prompt tokens
  limit: jax.Array  # [B] most tokens this row may generate (<= N)
  written: jax.Array  # scalar int32
  rng: jax.Array  # one key, or per-row keys [B, 2]

  @property
  def done(self):
    return self.stop_reason >= 0

  def pending(self, write_last: bool):
    """[B] rows that still need a decode step."""
    if write_last:
      return self.lengths > self.written
    return ~self.done & (self.lengths < self.limit)


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # [B, N] int32 generated tokens, pad_id after the end
  logprobs: jax.Array  # [B, N] float32 log-probs at the sampling temperature
  lengths: jax.Array  # [B] generated tokens, the stop sequence included
  stop_reason: jax.Array  # [B] index into stop_sequences, or -1 (hit its token limit)


def _record(state: SampleState, logits, i, strategy, stops, pad_id, n_new):
  """Samples token i (0-based) for every row still running, from logits [B, V]."""
  rng, key = step_keys(state.rng, i)
  tok = strategy(key, logits)
  lp = token_logprobs(logits, tok, strategy.temperature)
  live = ~state.done & (i < state.limit)
  tok = jnp.where(live, tok, pad_id)
  lp = jnp.where(live, lp, 0.0)
  col = jnp.minimum(i, n_new - 1)
  tokens = state.tokens.at[:, col].set(jnp.where(live, tok, state.tokens[:, col]))
  logprobs = state.logprobs.at[:, col].set(jnp.where(live, lp, state.logprobs[:, col]))
  recent = jnp.where(live[:, None], jnp.concatenate([state.recent[:, 1:], tok[:, None]], 1),
                     state.recent)
  hit = match_stop(recent, stops)
  stop_reason = jnp.where(live & (hit >= 0), hit, state.stop_reason)
  return state.replace(tokens=tokens, logprobs=logprobs, recent=recent, rng=rng,
                       stop_reason=stop_reason, lengths=state.lengths + live.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "n_new", "strategy", "pad_id", "dense",
                                             "block", "chunk", "mesh"))
def prefill_jit(params, cfg: ModelConfig, prompt, valid, stops, rng, limit=None, *, n_new: int,
                strategy, pad_id: int, dense: bool = False, block: int | None = None,
                chunk: int | None = None, mesh=None) -> SampleState:
  """Prefills the prompt [B, P] into a fresh cache of P + n_new slots and samples token 0.
  limit: optional [B] per-row token limits (<= n_new). mesh: shard the cache (CACHE_AXES).

  The prompt runs in chunks of `chunk` tokens (None: cfg.prefill_chunk, --prefill_chunk), each
  attending over the filled cache with the decode kernel (key block `block`, None:
  cfg.decode_block): memory linear in P (`models.decoder.prefill_chunked`). dense=True is the
  one-pass masked attention over the whole prompt it replaces (the reference for tests)."""
  b, p = prompt.shape
  cache = constrain_cache(dec.init_cache(cfg, b, p + n_new), mesh)
  positions = masks.positions_from_valid(valid)
  start = jnp.argmax(valid, axis=1).astype(jnp.int32)
  if dense:
    logits, cache = dec.prefill(params, cfg, prompt, positions, masks.causal_mask(valid), cache,
                                mesh=mesh)
  else:
    logits, cache = dec.prefill_chunked(
        params, cfg, prompt, positions, start, cache, mesh=mesh, block=key_block(cfg, block),
        chunk=cfg.prefill_chunk if chunk is None else chunk)
  cache = constrain_cache(cache, mesh)
  w = stops.shape[1]
  limit = (jnp.full((b,), n_new, jnp.int32) if limit is None
           else jnp.minimum(jnp.asarray(limit, jnp.int32), n_new))
  state = SampleState(
      cache=cache, tokens=jnp.full((b, n_new), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, n_new), jnp.float32), lengths=jnp.zeros((b,), jnp.int32),
      stop_reason=jnp.full((b,), -1, jnp.int32), recent=jnp.full((b, w), -1, jnp.int32),
      start=start, n_prompt=jnp.sum(valid, axis=1).astype(jnp.int32), limit=limit,
      written=jnp.int32(0),
      rng=rng)
  return _record(state, logits, 0, strategy, stops, pad_id, n_new)


def key_block(cfg: ModelConfig, block: int | None) -> int:
  """The decode attention's key block: `block`, or cfg.decode_block (--decode_block) if None."""
  return cfg.decode_block if block is None else block


def decode_step(params, cfg: ModelConfig, tok, pos, cache: dec.KVCache, index, start, *,
                dense: bool = False, block: int | None = None, mesh=None):
  """One token per row: writes its keys/values at cache slot `index` and attends over slots
  [start, index] only. tok, pos [B, 1]; start [B] -> (logits [B, V], cache).

  The filled-only attention (`models.attention.decode_attention`) reads the cache blocks up to
  the current length, not all S slots; `dense=True` is the whole-cache masked attention it
  replaces (kept as the reference for tests). block: its key block (None: cfg.decode_block)."""
  if dense:
    slots = jnp.arange(cache.length)
    kv_mask = ((slots[None] >= start[:, None]) & (slots[None] <= index))[:, None, :]
    logits, cache = dec.decode_step(params, cfg, tok, pos, cache, index, kv_mask, mesh=mesh)
    return logits[:, 0], constrain_cache(cache, mesh)

  def attend(q, k, v, kv):
    ck, cv = dec.write_cache(kv[0], k, index), dec.write_cache(kv[1], v, index)
    return attn.decode_attention(q, ck, cv, start, index + 1, block=key_block(cfg, block)), (ck, cv)

  h, states = dec.decoder(params, cfg, tok, pos, attend, list(zip(cache.k, cache.v)), mesh=mesh)
  new = dec.KVCache(k=tuple(s[0] for s in states), v=tuple(s[1] for s in states))
  return dec.logits_from_hidden(params, cfg, h[:, 0]), constrain_cache(new, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "pad_id", "write_last", "dense",
                                             "block", "mesh"),
                   donate_argnames=("state",))
def decode_jit(params, cfg: ModelConfig, state: SampleState, stops, until=None, *, strategy,
               pad_id: int, write_last: bool, dense: bool = False, block: int | None = None,
               mesh=None) -> SampleState:
  """Decodes until every row has stopped or produced its tokens (or `written` reaches `until`,
  a traced step count: the loop can be run in chunks of steps).

  With `write_last`, the keys/values of every generated token (the last and the stop tokens
  included) end up in the cache, as the anytime summaries need; otherwise the loop stops as soon
  as all tokens are sampled.
  """
  p = state.cache.length - state.tokens.shape[1]
  n_new = state.tokens.shape[1]
  until = n_new if until is None else jnp.minimum(until, n_new)

  def cond(s: SampleState):
    return (s.written < until) & jnp.any(s.pending(write_last))

  def body(s: SampleState):
    i = s.written
    tok = jax.lax.dynamic_slice_in_dim(s.tokens, i, 1, axis=1)  # [B, 1]
    pos = (s.n_prompt + i)[:, None]
    logits, cache = decode_step(params, cfg, tok, pos, s.cache, p + i, s.start, dense=dense,
                                block=block, mesh=mesh)
    s = s.replace(cache=cache, written=i + 1)
    return _record(s, logits, i + 1, strategy, stops, pad_id, n_new)

  return jax.lax.while_loop(cond, body, state)


# Compaction: between chunks of decode steps, the rows still running are gathered into the
# smallest bucket (a power of two, at least `min_bucket`) that holds them, so the long tail of a
# few long rows does not pay for the whole batch. Every bucket size is one more compilation.


def _rows_of(state: SampleState):
  """The per-row fields of a state (everything but `written`, and `rng` unless per row)."""
  names = ["cache", "tokens", "logprobs", "lengths", "stop_reason", "recent", "start",
           "n_prompt", "limit"] + (["rng"] if per_row(state.rng) else [])
  return {k: getattr(state, k) for k in names}


@functools.partial(jax.jit, static_argnames=("mesh",))
def _gather_rows(state: SampleState, idx, mesh=None) -> SampleState:
  state = state.replace(**jax.tree.map(lambda x: x[idx], _rows_of(state)))
  return state.replace(cache=constrain_cache(state.cache, mesh))


@functools.partial(jax.jit, donate_argnames=("full",))
def _scatter_rows(full: SampleState, part: SampleState, idx) -> SampleState:
  rows = jax.tree.map(lambda f, x: f.at[idx].set(x), _rows_of(full), _rows_of(part))
  return full.replace(written=part.written, **rows)


def bucket_rows(n: int, batch: int, min_bucket: int = 8) -> int:
  """The compacted batch size for n running rows out of `batch`."""
  b = min_bucket
  while b < n:
    b *= 2
  return min(b, batch)


def _decode_compacting(params, cfg, state: SampleState, stops, *, chunk: int, min_bucket: int,
                       **kw) -> SampleState:
  """`decode_jit` in chunks of `chunk` steps, compacting the running rows between chunks.

  Every process takes the same decision from the whole batch's state (`rows.fetch`): with rows
  split over processes, the gathers and scatters move rows between them."""
  write_last = kw["write_last"]
  batch = state.lengths.shape[0]
  full, cur, idx = None, state, np.arange(batch)
  written = int(rows_lib.fetch(cur.written))
  while True:
    cur = decode_jit(params, cfg, cur, stops, np.int32(written + chunk), **kw)
    written, pending = rows_lib.fetch((cur.written, cur.pending(write_last)))
    written = int(written)
    if not pending.any() or written >= cur.tokens.shape[1]:
      break
    size = bucket_rows(int(pending.sum()), batch, min_bucket)
    if size >= len(idx):
      continue
    # Live rows first, then finished rows as filler (they are done: the loop skips them, and
    # scattering them back changes nothing that is read).
    order = np.concatenate([np.flatnonzero(pending), np.flatnonzero(~pending)])[:size]
    full = cur if full is None else _scatter_rows(full, cur, idx)
    idx = idx[order]
    cur = _gather_rows(full, idx, kw["mesh"])
  return cur if full is None else _scatter_rows(full, cur, idx)


def sample(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           strategy=Greedy(), stop_sequences: Sequence[Sequence[int]] = (), rng=None, *,
           pad_id: int = 0, prompt_length: int | None = None, bucket: int = 64,
           write_last: bool = False, return_state: bool = False, **kw):
  """Samples up to `max_new_tokens` after each prompt.

  Args:
    prompts: B token lists (no padding); left-padded to a bucketed length P.
    stop_sequences: token sequences that end a row (e.g. [think_end_ids, [eos_id]]).
    rng: a PRNG key, or per-row keys [B, 2] (required unless the strategy is greedy).
    prompt_length: pad to exactly this length instead of the bucket.
    write_last: also write the last generated token into the cache (anytime summaries read it).
    return_state: also return the final SampleState (its KV cache holds prompt + generation).
    **kw: `sample_padded`'s keywords (limit, compact_every, min_bucket, dense, block, mesh).
  Returns:
    SampleOutput with tokens/logprobs [B, N], lengths/stop_reason [B] (and the state).
  """
  tokens, valid = pad_prompts(prompts, pad_id, prompt_length, bucket)
  return sample_padded(params, cfg, tokens, valid, max_new_tokens, strategy, stop_sequences, rng,
                       pad_id=pad_id, write_last=write_last, return_state=return_state, **kw)


def sample_padded(params, cfg: ModelConfig, tokens, valid, max_new_tokens: int,
                  strategy=Greedy(), stop_sequences: Sequence[Sequence[int]] = (), rng=None, *,
                  pad_id: int = 0, write_last: bool = False, return_state: bool = False,
                  limit=None, compact_every: int = 0, min_bucket: int = 8, dense: bool = False,
                  block: int | None = None, mesh=None):
  """`sample` from left-padded prompts: tokens, valid [B, P] (numpy, or global arrays whose rows
  are split over devices and processes: the outputs then keep the rows where they are).

  limit: optional [B] per-row token limits (a row stops there with stop_reason -1).
  compact_every: 0 decodes in one loop over the whole batch. n > 0 decodes in chunks of n steps
    and, between chunks, moves the rows still running into a smaller batch bucket
    (`bucket_rows`, at least `min_bucket` rows; on a mesh a multiple of its data x fsdp size,
    so that the rows stay split over the devices), so finished rows stop costing. Needs per-row
    keys or greedy decoding (a batch key's draw depends on the batch shape).
  dense: the reference attention: the prompt in one masked pass (not in chunks) and decode
    over the whole cache (the pre-#13 path) instead of the filled blocks.
  block: the key block of the filled-only attention (None: cfg.decode_block).
  mesh: shard the KV cache and the activations over this mesh (default: the mesh `tokens` is
    laid out on, if any; see CACHE_AXES).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if tokens.shape[1] + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt ({tokens.shape[1]} padded) + {max_new_tokens} new tokens exceeds "
                     f"the model's max_seq_len={cfg.max_seq_len}")
  stops = stop_array(stop_sequences or [[-2]])  # -2 never matches a sampled token
  if rng is None:
    if not isinstance(strategy, Greedy):
      raise ValueError(f"sampling with {strategy} needs an rng key (only Greedy() runs without)")
    rng = jax.random.PRNGKey(0)  # Never read by greedy decoding; the loop state needs a key.
  if per_row(rng) and rng.shape[0] != tokens.shape[0]:
    raise ValueError(f"{rng.shape[0]} per-row keys for {tokens.shape[0]} rows")
  if compact_every and not (per_row(rng) or isinstance(strategy, Greedy)):
    raise ValueError("compact_every needs per-row keys (sampling.row_keys) or greedy decoding: "
                     "a single key's draws depend on the batch size")
  mesh = mesh if mesh is not None else mesh_of(tokens)
  if mesh is not None:
    ways = rows_lib.batch_ways(mesh)
    min_bucket = -(-min_bucket // ways) * ways
  state = prefill_jit(params, cfg, tokens, valid, stops, rng, limit, n_new=max_new_tokens,
                      strategy=strategy, pad_id=pad_id, dense=dense, block=block, mesh=mesh)
  kw = dict(strategy=strategy, pad_id=pad_id, write_last=write_last, dense=dense, block=block,
            mesh=mesh)
  if compact_every:
    state = _decode_compacting(params, cfg, state, stops, chunk=compact_every,
                               min_bucket=min_bucket, **kw)
  else:
    state = decode_jit(params, cfg, state, stops, **kw)
  out = SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths,
                     stop_reason=state.stop_reason)
  return (out, state) if return_state else out
