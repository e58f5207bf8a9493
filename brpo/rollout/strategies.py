"""Sampling strategies (small frozen dataclasses: greedy, temperature, top-k, top-p with a top-k
preselected nucleus), their log-probs, and the per-row random keys of the sampler.

One key samples the whole batch with one draw per step; per-row keys [B, 2] make row b's step-i
draw fold_in(key_b, i), so a row's sample does not depend on the other rows of its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Strategies: (rng, logits [B, V] float32) -> tokens [B]. `temperature` scales the log-probs.

# `rng` is one key, or per-row keys [B, 2] (see `draw`).


def per_row(rng) -> bool:
  """True when `rng` holds one key per row ([B, 2] raw or [B] typed keys)."""
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim > (0 if typed else 1)


def draw(rng, logits):
  """A categorical draw per row from logits [B, V]: one batch key, or per-row keys."""
  if per_row(rng):
    return jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(rng, logits)
  return jax.random.categorical(rng, logits, axis=-1)


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
    return draw(rng, logits / self.temperature).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int
  temperature: float = 1.0

  def __call__(self, rng, logits):
    kth = jax.lax.top_k(logits, self.k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    return draw(rng, logits / self.temperature).astype(jnp.int32)


def _nucleus_threshold(sorted_logits, lse, p):
  """The smallest kept logit of the nucleus from logits sorted descending [B, k] (k <= V) and
  the log-normaliser of all V logits [B, 1]. Also whether the nucleus lies in these k."""
  probs = jnp.exp(sorted_logits - lse)
  cum = jnp.cumsum(probs, axis=-1)
  # Keep a token when the mass strictly before it is < p (so the top token always stays).
  n_keep = jnp.sum(cum - probs < p, axis=-1, keepdims=True)
  fits = cum[..., -1:] >= p
  return jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1), fits


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus sampling: the smallest set of tokens whose probability mass reaches `p`.

  The nucleus is looked for among the `k` largest logits (`lax.top_k`, no sort of the
  vocabulary); only when it is larger than that for some row does the step fall back to a full
  sort (`k=0`: always sort). Both find the same threshold, and then draw from the same masked
  logits with the same key, so the samples are the same.
  """

  p: float
  temperature: float = 1.0
  k: int = 256

  def threshold(self, scaled):
    """scaled logits [B, V] -> the nucleus's smallest logit [B, 1]."""
    m = jnp.max(scaled, axis=-1, keepdims=True)
    lse = m + jnp.log(jnp.sum(jnp.exp(scaled - m), axis=-1, keepdims=True))

    def by_sort(_):
      return _nucleus_threshold(jnp.sort(scaled, axis=-1)[..., ::-1], lse, self.p)[0]

    if not self.k or self.k >= scaled.shape[-1]:
      return by_sort(None)
    th, fits = _nucleus_threshold(jax.lax.top_k(scaled, self.k)[0], lse, self.p)
    return jax.lax.cond(jnp.all(fits), lambda _: th, by_sort, None)

  def __call__(self, rng, logits):
    scaled = logits / self.temperature
    scaled = jnp.where(scaled < self.threshold(scaled), -jnp.inf, scaled)
    return draw(rng, scaled).astype(jnp.int32)


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
  """log softmax(logits / temperature) at `tokens`, in float32. logits [..., V], tokens [...].

  Written as (x_t - max) - log(sum(exp(x - max))), the same arithmetic as `jax.nn.log_softmax`,
  but as reductions that fuse into one read of the logits: no [.., V] log-softmax is stored.
  """
  x = logits.astype(jnp.float32) / temperature
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  shifted_t = jnp.take_along_axis(x, tokens[..., None], axis=-1) - m
  return (shifted_t - jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def step_keys(rng, i):
  """The keys of draw number i: per-row keys -> fold_in(key_b, i) per row; one batch key ->
  (next batch key, this step's key) by splitting, as the sampler always did."""
  if per_row(rng):
    return rng, jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, i)
  return tuple(jax.random.split(rng))


def row_keys(rng, rows):
  """Per-row keys [len(rows), 2] for global row indices `rows` (independent of chunking)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.asarray(rows, jnp.uint32))
