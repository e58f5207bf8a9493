"""Tests for brpo.advantages: hand-worked cases of SPEC §5-§6 and a loop-based numpy reference.

The reference functions below are written straight from the SPEC formulas with plain loops and
share no code with the implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.core import advantages as adv

MODES = ("brpo", "v1only", "v2only", "none")


# ---------------------------------------------------------------------------------------------
# Loop-based reference, straight from SPEC §5 and §6.


def ref_returns_and_baselines(r, P, mode, lam=0.5):
  """r [N, G, m], P [m] -> (R, V) [N, G, m] with plain loops (s is 0-based, s1 = s + 1)."""
  N, G, m = r.shape
  R = np.zeros((N, G, m))
  for n in range(N):
    for g in range(G):
      for s in range(m):
        R[n, g, s] = sum(P[j] * r[n, g, j] for j in range(s, m))
  V2 = np.zeros((N, G, m))
  for n in range(N):
    for g in range(G):
      for s in range(m):
        # A group of one has no group baseline: 0 (the official code's rule).
        V2[n, g, s] = sum(R[n, h, s] for h in range(G)) / G if G > 1 else 0.0
  V1 = np.zeros((N, G, m))
  for n in range(N):
    for g in range(G):
      for s in range(1, m):  # V1 of the first segment stays 0.
        num = sum(lam ** (s - j) * r[n, g, j] for j in range(s))
        den = sum(lam ** (s - j) for j in range(s))
        V1[n, g, s] = num / den * sum(P[j] for j in range(s, m))
  V = np.zeros((N, G, m))
  for n in range(N):
    for g in range(G):
      for s in range(m):
        s1 = s + 1
        if mode == "brpo":
          V[n, g, s] = (s1 - 1) / m * V1[n, g, s] + (m - s1 + 1) / m * V2[n, g, s]
        elif mode == "v1only":
          V[n, g, s] = V1[n, g, s]
        elif mode == "v2only":
          V[n, g, s] = V2[n, g, s]
        elif mode == "none":
          V[n, g, s] = 0.0
  return R, V


def ref_summary_advantages(y):
  N, G, m, A = y.shape
  out = np.zeros(y.shape)
  for n in range(N):
    for g in range(G):
      for j in range(m):
        mean = sum(y[n, g, j, a] for a in range(A)) / A
        for a in range(A):
          out[n, g, j, a] = y[n, g, j, a] - mean
  return out


def ref_token_advantages(seg_adv, seg_ids, mask):
  B, T = seg_ids.shape
  out = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        out[b, t] = seg_adv[b, seg_ids[b, t]]
  return out


# ---------------------------------------------------------------------------------------------
# Hand-worked case: N = 1 question, G = 2 thinkings, m = 4 budgets (2000, 4000, 6000, 8000),
# A = 4 summaries per cut, lambda = 0.5.
#   Thinking a never ended: it is cut at every budget; its cut rewards (mean of 4 summaries) are
#     r^a = (0, 1/4, 1/2, 1).
#   Thinking b ended with </think> at token 3000, inside segment 2 (b_1 < 3000 <= b_2). Budget 1
#     cuts it at 2000; budgets 2, 3, 4 all see the whole thinking, share one context and one set
#     of 4 summaries, so the caller passes one reward for them: r^b = (1/2, 3/4, 3/4, 3/4).
# Shared pieces (1-based s):
#   V1 weighted mean of earlier rewards, lambda^(s-j) normalised:
#     s=2: r1;  s=3: (r1/4 + r2/2)/(3/4) = r1/3 + 2 r2/3;
#     s=4: (r1/8 + r2/4 + r3/2)/(7/8) = r1/7 + 2 r2/7 + 4 r3/7.
#     a: (-, 0, 1/6, (1/2 + 2)/7 = 5/14);  b: (-, 1/2, 1/6 + 1/2 = 2/3, (1/2 + 3/2 + 3)/7 = 5/7).
#   BRPO mixing ((s-1)/m V1 + (m-s+1)/m V2): s=1: V2; s=2: V1/4 + 3V2/4; s=3: V1/2 + V2/2;
#     s=4: 3V1/4 + V2/4.
R_A = np.array([0, 1 / 4, 1 / 2, 1])
R_B = np.array([1 / 2, 3 / 4, 3 / 4, 3 / 4])
CUT_REWARDS = np.stack([R_A, R_B])[None]  # [1, 2, 4]

# Uniform prior P = (1/4, 1/4, 1/4, 1/4); tail sums sum_{j>=s} P_j = (1, 3/4, 1/2, 1/4).
#   R^a = (1/4 (0 + 1/4 + 1/2 + 1), 1/4 (1/4 + 1/2 + 1), 1/4 (1/2 + 1), 1/4 * 1)
#       = (7/16, 7/16, 3/8, 1/4)
#   R^b = (1/4 (1/2 + 9/4), 1/4 (9/4), 1/4 (3/2), 1/4 (3/4)) = (11/16, 9/16, 3/8, 3/16)
#   V2  = mean of R^a, R^b = (9/16, 1/2, 3/8, 7/32)
#   V1^a = (0, 0 * 3/4, 1/6 * 1/2, 5/14 * 1/4) = (0, 0, 1/12, 5/56)
#   V1^b = (0, 1/2 * 3/4, 2/3 * 1/2, 5/7 * 1/4) = (0, 3/8, 1/3, 5/28)
#   brpo V^a = (9/16, 0 + 3/8, 1/24 + 3/16, 15/224 + 7/128) = (9/16, 3/8, 11/48, 109/896)
#   brpo V^b = (9/16, 3/32 + 3/8, 1/6 + 3/16, 15/112 + 7/128) = (9/16, 15/32, 17/48, 169/896)
UNIFORM = dict(
    P=np.array([1 / 4] * 4),
    R=[[7 / 16, 7 / 16, 3 / 8, 1 / 4], [11 / 16, 9 / 16, 3 / 8, 3 / 16]],
    A=dict(
        brpo=[[7 / 16 - 9 / 16, 7 / 16 - 3 / 8, 3 / 8 - 11 / 48, 1 / 4 - 109 / 896],
              [11 / 16 - 9 / 16, 9 / 16 - 15 / 32, 3 / 8 - 17 / 48, 3 / 16 - 169 / 896]],
        # = [[-1/8, 1/16, 7/48, 115/896], [1/8, 3/32, 1/48, -1/896]]
        v1only=[[7 / 16, 7 / 16, 3 / 8 - 1 / 12, 1 / 4 - 5 / 56],
                [11 / 16, 9 / 16 - 3 / 8, 3 / 8 - 1 / 3, 3 / 16 - 5 / 28]],
        v2only=[[-1 / 8, -1 / 16, 0, 1 / 32], [1 / 8, 1 / 16, 0, -1 / 32]],
        none=[[7 / 16, 7 / 16, 3 / 8, 1 / 4], [11 / 16, 9 / 16, 3 / 8, 3 / 16]],
    ),
)
# Linear prior P = (1/10, 2/10, 3/10, 4/10); tail sums (1, 9/10, 7/10, 4/10).
#   P r^a = (0, 1/20, 3/20, 4/10)   -> R^a = (3/5, 3/5, 11/20, 2/5)
#   P r^b = (1/20, 3/20, 9/40, 3/10) -> R^b = (29/40, 27/40, 21/40, 3/10)
#   V2 = (53/80, 51/80, 43/80, 7/20)
#   V1^a = (0, 0, 1/6 * 7/10, 5/14 * 4/10) = (0, 0, 7/60, 1/7)
#   V1^b = (0, 1/2 * 9/10, 2/3 * 7/10, 5/7 * 4/10) = (0, 9/20, 7/15, 2/7)
#   brpo V^a = (53/80, 3/4 * 51/80, 7/120 + 43/160, 3/28 + 7/80)
#            = (53/80, 153/320, 157/480, 109/560)
#   brpo V^b = (53/80, 9/80 + 153/320, 7/30 + 43/160, 3/14 + 7/80)
#            = (53/80, 189/320, 241/480, 169/560)
LINEAR = dict(
    P=np.array([0.1, 0.2, 0.3, 0.4]),
    R=[[3 / 5, 3 / 5, 11 / 20, 2 / 5], [29 / 40, 27 / 40, 21 / 40, 3 / 10]],
    A=dict(
        brpo=[[-1 / 16, 39 / 320, 107 / 480, 23 / 112], [1 / 16, 27 / 320, 11 / 480, -1 / 560]],
        v1only=[[3 / 5, 3 / 5, 13 / 30, 9 / 35], [29 / 40, 9 / 40, 7 / 120, 1 / 70]],
        v2only=[[-1 / 16, -3 / 80, 1 / 80, 1 / 20], [1 / 16, 3 / 80, -1 / 80, -1 / 20]],
        none=[[3 / 5, 3 / 5, 11 / 20, 2 / 5], [29 / 40, 27 / 40, 21 / 40, 3 / 10]],
    ),
)
# Base prior P = (0, 0, 0, 1): every segment's return is the final reward: R^a = 1, R^b = 3/4.
#   V2 = 7/8 everywhere; V1^a = (0, 0, 1/6, 5/14), V1^b = (0, 1/2, 2/3, 5/7) (tail sums all 1).
#   brpo V^a = (7/8, 21/32, 1/12 + 7/16, 15/56 + 7/32) = (7/8, 21/32, 25/48, 109/224)
#   brpo V^b = (7/8, 1/8 + 21/32, 1/3 + 7/16, 15/28 + 7/32) = (7/8, 25/32, 37/48, 169/224)
BASE = dict(
    P=np.array([0.0, 0.0, 0.0, 1.0]),
    R=[[1, 1, 1, 1], [3 / 4, 3 / 4, 3 / 4, 3 / 4]],
    A=dict(
        brpo=[[1 / 8, 11 / 32, 23 / 48, 115 / 224], [-1 / 8, -1 / 32, -1 / 48, -1 / 224]],
        v1only=[[1, 1, 5 / 6, 9 / 14], [3 / 4, 1 / 4, 1 / 12, 1 / 28]],
        v2only=[[1 / 8] * 4, [-1 / 8] * 4],
        none=[[1, 1, 1, 1], [3 / 4] * 4],
    ),
)


@pytest.mark.parametrize("case", [UNIFORM, LINEAR, BASE], ids=["uniform", "linear", "base"])
@pytest.mark.parametrize("mode", MODES)
def test_thinking_advantages_hand_worked(case, mode):
  got = adv.thinking_advantages(CUT_REWARDS, case["P"], baseline=mode)
  assert isinstance(got, np.ndarray) and got.shape == (1, 2, 4)
  np.testing.assert_allclose(got[0], case["A"][mode], rtol=0, atol=1e-14)
  R, V = adv.returns_and_baselines(CUT_REWARDS, case["P"], baseline=mode)
  np.testing.assert_allclose(R[0], case["R"], rtol=0, atol=1e-14)
  np.testing.assert_allclose(R - V, got, rtol=0, atol=1e-14)
  # The hand numbers also agree with the loop reference.
  np.testing.assert_allclose(got, np.subtract(*ref_returns_and_baselines(
      CUT_REWARDS, case["P"], mode)), rtol=0, atol=1e-14)


def test_thinking_advantages_hand_worked_in_jax():
  got = adv.thinking_advantages(jnp.asarray(CUT_REWARDS), jnp.asarray(UNIFORM["P"]))
  assert isinstance(got, jax.Array) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got)[0], UNIFORM["A"]["brpo"], rtol=0, atol=1e-6)


def test_shared_cut_dedup_mask_and_summary_advantages_hand_worked():
  # Thinking a is cut at each budget; thinking b ended at token 3000, so budgets 2..4 share one cut
  # at 3000 and one set of summaries.
  cut_lengths = np.array([[[2000, 4000, 6000, 8000], [2000, 3000, 3000, 3000]]])
  np.testing.assert_array_equal(
      adv.dedup_mask(cut_lengths), [[[True, True, True, True], [True, True, False, False]]])
  # Summary rewards, A = 4 (their means are the cut rewards above). b's shared cut repeats.
  y = np.array([[[[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]],
                 [[1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 1]]]], dtype=np.float64)
  np.testing.assert_array_equal(y.mean(-1), CUT_REWARDS)
  # A = r - mean over the 4 summaries of that same cut: a's cut 2 has mean 1/4, so
  # (-1/4, 3/4, -1/4, -1/4); b's shared cut has mean 3/4, so (1/4, 1/4, -3/4, 1/4).
  want = np.array([[[[0, 0, 0, 0], [-1 / 4, 3 / 4, -1 / 4, -1 / 4],
                     [1 / 2, -1 / 2, 1 / 2, -1 / 2], [0, 0, 0, 0]],
                    [[1 / 2, -1 / 2, 1 / 2, -1 / 2], [1 / 4, 1 / 4, -3 / 4, 1 / 4],
                     [1 / 4, 1 / 4, -3 / 4, 1 / 4], [1 / 4, 1 / 4, -3 / 4, 1 / 4]]]])
  np.testing.assert_array_equal(adv.summary_advantages(y), want)


def test_dedup_mask_is_first_of_each_distinct_cut():
  rng = np.random.default_rng(3)
  support = np.array([4, 8, 12, 16, 20])
  lengths = rng.integers(1, 21, size=(3, 7))
  cuts = np.minimum(lengths[..., None], support)  # [3, 7, 5]
  got = adv.dedup_mask(cuts)
  for idx in np.ndindex(3, 7):
    seen = set()
    for j in range(5):
      c = int(cuts[idx + (j,)])
      assert got[idx + (j,)] == (c not in seen)
      seen.add(c)
  assert isinstance(adv.dedup_mask(jnp.asarray(cuts)), jax.Array)
  np.testing.assert_array_equal(adv.dedup_mask(jnp.asarray(cuts)), got)


def test_grpo_summary_advantages_hand_worked():
  # GRPO run: one summary per thinking at b_m; advantage = r - mean over the G thinkings.
  final = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
  np.testing.assert_array_equal(
      adv.grpo_summary_advantages(final),
      [[1 / 2, -1 / 2, -1 / 2, 1 / 2], [1 / 4, 1 / 4, 1 / 4, -3 / 4]])
  got = adv.grpo_summary_advantages(jnp.asarray(final))
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(got, [[1 / 2, -1 / 2, -1 / 2, 1 / 2], [1 / 4, 1 / 4, 1 / 4, -3 / 4]])


def test_token_advantages_hand_worked():
  seg_adv = np.array([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
  seg_ids = np.array([[0, 0, 1, 2, 2], [0, 1, 1, 7, -1]])  # Masked ids may be out of range.
  mask = np.array([[True, True, True, True, False], [True, True, True, False, False]])
  np.testing.assert_array_equal(
      adv.token_advantages(seg_adv, seg_ids, mask), [[1, 1, 2, 3, 0], [-1, -2, -2, 0, 0]])


# ---------------------------------------------------------------------------------------------
# Random inputs against the loop reference.


def _random_case(seed):
  rng = np.random.default_rng(seed)
  N, G, m = (int(v) for v in rng.integers(1, 6, size=3))
  A = int(rng.integers(1, 5))
  r = rng.integers(0, A + 1, size=(N, G, m)) / A
  if seed % 2:
    r = rng.random((N, G, m))
  P = rng.dirichlet(np.ones(m))
  if seed % 3 == 0:
    P = np.eye(m)[-1]  # The base prior: zeros in front.
  return r, P


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lam", [0.5, 0.9])
def test_thinking_advantages_match_loop_reference(seed, mode, lam):
  r, P = _random_case(seed)
  want_R, want_V = ref_returns_and_baselines(r, P, mode, lam)
  R, V = adv.returns_and_baselines(r, P, baseline=mode, lam=lam)
  np.testing.assert_allclose(R, want_R, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(V, want_V, rtol=1e-12, atol=1e-12)
  got = adv.thinking_advantages(r, P, baseline=mode, lam=lam)
  np.testing.assert_allclose(got, want_R - want_V, rtol=1e-12, atol=1e-12)
  # The same function in jnp, jitted, in float32.
  fn = jax.jit(lambda r, P: adv.thinking_advantages(r, P, baseline=mode, lam=lam))
  got32 = fn(jnp.asarray(r, jnp.float32), jnp.asarray(P, jnp.float32))
  assert isinstance(got32, jax.Array)
  np.testing.assert_allclose(got32, want_R - want_V, rtol=0, atol=2e-6)


def test_first_segment_brpo_is_grpo_with_dense_return():
  # s = 1 has weight m/m on V2 and V1_1 = 0, so brpo and v2only agree on the first segment.
  r, P = _random_case(1)
  a = adv.thinking_advantages(r, P, baseline="brpo")
  b = adv.thinking_advantages(r, P, baseline="v2only")
  np.testing.assert_allclose(a[..., 0], b[..., 0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_summary_advantages_match_loop_reference(seed):
  rng = np.random.default_rng(seed)
  shape = tuple(int(v) for v in rng.integers(1, 5, size=4))
  y = rng.integers(0, 2, size=shape).astype(np.float64)
  np.testing.assert_allclose(adv.summary_advantages(y), ref_summary_advantages(y), atol=1e-14)
  got = jax.jit(adv.summary_advantages)(jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(got, ref_summary_advantages(y), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_token_advantages_match_loop_reference(seed):
  rng = np.random.default_rng(seed)
  B, T, m = (int(v) for v in rng.integers(1, 7, size=3))
  seg_adv = rng.normal(size=(B, m))
  seg_ids = rng.integers(-2, m + 2, size=(B, T))
  mask = (rng.random((B, T)) < 0.6) & (seg_ids >= 0) & (seg_ids < m)
  mask[0] = False  # An empty row.
  want = ref_token_advantages(seg_adv, seg_ids, mask)
  np.testing.assert_array_equal(adv.token_advantages(seg_adv, seg_ids, mask), want)
  got = jax.jit(adv.token_advantages)(
      jnp.asarray(seg_adv, jnp.float32), jnp.asarray(seg_ids), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_relative_variance_matches_loop_reference():
  rng = np.random.default_rng(7)
  r, P = rng.random((6, 4, 3)), np.array([0.2, 0.3, 0.5])
  R, V = adv.returns_and_baselines(r, P, baseline="brpo")
  valid = rng.random((6, 4, 3)) < 0.8
  got = adv.relative_variance(R, V, valid)
  for s in range(3):
    d = [R[n, g, s] - V[n, g, s] for n in range(6) for g in range(4) if valid[n, g, s]]
    x = [R[n, g, s] for n in range(6) for g in range(4) if valid[n, g, s]]
    var = lambda v: sum((u - sum(v) / len(v)) ** 2 for u in v) / len(v)
    np.testing.assert_allclose(got[s], var(d) / var(x), rtol=1e-12)
  full = adv.relative_variance(R, V)
  np.testing.assert_allclose(full, np.var(R - V, axis=(0, 1)) / np.var(R, axis=(0, 1)),
                             rtol=1e-12)
  # With V = 0 nothing is removed.
  np.testing.assert_allclose(adv.relative_variance(R, np.zeros_like(R)), 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors a caller can make.


def test_bad_inputs_raise():
  r = np.zeros((2, 3, 4))
  with pytest.raises(ValueError, match="baseline"):
    adv.thinking_advantages(r, np.full(4, 0.25), baseline="grpo")
  with pytest.raises(ValueError, match="lam"):
    adv.thinking_advantages(r, np.full(4, 0.25), lam=0.0)
  with pytest.raises(AssertionError):
    adv.thinking_advantages(r, np.full(3, 1 / 3))  # probs of the wrong length
  with pytest.raises(AssertionError):
    adv.thinking_advantages(r[0], np.full(4, 0.25))  # missing the group axis
  with pytest.raises(AssertionError):
    adv.token_advantages(np.zeros((2, 4)), np.zeros((3, 5), int), np.ones((3, 5), bool))
