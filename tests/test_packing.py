"""Tree packing: packed log-probs and gradients equal each branch run as its own sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.core import budgets as B
from brpo.rollout import anytime as at
from brpo.rollout import sampling as smp
from brpo.train import packing as pk
from models import config, decoder as dec

# Fixed here (not the named "tiny", which may be retuned): expected tokens depend on it.
CFG = config.ModelConfig(vocab_size=64, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=32, mlp_dim=512, tie_embeddings=True, max_seq_len=2048)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21, 22]]
TOKS = at.AnytimeTokens(eos_id=63, pad_id=0, think_end_ids=(41,),
                        insert_running=(60, 61, 41, 62, 59), insert_ended=(62, 59))
# Summaries reused at shared cuts: the layout with repeated (unpacked) branches; the official
# resampled layout is checked by test_packed_layout_resampled.
SPEC = at.AnytimeConfig(budgets=(4, 8, 16), group_size=2, n_summaries=2, summary_len=6,
                        shared_cuts="reuse")


@pytest.fixture(scope="module")
def setup():
  params = dec.init_params(CFG, jax.random.PRNGKey(0))
  # Sample with sharper weights so thinkings end at different lengths (shared cuts appear).
  sharp = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  ro = at.anytime_rollout(sharp, CFG, PROMPTS, SPEC, TOKS, jax.random.PRNGKey(0))
  r = len(PROMPTS) * SPEC.group_size
  tadv = jax.random.normal(jax.random.PRNGKey(1), (r, 3))
  sadv = jax.random.normal(jax.random.PRNGKey(2), (r, 3, 2))
  return sharp, params, ro, tadv, sadv


def test_rollout_has_shared_and_running_cuts(setup):
  ro = setup[2]
  canonical = np.asarray(ro.cuts.canonical)
  assert (canonical != np.arange(3)).any(), "fixture should contain a repeated (shared) cut"
  assert (~np.asarray(ro.cuts.ended)).any()


def test_packed_layout_resampled(setup):
  """Every budget has its own A summaries, shared cut or not: all m * A branches are packed at
  the cut's position and trained."""
  sharp = setup[0]
  spec = SPEC.__class__(**{**SPEC.__dict__, "shared_cuts": "resample"})
  ro = at.anytime_rollout(sharp, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(0))
  r = len(PROMPTS) * spec.group_size
  b = pk.pack(ro, jnp.zeros((r, 3)), jnp.ones((r, 3, 2)))
  p, bm = ro.prompt.shape[1], 16
  w = b.branch_width
  assert w == ro.cuts.insert.shape[2] + spec.summary_len
  assert not ro.reused and (np.asarray(ro.cuts.canonical) != np.arange(3)).any()
  for row in range(r):
    for c in range(6):
      j, a = divmod(c, 2)
      sl = slice(p + bm + c * w, p + bm + (c + 1) * w)
      n_ins, n_sum = int(ro.cuts.insert_len[row, j]), int(ro.summary_len[row, j, a])
      assert (np.asarray(b.branch[row, sl])[:n_ins + n_sum] == c + 1).all()
      assert int(np.asarray(b.loss_mask[row, sl]).sum()) == n_sum
      assert int(b.positions[row, sl][0]) == int(ro.prompt_valid[row].sum() + ro.cuts.length[row, j])


def test_packed_layout(setup):
  _, _, ro, tadv, sadv = setup
  b = pk.pack(ro, tadv, sadv)
  p, bm = ro.prompt.shape[1], 16
  w = ro.cuts.insert.shape[2] + SPEC.summary_len
  assert b.branch_width == w and b.response_len == bm + 6 * w
  assert b.tokens.shape == (8, pk.padded_length(p + bm + 6 * w))
  # The row is padded to the attention block: padding slots are invisible and never trained.
  tail = slice(p + bm + 6 * w, None)
  assert (np.asarray(b.branch[:, tail]) == -1).all() and not np.asarray(b.loss_mask[:, tail]).any()
  for r in range(8):
    n_prompt = int(ro.prompt_valid[r].sum())
    # Nothing of the prompt is trained; the thinking is trained up to its length.
    assert not np.asarray(b.loss_mask[r, :p]).any()
    tl = int(ro.thinking_len[r])
    assert np.asarray(b.loss_mask[r, p:p + tl]).all() and not np.asarray(
        b.loss_mask[r, p + tl:p + bm]).any()
    for j in range(3):
      for a in range(2):
        c = j * 2 + a
        sl = slice(p + bm + c * w, p + bm + (c + 1) * w)
        n_ins = int(ro.cuts.insert_len[r, j])
        n_sum = int(ro.summary_len[r, j, a])
        if int(ro.cuts.canonical[r, j]) != j:  # a shared cut: packed once, under its first budget
          assert (np.asarray(b.branch[r, sl]) == -1).all()
          continue
        cut = int(ro.cuts.length[r, j])
        # Positions continue from the cut; the inserted tokens are never trained.
        np.testing.assert_array_equal(b.positions[r, sl][:n_ins + n_sum],
                                      n_prompt + cut + np.arange(n_ins + n_sum))
        assert not np.asarray(b.loss_mask[r, sl][:n_ins]).any()
        assert np.asarray(b.loss_mask[r, sl][n_ins:n_ins + n_sum]).all()
        np.testing.assert_array_equal(b.limit[r, sl][:n_ins + n_sum], p + cut)
        np.testing.assert_allclose(b.advantages[r, sl][n_ins:n_ins + n_sum], sadv[r, j, a])
    # Thinking tokens carry their segment's advantage: token t (1-based) is in the first
    # segment whose budget is >= t.
    for t in range(1, tl + 1):
      s = next(j for j, bj in enumerate(SPEC.budgets) if bj >= t)
      assert float(b.advantages[r, p + t - 1]) == pytest.approx(float(tadv[r, s]))


def test_packed_logprobs_equal_sampler_and_unpacked(setup):
  sharp, _, ro, tadv, sadv = setup
  packed, plain = pk.pack(ro, tadv, sadv), pk.unpack(ro, tadv, sadv)
  assert int(packed.loss_mask.sum()) == int(plain.loss_mask.sum())
  lp = pk.token_logprobs(sharp, CFG, packed)
  lu = pk.token_logprobs(sharp, CFG, plain)
  # The sampler's log-probs are the old policy: recomputed by one packed forward.
  np.testing.assert_allclose(jnp.where(packed.loss_mask, lp, 0), packed.old_logp, atol=1e-5)
  np.testing.assert_allclose(jnp.where(plain.loss_mask, lu, 0), plain.old_logp, atol=1e-5)
  # The same multiset of trained (log-prob, advantage) pairs.
  key = lambda b, l: np.sort(np.asarray(l)[np.asarray(b.loss_mask)] * 1e3 +
                             np.asarray(b.advantages)[np.asarray(b.loss_mask)])
  np.testing.assert_allclose(key(packed, lp), key(plain, lu), atol=1e-2)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_attention_block_changes_no_value(setup, block):
  """--attention_block: the packed forward's log-probs and gradients at a smaller kernel block
  equal those at the default 128 (only the summation order differs)."""
  _, params, ro, tadv, sadv = setup
  packed = pk.pack(ro, tadv, sadv)

  def objective(p, cfg):
    lp = pk.token_logprobs(p, cfg, packed)
    return jnp.sum(jnp.where(packed.loss_mask, lp * packed.advantages, 0.0)), lp

  (v0, lp0), g0 = jax.value_and_grad(objective, has_aux=True)(params, CFG)
  (v1, lp1), g1 = jax.value_and_grad(objective, has_aux=True)(params,
                                                              CFG.replace(attention_block=block))
  np.testing.assert_allclose(lp1, lp0, atol=1e-5)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # gradients of size ~1: float32 sums


def test_packed_gradients_equal_unpacked(setup):
  _, params, ro, tadv, sadv = setup
  packed, plain = pk.pack(ro, tadv, sadv), pk.unpack(ro, tadv, sadv)
  n = packed.loss_mask.sum()

  def objective(p, b):
    lp = pk.token_logprobs(p, CFG, b)
    return jnp.sum(jnp.where(b.loss_mask, lp * b.advantages, 0.0)) / n

  vp, gp = jax.value_and_grad(objective)(params, packed)
  vu, gu = jax.value_and_grad(objective)(params, plain)
  np.testing.assert_allclose(vp, vu, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_tree_attention_equals_dense_tree_mask(setup):
  sharp, _, ro, tadv, sadv = setup
  b = pk.pack(ro, tadv, sadv)
  fast = pk.token_logprobs(sharp, CFG, b)
  dense = pk.token_logprobs(sharp, CFG, b, dense=True)
  np.testing.assert_allclose(jnp.where(b.loss_mask, fast, 0), jnp.where(b.loss_mask, dense, 0),
                             atol=1e-5)
  # Gradients too, through every slot that is trained.
  f = lambda p, d: jnp.sum(jnp.where(b.loss_mask, pk.token_logprobs(p, CFG, b, dense=d), 0.0))
  g1, g2 = jax.grad(f)(sharp, False), jax.grad(f)(sharp, True)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_entropy_matches_definition(setup):
  sharp, _, ro, tadv, sadv = setup
  b = pk.pack(ro, tadv, sadv)
  lp, ent = pk.token_logprobs(sharp, CFG, b, with_entropy=True)
  from models import masks
  logits = dec.forward(sharp, CFG, b.tokens, b.positions, masks.tree_mask(b.branch, b.limit))
  pr = jax.nn.softmax(logits[:, :-1], -1)
  ref = -jnp.sum(pr * jnp.log(pr), -1)
  real = b.branch[:, :-1] != -1  # padding slots (fully masked queries) differ and are unused
  np.testing.assert_allclose(jnp.where(real, ent[:, 1:], 0), jnp.where(real, ref, 0), atol=1e-4)
  np.testing.assert_allclose(lp, pk.token_logprobs(sharp, CFG, b), atol=1e-6)


def test_segment_of_tokens_traced_budgets():
  np.testing.assert_array_equal(B.segment_of_tokens(jnp.asarray((2, 4, 6)), 6), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(smp.bucket_length(3), 8)


def test_ppo_gradients_blockwise_equal_dense(setup):
  """The PPO loss over packed rows (shared cuts, padding up to the attention block) accumulated
  over several micro-batches: the blockwise kernel gives the dense [T, T] mask's values and
  gradients."""
  from brpo.core import loss as loss_lib
  from brpo.train import step as train_lib

  sharp, params, ro, tadv, sadv = setup
  b = pk.pack(ro, tadv, sadv)
  assert b.tokens.shape[1] > b.trunk_len + b.n_branches * b.branch_width  # padding slots
  assert (np.asarray(ro.cuts.canonical) != np.arange(3)).any()  # shared cuts
  # Old log-probs of the sharp sampler: ratios far from 1, so clipping is exercised.
  micro = train_lib.micro_batches(b, 4)

  def loss(p, dense):
    total = 0.0
    for i in range(4):
      mb = jax.tree.map(lambda x: x[i], micro)
      lp = pk.token_logprobs(p, CFG, mb, dense=dense)
      total = total + loss_lib.ppo_loss(lp, mb.old_logp, mb.advantages, mb.loss_mask,
                                        max_len=b.response_len).loss_sum
    return total

  f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (v1, g1), (v2, g2) = f(params, False), f(params, True)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # float32 sums in another order
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))


def test_chunked_logprobs_equal_whole_row(setup):
  """Log-probs and entropy computed chunk by chunk (checkpointed scan) equal the whole row's
  logits at once, values and gradients; a chunk that does not divide the row is padded."""
  sharp, _, ro, tadv, sadv = setup
  b = pk.pack(ro, tadv, sadv)
  t = b.tokens.shape[1]
  h = jax.random.normal(jax.random.PRNGKey(5), (b.tokens.shape[0], t, CFG.d_model))
  w = jax.random.normal(jax.random.PRNGKey(6), b.tokens.shape)

  def f(p, h, chunk):
    lp, ent = pk.logprobs_from_hidden(p, CFG, h, b.tokens, 0.7, True, chunk)
    return jnp.sum(lp * w) + jnp.sum(ent * w[:, ::-1]), (lp, ent)

  g = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True), static_argnums=2)
  (gp0, gh0), (lp0, ent0) = g(sharp, h, 0)
  for chunk in (16, 40):  # 40 divides nothing convenient at this T: padded chunks
    (gp, gh), (lp, ent) = g(sharp, h, chunk)
    np.testing.assert_allclose(lp, lp0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ent0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh, gh0, rtol=1e-4, atol=1e-6)
    for x, y in zip(jax.tree.leaves(gp), jax.tree.leaves(gp0)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_think_to_budget_runs_every_thinking_to_b_max(setup):
  """benchmarks.rl_step --think_to_budget: with the thinking stops taken out, the same model and
  key give the same thinkings up to where each stopped, and then go on to b_max (every cut
  running); the summaries still stop at end of sequence."""
  import dataclasses
  from benchmarks.rl_step import ThinkToBudget
  sharp, ro = setup[0], setup[2]
  b_max = max(SPEC.budgets)
  own = np.asarray(ro.thinking_len)
  assert (own < b_max).any(), "fixture: some thinkings should stop on their own"
  forced = at.anytime_rollout(sharp, CFG, PROMPTS, SPEC, ThinkToBudget(**dataclasses.asdict(TOKS)),
                              jax.random.PRNGKey(0))
  np.testing.assert_array_equal(forced.thinking_len, b_max)
  assert (np.asarray(forced.thinking_end) == at.END_BUDGET).all()
  assert not np.asarray(forced.cuts.ended).any()
  for row, n in enumerate(own):
    np.testing.assert_array_equal(forced.thinking[row, :n], ro.thinking[row, :n])
  assert (np.asarray(forced.summary_len) < SPEC.summary_len).any(), "no summary ended by eos"


def test_bucket_widths():
  assert pk.bucket_widths(1536, 4) == [384, 768, 1152, 1536]
  assert pk.bucket_widths(1536, 1) == [1536]
  assert pk.bucket_widths(104, 4) == [32, 56, 80, 104]  # rows under one block: multiples of 8
  assert pk.bucket_width(385, 1536, 4) == 768 and pk.bucket_width(384, 1536, 4) == 384
  assert pk.bucket_width(1, 1536, 1) == 1536
  # Above one block, widths are multiples of the attention block (--attention_block).
  assert pk.bucket_widths(512, 16) == [32, 64, 96, 128, 256, 384, 512]
  assert pk.bucket_widths(512, 16, block=32) == list(range(32, 513, 32))
  assert pk.bucket_width(344, 512, 16, block=32) == 352
  with pytest.raises(ValueError, match="1537 live slots"):
    pk.bucket_width(1537, 1536, 4)
  with pytest.raises(ValueError, match="n_buckets=0"):
    pk.bucket_widths(1536, 0)


@pytest.mark.parametrize("shared_cuts", ["reuse", "resample"])
def test_ragged_rows_equal_the_fixed_layout(setup, shared_cuts):
  """`compact` (--pack_buckets): every row's live slots move left and the rows are cut to a
  narrower width; the trained tokens, their old log-probs and advantages keep their order, and
  the forward's log-probs, the PPO loss and its gradients equal those of the fixed layout."""
  from brpo.core import loss as loss_lib

  sharp, params, _, tadv, sadv = setup
  spec = SPEC.__class__(**{**SPEC.__dict__, "shared_cuts": shared_cuts})
  ro = at.anytime_rollout(sharp, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(0))
  # The sharp model's summaries run to S: end them after 1 to S tokens, as a trained model's
  # answers do (what follows a summary's length is never read).
  ro = ro.replace(summary_len=jnp.minimum(
      ro.summary_len, 1 + jnp.arange(ro.summary_len.size).reshape(ro.summary_len.shape) % 6))
  b = pk.pack(ro, tadv, sadv)
  full = b.tokens.shape[1]
  live = np.asarray(pk.live_slots(b))
  width = pk.bucket_width(int(live.max()), full, 8)
  assert width < full, "fixture: the ragged rows should be narrower"
  c = pk.ragged(b, 8)
  assert c.tokens.shape == (b.tokens.shape[0], width)
  assert pk.ragged(b, 1) is b  # one width: the fixed layout
  assert c.response_len == b.response_len  # the loss's constant does not follow the width
  m_b, m_c = np.asarray(b.loss_mask), np.asarray(c.loss_mask)
  assert m_c.sum() == m_b.sum() > 0
  for f in ("tokens", "positions", "limit", "old_logp", "advantages", "is_summary"):
    np.testing.assert_array_equal(np.asarray(getattr(c, f))[m_c], np.asarray(getattr(b, f))[m_b])
  # The token before every trained token (what predicts it) is the same too.
  prev = lambda x, m: np.asarray(x)[:, :-1][m[:, 1:]]
  np.testing.assert_array_equal(prev(c.tokens, m_c), prev(b.tokens, m_b))
  # The trunk stays where it was; every branch is one run of slots, in the order packed.
  p = ro.prompt.shape[1]
  for r in range(b.tokens.shape[0]):
    tl = p + int(ro.thinking_len[r])
    np.testing.assert_array_equal(c.tokens[r, :tl], b.tokens[r, :tl])
    ids = np.asarray(c.branch[r, tl:live[r]])
    assert (ids > 0).all() and (np.diff(ids) >= 0).all()
    assert (np.asarray(c.branch[r, live[r]:]) == -1).all()

  def loss(prm, x):
    lp = pk.token_logprobs(prm, CFG, x)
    return loss_lib.ppo_loss(lp, x.old_logp, x.advantages, x.loss_mask,
                             max_len=x.response_len).loss_sum, lp

  f = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (v_b, lp_b), g_b = f(params, b)
  (v_c, lp_c), g_c = f(params, c)
  np.testing.assert_allclose(np.asarray(lp_c)[m_c], np.asarray(lp_b)[m_b], atol=1e-5)
  np.testing.assert_allclose(v_c, v_b, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))
