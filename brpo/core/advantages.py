"""Advantages of BRPO: dense returns and baselines for thinking segments, and the decoupled
summary baseline (SPEC §5, §6), plus the map from segment advantages to thinking tokens.

Every function takes numpy or JAX arrays and returns the same kind: numpy in, numpy out (float64
stays float64, handy for exact tests and host-side analysis); JAX arrays or tracers in, JAX out
(jit-compatible). Shapes: N questions, G thinkings per question (a group), m budgets, A summaries
per cut, B rows, T tokens.

Cuts that share a context: a thinking that ended at or before b_j has the same cut for budgets
j, j+1, ..., m, and one set of A summaries serves them all; the caller repeats those rewards for
each such budget. That is right for the thinking advantages (r_j is the same number for every
such budget), but the summaries themselves exist once: train their tokens once, i.e. mask the
repeats with `dedup_mask` before packing (otherwise they get (m - j + 1) times the weight).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

BASELINES = ("brpo", "v1only", "v2only", "none")
Array = Any  # np.ndarray or jax.Array.


def _xp(*arrays):
  """jnp if any input is a JAX array (or tracer), else numpy."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def returns_and_baselines(cut_rewards: Array, probs: Array, baseline: str = "brpo",
                          lam: float = 0.5) -> tuple[Array, Array]:
  """Dense returns R and baselines V of every thinking segment (SPEC §5).

  With s 1-based:
    R_s  = sum_{j >= s} P_j r_j
    V2_s = mean over the G thinkings of the group of R_s (the thinking itself included; 0 when
           G = 1, as in the official code)
    V1_s = [sum_{j < s} lam^(s-j) r_j / sum_{j < s} lam^(s-j)] * sum_{j >= s} P_j,  V1_1 = 0
    brpo: V_s = ((s - 1) / m) V1_s + ((m - s + 1) / m) V2_s
  and "v1only" (V = V1), "v2only" (V = V2), "none" (V = 0).

  Args:
    cut_rewards: [N, G, m] r_j, the mean summary reward at cut j of each thinking. For a thinking
      that ended at or before b_j, budgets j..m repeat that one cut's reward.
    probs: [m] the prior P_j.
    baseline: one of BASELINES.
    lam: the decay lambda > 0 of the budget-relative baseline V1.

  Returns:
    (R, V), both [N, G, m]. Advantages are R - V; Var(R - V) / Var(R) measures what the
    baseline removes (`relative_variance`).
  """
  if baseline not in BASELINES:
    raise ValueError(f"baseline={baseline!r}: expected one of {BASELINES}")
  if isinstance(lam, (int, float)) and not lam > 0:
    raise ValueError(f"lam={lam}: the decay of the budget-relative baseline must be > 0")
  xp = _xp(cut_rewards, probs)
  r = xp.asarray(cut_rewards)
  p = xp.asarray(probs)
  chex.assert_rank(r, 3)
  m = r.shape[-1]
  # A wrong-length prior would broadcast silently against m == 1, or fail obscurely elsewhere.
  chex.assert_shape(p, (m,))

  tail_p = xp.flip(xp.cumsum(xp.flip(p, 0), 0), 0)  # [m] sum_{j >= s} P_j
  returns = xp.flip(xp.cumsum(xp.flip(p * r, -1), -1), -1)  # [N, G, m]
  if baseline == "none":
    return returns, xp.zeros_like(returns)

  v2 = xp.broadcast_to(xp.mean(returns, axis=1, keepdims=True), returns.shape)
  if r.shape[1] == 1:  # A group of one has no group baseline (as the official code: V2 = 0).
    v2 = xp.zeros_like(returns)
  if baseline == "v2only":
    return returns, v2

  # weights[s, j] = lam^(s - j) for j < s, else 0; rows normalised (row 0 stays all zero). Made
  # from elementwise ops, not a matmul, so no matmul precision setting can round it.
  s_idx = np.arange(m)[:, None]
  j_idx = np.arange(m)[None, :]
  earlier = j_idx < s_idx
  powers = xp.where(earlier, lam ** np.where(earlier, s_idx - j_idx, 0).astype(np.float64), 0.0)
  row_sum = powers.sum(-1, keepdims=True)
  weights = powers / xp.where(row_sum > 0, row_sum, 1.0)  # [m, m]
  earlier_mean = (r[..., None, :] * weights).sum(-1)  # [N, G, m]
  v1 = (earlier_mean * tail_p).astype(returns.dtype)
  if baseline == "v1only":
    return returns, v1

  s1 = np.arange(1, m + 1)  # 1-based segment index.
  mix_v1 = ((s1 - 1) / m).astype(np.float64)
  v = (mix_v1 * v1 + (1.0 - mix_v1) * v2).astype(returns.dtype)
  return returns, v


def thinking_advantages(cut_rewards: Array, probs: Array, baseline: str = "brpo",
                        lam: float = 0.5) -> Array:
  """Advantage A_s = R_s - V_s of each thinking segment (SPEC §5); no std normalisation.

  Args:
    cut_rewards: [N, G, m] mean summary reward at each cut.
    probs: [m] the prior P_j.
    baseline: "brpo", "v1only", "v2only" or "none".
    lam: decay of the budget-relative baseline.

  Returns:
    [N, G, m]: the advantage of every thinking token in segment s is [..., s].
  """
  returns, baselines = returns_and_baselines(cut_rewards, probs, baseline, lam)
  return returns - baselines


def relative_variance(returns: Array, baselines: Array, valid: Array | None = None) -> Array:
  """Var(R - V) / Var(R) per segment, pooled over all N x G thinkings (SPEC §10's figure).

  Args:
    returns: [N, G, m] R from `returns_and_baselines`.
    baselines: [N, G, m] V.
    valid: optional bool [N, G, m], e.g. only segments the thinking reached (has tokens in).

  Returns:
    [m]; NaN for a segment with no valid entry or a constant return.
  """
  xp = _xp(returns, baselines, valid)
  chex.assert_rank(returns, 3)
  chex.assert_equal_shape([returns, baselines])
  R = xp.asarray(returns)
  w = xp.ones(R.shape) if valid is None else xp.asarray(valid).astype(R.dtype)
  chex.assert_equal_shape([R, w])
  n = w.sum((0, 1))

  def var(x):
    mean = (w * x).sum((0, 1)) / n
    return (w * (x - mean) ** 2).sum((0, 1)) / n

  return var(R - xp.asarray(baselines)) / var(R)


def summary_advantages(summary_rewards: Array, canonical: Array | None = None) -> Array:
  """Decoupled summary advantage (SPEC §6): r minus the mean reward of all summaries of the same
  cut of the same thinking; with A = 1, minus the mean over the G thinkings at that budget.

  Args:
    summary_rewards: [N, G, m, A] reward of each summary.
    canonical: optional int [N, G, m], the budget whose cut each budget shares (equal values:
      one cut). Given, the layout is the official one ("resample"): every budget holds its own A
      summaries, and the baseline pools the A x k summaries of a cut shared by k budgets. None:
      budgets that share a cut repeat one set of A summaries ("reuse"; train them once,
      `dedup_mask`), and the baseline is the mean over those A.

  Returns:
    [N, G, m, A].
  """
  xp = _xp(summary_rewards, canonical)
  y = xp.asarray(summary_rewards)
  chex.assert_rank(y, 4)
  if y.shape[-1] == 1:  # One summary per cut: the official baseline is the group at the budget.
    return y - y.mean(1, keepdims=True)
  if canonical is None:
    return y - y.mean(-1, keepdims=True)
  c = xp.asarray(canonical)
  chex.assert_equal_shape([c, y[..., 0]])
  same = (c[..., :, None] == c[..., None, :]).astype(y.dtype)  # [N, G, m, m]: one cut
  # Elementwise, not a matmul: no matmul precision setting (bf16 passes on TPU) can round it.
  pooled = (same * y.sum(-1)[..., None, :]).sum(-1) / (same.sum(-1) * y.shape[-1])
  return y - pooled[..., None]


def grpo_summary_advantages(final_rewards: Array) -> Array:
  """GRPO summary advantage: one summary per thinking at b_m, r - mean over the G thinkings.

  Args:
    final_rewards: [N, G].

  Returns:
    [N, G].
  """
  xp = _xp(final_rewards)
  y = xp.asarray(final_rewards)
  chex.assert_rank(y, 2)
  return y - y.mean(-1, keepdims=True)


def dedup_mask(cut_lengths: Array) -> Array:
  """True for the first budget of each distinct cut.

  Cut lengths min(|z|, b_j) never decrease along the budget axis, so a budget repeats a cut
  exactly when its cut length equals the previous budget's.

  Args:
    cut_lengths: [..., m] cut length (thinking tokens kept) at each budget.

  Returns:
    bool [..., m].
  """
  xp = _xp(cut_lengths)
  c = xp.asarray(cut_lengths)
  first = xp.ones(c.shape[:-1] + (1,), dtype=bool)
  return xp.concatenate([first, c[..., 1:] != c[..., :-1]], axis=-1)


def token_advantages(seg_adv: Array, segment_ids: Array, mask: Array) -> Array:
  """Per-token advantages of thinking tokens from per-segment advantages.

  Args:
    seg_adv: [B, m] advantage of each segment of each row's thinking.
    segment_ids: int [B, T] the 0-based segment of each token (`budgets.segment_of_tokens`);
      ignored (may be anything, e.g. -1) where mask is False.
    mask: bool [B, T] thinking tokens to give an advantage.

  Returns:
    [B, T], 0 where mask is False.
  """
  xp = _xp(seg_adv, segment_ids, mask)
  a = xp.asarray(seg_adv)
  ids = xp.asarray(segment_ids)
  keep = xp.asarray(mask).astype(bool)
  chex.assert_rank(a, 2)
  chex.assert_equal_shape([ids, keep])
  chex.assert_equal_shape_prefix([a, ids], 1)
  # Clip so padding ids cannot index out of range (jnp would clamp silently, numpy would raise).
  safe = xp.clip(ids, 0, a.shape[-1] - 1)
  picked = xp.take_along_axis(a, safe, axis=-1)
  return xp.where(keep, picked, xp.zeros((), a.dtype))
