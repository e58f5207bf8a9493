"""The PPO clipped surrogate over trainable tokens with Dr. GRPO aggregation (SPEC §7).

Losses come back as (sum, denominator) pairs so that micro-batch gradient accumulation is exact.
Shapes: B rows (sequences), T tokens.

Accumulating over micro-batches: compute `ppo_loss` per micro-batch, take gradients of each
`loss_sum`, add them, and divide once by the total `loss_denom` (`combine` does the same for the
values). For "seq_mean_token_mean" a sequence must not be split between micro-batches.
"""

from __future__ import annotations

from typing import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp

AGGREGATIONS = ("dr_grpo", "token_mean", "seq_mean_token_mean")
KL_TYPES = ("k1", "k3")


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  # Empty (micro-)batches have a zero denominator and a zero sum: report 0, not NaN.
  return num / jnp.where(den > 0, den, 1.0)


@flax.struct.dataclass
class LossTerms:
  """Additive pieces of the loss of one (micro-)batch; scalars.

  Attributes:
    loss_sum: the numerator of the loss; gradients of it add across micro-batches.
    loss_denom: its denominator (no gradient): sequences x max_len ("dr_grpo"), trainable tokens
      ("token_mean"), or sequences with a trainable token ("seq_mean_token_mean").
    metrics: name -> (sum, denom). Always "pg_loss" (the clipped surrogate alone, aggregated as
      the loss), "clip_frac" (share of trainable tokens whose clipped term was taken, so their
      gradient is cut) and "approx_kl_old" (token mean of 0.5 (logp - old_logp)^2, the k2
      estimate of the KL between the old and new policies); "kl_ref" (token mean of the chosen
      estimator) when ref_logp is given; "entropy" (token mean) when entropy is given.
  """

  loss_sum: jax.Array
  loss_denom: jax.Array
  metrics: dict[str, tuple[jax.Array, jax.Array]]

  @property
  def loss(self) -> jax.Array:
    """The loss value, loss_sum / loss_denom (0 for a batch with nothing to train)."""
    return _ratio(self.loss_sum, self.loss_denom)

  def metric_values(self) -> dict[str, jax.Array]:
    return {k: _ratio(s, d) for k, (s, d) in self.metrics.items()}


def combine(terms: Sequence[LossTerms]) -> LossTerms:
  """Adds the sums and denominators of several micro-batches: exact for every aggregation."""
  if not terms:
    raise ValueError("combine needs at least one LossTerms")
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *terms)


def ppo_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
             agg: str = "dr_grpo", max_len: int | None = None, eps_low: float = 0.2,
             eps_high: float = 0.2, ref_logp: jax.Array | None = None, kl_coef: float = 0.0,
             kl_type: str = "k3", entropy: jax.Array | None = None,
             entropy_coef: float = 0.0) -> LossTerms:
  """PPO clipped surrogate per token, masked and aggregated; jit-compatible.

  Per trainable token, with ratio = exp(logp - old_logp):
    loss_t = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
             + kl_coef * kl_t - entropy_coef * entropy_t
  with kl_t = logp - ref_logp ("k1") or exp(ref_logp - logp) - (ref_logp - logp) - 1 ("k3").
  Aggregation: "dr_grpo" sum / (B x max_len), B counting every row (SPEC §7's constant, so rows
  with no trainable token count too); "token_mean" sum / trainable tokens; "seq_mean_token_mean"
  mean over rows with a trainable token of each row's token mean.

  Args:
    logp: [B, T] float32 log-probabilities of the sampled tokens under the current policy.
    old_logp: [B, T] the same under the policy that sampled them (no gradient flows into it).
    advantages: [B, T] per-token advantages.
    mask: [B, T] bool (or 0/1 float) trainable tokens; values elsewhere (even inf) are ignored.
    agg: one of AGGREGATIONS.
    max_len: the constant maximum response length of "dr_grpo"; required there.
    eps_low: lower clip range.
    eps_high: upper clip range.
    ref_logp: [B, T] reference-policy log-probabilities, for the KL term and its metric.
    kl_coef: weight of the KL to the reference (needs ref_logp when nonzero).
    kl_type: "k1" or "k3".
    entropy: [B, T] per-token entropy of the current policy, for the bonus and its metric.
    entropy_coef: weight of the entropy bonus (needs entropy when nonzero).

  Returns:
    LossTerms; `.loss` is the value to minimise.
  """
  if agg not in AGGREGATIONS:
    raise ValueError(f"agg={agg!r}: expected one of {AGGREGATIONS}")
  if agg == "dr_grpo" and max_len is None:
    raise ValueError("agg='dr_grpo' needs max_len, the constant maximum response length")
  if max_len is not None and max_len <= 0:
    raise ValueError(f"max_len={max_len} must be positive")
  if kl_type not in KL_TYPES:
    raise ValueError(f"kl_type={kl_type!r}: expected one of {KL_TYPES}")
  if ref_logp is None and kl_coef != 0:
    raise ValueError(f"kl_coef={kl_coef} needs ref_logp")
  if entropy is None and entropy_coef != 0:
    raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy")
  optional = [x for x in (ref_logp, entropy) if x is not None]
  # A [B, T] vs [T] or [B, 1] mismatch would broadcast silently.
  chex.assert_rank(logp, 2)
  chex.assert_equal_shape([logp, old_logp, advantages, mask, *optional])

  keep = mask.astype(bool)
  w = keep.astype(jnp.float32)
  # Zero the differences at masked positions before exp: -inf padding would otherwise give NaN
  # values, and NaN gradients through the unselected branch of a later where.
  log_ratio = jnp.where(keep, logp - jax.lax.stop_gradient(old_logp), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.where(keep, jnp.maximum(unclipped, clipped), 0.0)
  per_token = pg

  n_tokens = w.sum()
  metrics = {
      "clip_frac": ((w * (clipped > unclipped)).sum(), n_tokens),
      "approx_kl_old": ((w * 0.5 * log_ratio**2).sum(), n_tokens),
  }
  if ref_logp is not None:
    d = jnp.where(keep, logp - jax.lax.stop_gradient(ref_logp), 0.0)
    kl = d if kl_type == "k1" else jnp.exp(-d) + d - 1.0
    kl = jnp.where(keep, kl, 0.0)
    per_token = per_token + kl_coef * kl
    metrics["kl_ref"] = (kl.sum(), n_tokens)
  if entropy is not None:
    ent = jnp.where(keep, entropy, 0.0)
    per_token = per_token - entropy_coef * ent
    metrics["entropy"] = (ent.sum(), n_tokens)

  def aggregate(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if agg == "dr_grpo":
      return x.sum(), jnp.asarray(x.shape[0] * max_len, jnp.float32)
    if agg == "token_mean":
      return x.sum(), n_tokens
    row_tokens = w.sum(-1)
    row_means = _ratio(x.sum(-1), row_tokens)  # Empty rows give 0 and are not counted below.
    return row_means.sum(), (row_tokens > 0).sum().astype(jnp.float32)

  metrics["pg_loss"] = aggregate(pg)
  loss_sum, loss_denom = aggregate(per_token)
  return LossTerms(loss_sum=loss_sum, loss_denom=loss_denom, metrics=metrics)
