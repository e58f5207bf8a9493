"""Tests for brpo.loss: PPO clipped surrogate, aggregations, KL and entropy terms (SPEC §7).

A loop-based numpy reference checks values; micro-batch accumulation is checked for values and
gradients.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.core import loss as L

AGGS = ("dr_grpo", "token_mean", "seq_mean_token_mean")


# ---------------------------------------------------------------------------------------------
# Loop-based reference, straight from SPEC §7 and the definitions.


def ref_loss(logp, old, A, mask, agg, max_len=None, eps_low=0.2, eps_high=0.2, ref=None,
             kl_coef=0.0, kl_type="k3", ent=None, ent_coef=0.0):
  """Returns (loss, metrics dict) computed with plain loops in float64."""
  B, T = logp.shape
  tok = np.zeros((B, T))
  pg = np.zeros((B, T))
  n_tok, n_clip, kl_old, kl_ref, ent_sum = 0, 0, 0.0, 0.0, 0.0
  for b in range(B):
    for t in range(T):
      if not mask[b, t]:
        continue
      ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
      clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
      unclipped_term, clipped_term = -A[b, t] * ratio, -A[b, t] * clipped
      pg[b, t] = max(unclipped_term, clipped_term)
      tok[b, t] = pg[b, t]
      n_tok += 1
      n_clip += clipped_term > unclipped_term
      kl_old += 0.5 * (float(logp[b, t]) - float(old[b, t])) ** 2
      if ref is not None:
        d = float(logp[b, t]) - float(ref[b, t])
        k = d if kl_type == "k1" else math.exp(-d) + d - 1
        kl_ref += k
        tok[b, t] += kl_coef * k
      if ent is not None:
        ent_sum += ent[b, t]
        tok[b, t] -= ent_coef * ent[b, t]

  def aggregate(x):
    if agg == "dr_grpo":
      return sum(x[b, t] for b in range(B) for t in range(T)) / (B * max_len)
    if agg == "token_mean":
      return sum(x[b, t] for b in range(B) for t in range(T)) / n_tok
    row_means = []
    for b in range(B):
      n = sum(1 for t in range(T) if mask[b, t])
      if n:
        row_means.append(sum(x[b, t] for t in range(T)) / n)
    return sum(row_means) / len(row_means)

  metrics = dict(pg_loss=aggregate(pg), clip_frac=n_clip / n_tok, approx_kl_old=kl_old / n_tok)
  if ref is not None:
    metrics["kl_ref"] = kl_ref / n_tok
  if ent is not None:
    metrics["entropy"] = ent_sum / n_tok
  return aggregate(tok), metrics


def _random_batch(seed, B=None, T=None):
  rng = np.random.default_rng(seed)
  B = B or int(rng.integers(2, 7))
  T = T or int(rng.integers(1, 9))
  logp = np.log(rng.uniform(0.05, 1.0, size=(B, T)))
  # Log-ratios up to +-0.5 put many tokens outside the [0.8, 1.2] clip range.
  old = logp - rng.uniform(-0.5, 0.5, size=(B, T))
  ref = logp - rng.uniform(-1.0, 1.0, size=(B, T))
  A = rng.normal(size=(B, T))
  ent = rng.uniform(0.0, 3.0, size=(B, T))
  mask = rng.random((B, T)) < 0.7
  mask[rng.integers(1, B)] = False  # An empty row.
  mask[0, 0] = True  # At least one trainable token somewhere.
  f32 = lambda x: np.asarray(x, np.float32)
  # The reference runs on the same float32-rounded inputs.
  return tuple(f32(x).astype(np.float64) for x in (logp, old, A, ref, ent)) + (mask,)


def _jnp(*xs):
  return tuple(jnp.asarray(x, jnp.float32) if x.dtype != bool else jnp.asarray(x) for x in xs)


# ---------------------------------------------------------------------------------------------
# Hand-worked case.


def test_clipped_surrogate_hand_worked():
  # Four tokens, old logp 0, ratios (1.5, 1.5, 0.5, 0.5), advantages (1, -1, 1, -1):
  #   A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2   (clipped: the gradient is cut)
  #   A=-1, ratio 1.5: max( 1.5,  1.2) =  1.5
  #   A=+1, ratio 0.5: max(-0.5, -0.8) = -0.5
  #   A=-1, ratio 0.5: max( 0.5,  0.8) =  0.8   (clipped)
  # Sum = 0.6. A fifth, masked token with a huge advantage must not count.
  logp = jnp.log(jnp.array([[1.5, 1.5, 0.5, 0.5, 9.0]]))
  old = jnp.zeros((1, 5))
  A = jnp.array([[1.0, -1.0, 1.0, -1.0, 1e6]])
  mask = jnp.array([[True, True, True, True, False]])
  t = L.ppo_loss(logp, old, A, mask, agg="token_mean")
  np.testing.assert_allclose(t.loss, 0.6 / 4, rtol=1e-6)
  np.testing.assert_allclose(t.loss_sum, 0.6, rtol=1e-6)
  assert float(t.loss_denom) == 4.0
  np.testing.assert_allclose(t.metric_values()["clip_frac"], 0.5)
  # Dr. GRPO divides the same sum by sequences x max_len = 1 x 10.
  t = L.ppo_loss(logp, old, A, mask, agg="dr_grpo", max_len=10)
  np.testing.assert_allclose(t.loss, 0.06, rtol=1e-6)
  assert float(t.loss_denom) == 10.0
  # Asymmetric clipping (eps_high = 0.28): the first token becomes max(-1.5, -1.28) = -1.28.
  t = L.ppo_loss(logp, old, A, mask, agg="token_mean", eps_high=0.28)
  np.testing.assert_allclose(t.loss_sum, 0.52, rtol=1e-6)


def test_seq_mean_token_mean_hand_worked():
  # Row means: row 0 (A = 1, 2 at ratio 1) has token losses (-1, -2): mean -1.5; row 1 has one
  # token, -4; row 2 has none and is not counted. Loss = (-1.5 - 4) / 2 = -2.75.
  logp = jnp.zeros((3, 3))
  A = jnp.array([[1.0, 2.0, 5.0], [4.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
  mask = jnp.array([[True, True, False], [True, False, False], [False, False, False]])
  t = L.ppo_loss(logp, logp, A, mask, agg="seq_mean_token_mean")
  np.testing.assert_allclose(t.loss, -2.75)
  assert float(t.loss_denom) == 2.0


def test_kl_estimators_hand_worked():
  # logp - ref = d = 0.5 on one token: k1 = 0.5, k3 = exp(-0.5) + 0.5 - 1.
  logp = jnp.array([[0.0]])
  ref = jnp.array([[-0.5]])
  zero = jnp.zeros((1, 1))
  mask = jnp.ones((1, 1), bool)
  for kl_type, want in (("k1", 0.5), ("k3", math.exp(-0.5) - 0.5)):
    t = L.ppo_loss(logp, logp, zero, mask, agg="token_mean", ref_logp=ref, kl_coef=0.1,
                   kl_type=kl_type)
    np.testing.assert_allclose(t.metric_values()["kl_ref"], want, rtol=1e-6)
    np.testing.assert_allclose(t.loss, 0.1 * want, rtol=1e-6)


def test_kl_and_entropy_are_off_by_default():
  logp, old, A, ref, ent, mask = _random_batch(0)
  plain = L.ppo_loss(*_jnp(logp, old, A, mask), agg="token_mean")
  with_terms = L.ppo_loss(*_jnp(logp, old, A, mask), agg="token_mean", ref_logp=jnp.asarray(ref),
                          entropy=jnp.asarray(ent))
  np.testing.assert_allclose(with_terms.loss, plain.loss, rtol=1e-6)
  assert "kl_ref" in with_terms.metrics and "entropy" in with_terms.metrics
  assert "kl_ref" not in plain.metrics and "entropy" not in plain.metrics


# ---------------------------------------------------------------------------------------------
# Random inputs against the loop reference.


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("extras", ["none", "k1", "k3", "entropy", "k3+entropy"])
def test_ppo_loss_matches_loop_reference(seed, agg, extras):
  logp, old, A, ref, ent, mask = _random_batch(seed)
  max_len = logp.shape[1] + 3
  kw = dict(agg=agg, max_len=max_len, eps_low=0.2, eps_high=0.25 if seed % 2 else 0.2)
  ref_kw = dict(kw)
  jnp_kw = dict(kw)
  if extras in ("k1", "k3", "k3+entropy"):
    kl_type = extras[:2]
    ref_kw.update(ref=ref, kl_coef=0.3, kl_type=kl_type)
    jnp_kw.update(ref_logp=jnp.asarray(ref, jnp.float32), kl_coef=0.3, kl_type=kl_type)
  if "entropy" in extras:
    ref_kw.update(ent=ent, ent_coef=0.05)
    jnp_kw.update(entropy=jnp.asarray(ent, jnp.float32), entropy_coef=0.05)
  want, want_metrics = ref_loss(logp, old, A, mask, **ref_kw)
  fn = jax.jit(functools.partial(L.ppo_loss, **jnp_kw))
  terms = fn(*_jnp(logp, old, A, mask))
  np.testing.assert_allclose(terms.loss, want, rtol=1e-5, atol=1e-6)
  got_metrics = terms.metric_values()
  assert set(got_metrics) == set(want_metrics)
  for k, v in want_metrics.items():
    np.testing.assert_allclose(got_metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_float_mask_is_accepted():
  logp, old, A, _, _, mask = _random_batch(4)
  a = L.ppo_loss(*_jnp(logp, old, A, mask), agg="token_mean")
  b = L.ppo_loss(*_jnp(logp, old, A, mask.astype(np.float32)), agg="token_mean")
  np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)


def test_masked_garbage_does_not_leak_into_loss_or_gradient():
  # Padding positions may hold -inf log-probs; they must not make the loss or its gradient NaN.
  logp, old, A, _, _, mask = _random_batch(5)
  logp = np.where(mask, logp, -np.inf)
  logp_j, old_j, A_j, mask_j = _jnp(logp, old, A, mask)
  for agg in AGGS:
    f = lambda lp: L.ppo_loss(lp, old_j, A_j, mask_j, agg=agg, max_len=16, ref_logp=old_j,
                              kl_coef=0.1).loss
    assert np.isfinite(f(logp_j))
    g = jax.grad(f)(logp_j)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: (sum, denominator) pairs over micro-batches are exact.


def _model_batch(seed, B=8, T=6, D=5, V=7):
  """A tiny linear softmax policy so that every micro-batch's gradient hits the same weights."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
  W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  old = jnp.asarray(rng.uniform(-3.0, -1.0, size=(B, T)), jnp.float32)
  ref = jnp.asarray(rng.uniform(-3.0, -1.0, size=(B, T)), jnp.float32)
  A = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  mask = rng.random((B, T)) < 0.6
  mask[3] = False  # An empty row.
  mask[0, 0] = True
  return W, dict(x=x, tokens=tokens, old=old, ref=ref, A=A, mask=jnp.asarray(mask))


def _terms(W, batch, agg, max_len):
  logits = batch["x"] @ W
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, batch["tokens"][..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return L.ppo_loss(logp, batch["old"], batch["A"], batch["mask"], agg=agg, max_len=max_len,
                    ref_logp=batch["ref"], kl_coef=0.05, kl_type="k3", entropy=entropy,
                    entropy_coef=0.01)


# Jitted once per shape: op-by-op dispatch of the tiny model is what would make this test slow.
_terms_jit = jax.jit(_terms, static_argnums=(2, 3))
_grad_of = lambda attr: jax.jit(
    jax.grad(lambda W, batch, agg, max_len: getattr(_terms(W, batch, agg, max_len), attr)),
    static_argnums=(2, 3))
_loss_grad = _grad_of("loss")
_loss_sum_grad = _grad_of("loss_sum")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("splits", [(2, 2, 2, 2), (1, 3, 2, 2)])
def test_micro_batch_accumulation_is_exact(agg, splits):
  W, batch = _model_batch(11)
  max_len = 9
  full = _terms_jit(W, batch, agg, max_len)
  full_grad = _loss_grad(W, batch, agg, max_len)

  # Sequences are split only between rows, never inside one.
  bounds = np.cumsum((0,) + splits)
  micro = [jax.tree.map(lambda v, a=a, b=b: v[a:b], batch) for a, b in zip(bounds, bounds[1:])]
  parts = [_terms_jit(W, mb, agg, max_len) for mb in micro]
  combined = L.combine(parts)
  np.testing.assert_allclose(combined.loss, full.loss, rtol=1e-6)
  np.testing.assert_allclose(combined.loss_denom, full.loss_denom, rtol=0)
  for k, v in full.metric_values().items():
    np.testing.assert_allclose(combined.metric_values()[k], v, rtol=1e-6, err_msg=k)

  # Accumulate gradients of the sums; divide once by the total denominator.
  grad_sum = sum(_loss_sum_grad(W, mb, agg, max_len) for mb in micro)
  np.testing.assert_allclose(grad_sum / combined.loss_denom, full_grad, rtol=1e-5, atol=1e-7)
  # The naive mean of micro-batch losses is not the same thing (the test can tell them apart),
  # except for Dr. GRPO over equal splits, where every micro-batch has the same denominator.
  naive = sum(p.loss for p in parts) / len(parts)
  if not (agg == "dr_grpo" and len(set(splits)) == 1):
    assert abs(float(naive) - float(full.loss)) > 1e-4


def test_combine_is_jittable():
  W, batch = _model_batch(2)
  parts = [_terms(W, jax.tree.map(lambda v, i=i: v[2 * i:2 * i + 2], batch), "token_mean", 9)
           for i in range(4)]
  got = jax.jit(L.combine)(parts)
  np.testing.assert_allclose(got.loss, L.combine(parts).loss, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors a caller can make.


def test_bad_arguments_raise():
  x = jnp.zeros((2, 3))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="agg"):
    L.ppo_loss(x, x, x, mask, agg="seq_sum")
  with pytest.raises(ValueError, match="max_len"):
    L.ppo_loss(x, x, x, mask, agg="dr_grpo")
  with pytest.raises(ValueError, match="max_len"):
    L.ppo_loss(x, x, x, mask, max_len=0)
  with pytest.raises(ValueError, match="kl_type"):
    L.ppo_loss(x, x, x, mask, agg="token_mean", ref_logp=x, kl_type="k2")
  with pytest.raises(ValueError, match="ref_logp"):
    L.ppo_loss(x, x, x, mask, agg="token_mean", kl_coef=0.1)
  with pytest.raises(ValueError, match="entropy"):
    L.ppo_loss(x, x, x, mask, agg="token_mean", entropy_coef=0.1)
  with pytest.raises(AssertionError):
    L.ppo_loss(x, jnp.zeros((2, 4)), x, mask, agg="token_mean")
  with pytest.raises(ValueError, match="at least one"):
    L.combine([])
