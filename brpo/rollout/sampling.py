"""Jitted sampling: prefill, then a `lax.while_loop` decode over a static-shape KV cache.

Strategies are small frozen dataclasses; stop conditions are token sequences (one id for
`</think>` in R1-style vocabularies, several for models without that token). Log-probs are
float32, at the sampling temperature (the PPO ratio's old policy). Shapes: B rows, P padded prompt
length, N new tokens, S = P + N cache slots, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import decoder as dec
from models import masks
from models.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Strategies: (rng, logits [B, V] float32) -> tokens [B]. `temperature` scales the log-probs.


@dataclasses.dataclass(frozen=True)
class Greedy:
  temperature: float = 1.0

  def __call__(self, rng, logits):
    del rng
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float = 1.0

  def __call__(self, rng, logits):
    return jax.random.categorical(rng, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int
  temperature: float = 1.0

  def __call__(self, rng, logits):
    kth = jax.lax.top_k(logits, self.k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / self.temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: the smallest set of tokens whose probability mass reaches `p`."""

  p: float
  temperature: float = 1.0

  def __call__(self, rng, logits):
    scaled = logits / self.temperature
    sorted_logits = jnp.sort(scaled, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the mass strictly before it is < p (so the top token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(before < self.p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def make_strategy(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
  """The strategy for the usual (temperature, top_p, top_k) knobs; temperature 0 is greedy."""
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(f"bad sampling settings temperature={temperature} top_p={top_p} "
                     f"top_k={top_k}")
  if temperature == 0:
    return Greedy()
  if top_k:
    return TopK(top_k, temperature)
  if top_p < 1:
    return TopP(top_p, temperature)
  return Temperature(temperature)


def token_logprobs(logits, tokens, temperature: float = 1.0):
  """log softmax(logits / temperature) at `tokens`, in float32. logits [..., V], tokens [...]."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]


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
  written: jax.Array  # scalar int32
  rng: jax.Array

  @property
  def done(self):
    return self.stop_reason >= 0


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array  # [B, N] int32 generated tokens, pad_id after the end
  logprobs: jax.Array  # [B, N] float32 log-probs at the sampling temperature
  lengths: jax.Array  # [B] generated tokens, the stop sequence included
  stop_reason: jax.Array  # [B] index into stop_sequences, or -1 (hit max_new_tokens)


def _record(state: SampleState, logits, i, strategy, stops, pad_id, n_new):
  """Samples token i (0-based) for every row still running, from logits [B, V]."""
  rng, key = jax.random.split(state.rng)
  tok = strategy(key, logits)
  lp = token_logprobs(logits, tok, strategy.temperature)
  live = ~state.done & (i < n_new)
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


@functools.partial(jax.jit, static_argnames=("cfg", "n_new", "strategy", "pad_id"))
def prefill_jit(params, cfg: ModelConfig, prompt, valid, stops, rng, *, n_new: int, strategy,
                pad_id: int) -> SampleState:
  """Prefills the prompt [B, P] into a fresh cache of P + n_new slots and samples token 0."""
  b, p = prompt.shape
  cache = dec.init_cache(cfg, b, p + n_new)
  positions = masks.positions_from_valid(valid)
  logits, cache = dec.prefill(params, cfg, prompt, positions, masks.causal_mask(valid), cache)
  w = stops.shape[1]
  state = SampleState(
      cache=cache, tokens=jnp.full((b, n_new), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, n_new), jnp.float32), lengths=jnp.zeros((b,), jnp.int32),
      stop_reason=jnp.full((b,), -1, jnp.int32), recent=jnp.full((b, w), -1, jnp.int32),
      start=jnp.argmax(valid, axis=1).astype(jnp.int32),
      n_prompt=jnp.sum(valid, axis=1).astype(jnp.int32), written=jnp.int32(0), rng=rng)
  return _record(state, logits, 0, strategy, stops, pad_id, n_new)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "pad_id", "write_last"),
                   donate_argnames=("state",))
def decode_jit(params, cfg: ModelConfig, state: SampleState, stops, *, strategy, pad_id: int,
               write_last: bool) -> SampleState:
  """Decodes until every row has stopped or produced N tokens.

  With `write_last`, the keys/values of every generated token (the last and the stop tokens
  included) end up in the cache, as the anytime summaries need; otherwise the loop stops as soon
  as all tokens are sampled.
  """
  p = state.cache.length - state.tokens.shape[1]
  n_new = state.tokens.shape[1]
  slots = jnp.arange(state.cache.length)

  def cond(s: SampleState):
    pending = s.lengths > s.written if write_last else (~s.done & (s.lengths < n_new))
    return (s.written < n_new) & jnp.any(pending)

  def body(s: SampleState):
    i = s.written
    tok = jax.lax.dynamic_slice_in_dim(s.tokens, i, 1, axis=1)  # [B, 1]
    pos = (s.n_prompt + i)[:, None]
    kv_mask = ((slots[None] >= s.start[:, None]) & (slots[None] <= p + i))[:, None, :]
    logits, cache = dec.decode_step(params, cfg, tok, pos, s.cache, p + i, kv_mask)
    s = s.replace(cache=cache, written=i + 1)
    return _record(s, logits[:, 0], i + 1, strategy, stops, pad_id, n_new)

  return jax.lax.while_loop(cond, body, state)


def sample(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           strategy=Greedy(), stop_sequences: Sequence[Sequence[int]] = (), rng=None, *,
           pad_id: int = 0, prompt_length: int | None = None, bucket: int = 64,
           write_last: bool = False, return_state: bool = False):
  """Samples up to `max_new_tokens` after each prompt.

  Args:
    prompts: B token lists (no padding); left-padded to a bucketed length P.
    stop_sequences: token sequences that end a row (e.g. [think_end_ids, [eos_id]]).
    rng: a PRNG key (required unless the strategy is greedy).
    prompt_length: pad to exactly this length instead of the bucket.
    write_last: also write the last generated token into the cache (anytime summaries read it).
    return_state: also return the final SampleState (its KV cache holds prompt + generation).
  Returns:
    SampleOutput with tokens/logprobs [B, N], lengths/stop_reason [B] (and the state).
  """
  tokens, valid = pad_prompts(prompts, pad_id, prompt_length, bucket)
  return sample_padded(params, cfg, tokens, valid, max_new_tokens, strategy, stop_sequences, rng,
                       pad_id=pad_id, write_last=write_last, return_state=return_state)


def sample_padded(params, cfg: ModelConfig, tokens, valid, max_new_tokens: int,
                  strategy=Greedy(), stop_sequences: Sequence[Sequence[int]] = (), rng=None, *,
                  pad_id: int = 0, write_last: bool = False, return_state: bool = False):
  """`sample` from left-padded prompts: tokens, valid [B, P] (numpy, or global arrays whose rows
  are split over processes: the outputs then keep the rows where they are)."""
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
  state = prefill_jit(params, cfg, tokens, valid, stops, rng, n_new=max_new_tokens,
                      strategy=strategy, pad_id=pad_id)
  state = decode_jit(params, cfg, state, stops, strategy=strategy, pad_id=pad_id,
                     write_last=write_last)
  out = SampleOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths,
                     stop_reason=state.stop_reason)
  return (out, state) if return_state else out
