"""The RL update: sharded equals single-device, micro-batch accumulation equals the full batch,
non-finite updates are skipped, and the advantage wiring of each named run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.rollout import anytime as at
from brpo.run import config as C
from brpo.train import packing as pk
from brpo.run import rl_step as rl_lib
from brpo.train import step as train_lib
from jax.sharding import PartitionSpec as P

from models import config, decoder as dec, params as param_lib, sharding as shd

# Fixed here (not the named "tiny", which may be retuned): expected tokens depend on it.
CFG = config.ModelConfig(vocab_size=64, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=32, mlp_dim=512, tie_embeddings=True, max_seq_len=2048)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21, 22]]
TOKS = at.AnytimeTokens(eos_id=63, pad_id=0, think_end_ids=(41,),
                        insert_running=(60, 61, 41, 62, 59), insert_ended=(62, 59))
RL = C.RLConfig(budgets=(4, 8, 16), n_summaries=2, summary_len=6, group_size=2,
                prompts_per_batch=4, mini_batch_prompts=4, micro_batches=1)


@pytest.fixture(scope="module")
def batch():
  params = dec.init_params(CFG, jax.random.PRNGKey(0))
  sharp = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  spec = at.AnytimeConfig(budgets=RL.budgets, group_size=2, n_summaries=2, summary_len=6)
  ro = at.anytime_rollout(sharp, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(0))
  rewards = np.asarray(jax.random.bernoulli(jax.random.PRNGKey(3), 0.5, (4, 2, 3, 2)),
                       np.float32)
  t, s, train = rl_lib.compute_advantages(rewards, RL, np.asarray(ro.cuts.canonical))
  b = pk.pack(ro, jnp.asarray(t), jnp.asarray(s), summary_train=jnp.asarray(train))
  # Old log-probs from the sampler of the sharp model: the ratio is far from 1 for `params`,
  # so clipping is exercised.
  return params, b


def _run(params, b, rl, mesh=None, cfg=CFG, with_state=False):
  # Adam's first update is about lr * sign(g) wherever g is not ~0: lr = 1e-4 keeps float noise
  # in near-zero gradients under the 1e-5 tolerance while a wrong update would exceed it.
  opt = train_lib.make_optimizer(C.OptimConfig(lr=1e-4), 10, cfg)
  params = jax.tree.map(jnp.copy, params)  # the step donates the state
  state = train_lib.init_train_state(params, opt, 0, mesh, dec.param_axes(cfg) if mesh else None)
  step = train_lib.make_train_step(cfg, opt, rl, b.response_len, mesh)
  if mesh is not None:
    b = jax.tree.map(lambda x: rl_lib._put_rows(x, mesh), b)
  state, met = step(state, b)
  if with_state:
    return state, opt, jax.device_get(met)
  return jax.device_get(state.params), jax.device_get(met)


def test_train_step_sharded_equals_single_device(batch):
  params, b = batch
  p1, m1 = _run(params, b, RL)
  mesh = shd.make_mesh((1, 4, 2))
  rl2 = C.RLConfig(**{**RL.__dict__, "micro_batches": 2})  # 4 rows per micro-batch, 1 a device
  state, opt, m8 = _run(params, b, rl2, mesh, with_state=True)
  # The step's output layout is the one derived from the abstract state: parameters by their
  # logical axes, Adam's moments like their parameters, the rest replicated.
  want = train_lib.state_shardings(param_lib.abstract_params(CFG), dec.param_axes(CFG), opt, mesh)
  assert jax.tree.structure(want) == jax.tree.structure(state)
  for w_, x in zip(jax.tree.leaves(want), jax.tree.leaves(state)):
    assert x.sharding.is_equivalent_to(w_, x.ndim), (x.sharding, w_)
  assert state.params["embed"].sharding.spec == P("tensor", "fsdp")  # vocab 64, d_model 192
  assert state.params["layers"][0]["w_up"].sharding.spec == P("fsdp", "tensor")
  mu = state.opt_state[1][0].mu
  assert mu["layers"][1]["wq"].sharding.spec == state.params["layers"][1]["wq"].sharding.spec
  assert state.step.sharding.is_fully_replicated
  p8 = jax.device_get(state.params)
  assert m1["clip_frac"] > 0  # the update does clip
  np.testing.assert_allclose(m8["loss"], m1["loss"], atol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, atol=1e-5)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(p1)))


def test_ragged_rows_on_a_mesh_equal_the_fixed_layout(batch):
  """--pack_buckets: the update of compacted rows, sharded over a (1, 4, 2) mesh in micro-batches,
  gives the fixed layout's loss, gradient norm and parameters on one device."""
  params, b = batch
  live = np.asarray(pk.live_slots(b))
  c = pk.ragged(b, 8)
  moved = np.asarray(c.branch[:, :live.min()]) != np.asarray(b.branch[:, :live.min()])
  assert moved.any(), "fixture: compaction should move some branches"
  p1, m1 = _run(params, b, RL)
  rl2 = C.RLConfig(**{**RL.__dict__, "micro_batches": 2})
  p8, m8 = _run(params, c, rl2, shd.make_mesh((1, 4, 2)))
  np.testing.assert_allclose(m8["loss"], m1["loss"], atol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert m8["trained_tokens"] == m1["trained_tokens"]
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("agg", ["dr_grpo", "token_mean", "seq_mean_token_mean"])
def test_micro_batches_equal_full_batch(batch, agg):
  params, b = batch
  full = C.RLConfig(**{**RL.__dict__, "loss_agg": agg})
  micro = C.RLConfig(**{**RL.__dict__, "loss_agg": agg, "micro_batches": 4})
  p1, m1 = _run(params, b, full)
  p4, m4 = _run(params, b, micro)
  for k in ("loss", "grad_norm", "clip_frac", "approx_kl_old"):
    np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", True), ("none", True)])
def test_remat_and_scan_equal_plain(batch, remat, scan):
  """One update (two micro-batches, float32) with remat and/or scanned layers gives the plain
  path's parameters; weight decay follows decay_mask in either layout."""
  params, b = batch
  rl2 = C.RLConfig(**{**RL.__dict__, "micro_batches": 2})
  p1, m1 = _run(params, b, rl2)
  cfg = CFG.replace(remat=remat, scan_layers=scan)
  p2, m2 = _run(dec.stack_layers(params) if scan else params, b, rl2, cfg=cfg)
  p2 = dec.unstack_layers(p2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_restore_either_layout(tmp_path, batch):
  """A state saved with stacked layers restores into a per-layer run and back (params and Adam
  moments converted); runner.restore_state does it by the saved config's layout."""
  from brpo.run import checkpointing, runner

  params = batch[0]
  scfg = CFG.replace(scan_layers=True)
  opt_s = train_lib.make_optimizer(C.OptimConfig(lr=1e-4), 10, scfg)
  saved = train_lib.init_train_state(dec.stack_layers(params), opt_s, 0)
  saved = saved.replace(opt_state=jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32
                                               else x, saved.opt_state))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, saved, {"step": 1})
  opt = train_lib.make_optimizer(C.OptimConfig(lr=1e-4), 10, CFG)
  template = train_lib.init_train_state(jax.tree.map(jnp.zeros_like, params), opt, 0)
  state, meta = runner.restore_state(ck, template, saved_scan_layers=True)
  assert meta["step"] == 1 and not dec.is_stacked(state.params)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  mu = state.opt_state[1][0].mu
  np.testing.assert_array_equal(mu["layers"][1]["wq"], np.ones_like(params["layers"][1]["wq"]))
  # And a per-layer checkpoint into a stacked run.
  ck.save(2, state, {"step": 2})
  back, _ = runner.restore_state(ck, saved, saved_scan_layers=False)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(x, y)
  ck.close()


def test_prompt_bucket_is_per_batch():
  from brpo.run import multihost

  assert multihost.prompt_bucket([[1] * 80, [1] * 5], cap=1024) == 128
  assert multihost.prompt_bucket([[1] * 3]) == 8
  assert multihost.prompt_bucket([[1] * 700], cap=704) == 704  # never above the data set's


def test_non_finite_update_is_skipped(batch):
  params, b = batch
  bad = b.replace(advantages=b.advantages.at[0, b.prompt_len].set(jnp.nan))
  p, m = _run(params, bad, RL)
  assert m["finite"] == 0
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(p)):
    np.testing.assert_array_equal(x, y)


def test_recompute_old_logp(batch):
  """--old_logp=recompute: under the sampling parameters the trainer's log-probs equal the
  sampler's (float32: the logged gap is rounding); under other parameters they are those
  parameters' packed log-probs, in row order, on the trained tokens only."""
  import types

  params, b = batch
  sharp = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # the fixture's sampler
  rl2 = C.RLConfig(**{**RL.__dict__, "micro_batches": 2})
  ctx = types.SimpleNamespace(logprob_fn=train_lib.make_logprob_fn(CFG, rl2), mesh=None)
  same, gap = rl_lib.recompute_old_logp(sharp, b, ctx, rows=4)
  np.testing.assert_allclose(same.old_logp, b.old_logp, atol=1e-5)
  assert gap < 1e-5
  other, gap = rl_lib.recompute_old_logp(params, b, ctx, rows=4)
  want = jnp.where(b.loss_mask, pk.token_logprobs(params, CFG, b), 0.0)
  np.testing.assert_allclose(other.old_logp, want, atol=1e-5)
  assert gap > 0.1  # the sharp sampler's log-probs are far from these
  np.testing.assert_array_equal(other.tokens, b.tokens)


def test_compute_advantages_modes_reused_summaries():
  rewards = np.zeros((1, 2, 3, 2), np.float32)
  rewards[0, 0] = [[1, 0], [1, 1], [1, 1]]
  rewards[0, 1] = [[0, 0], [0, 1], [0, 1]]  # b_3 repeats the b_2 cut's two summaries
  canonical = np.array([[0, 1, 2], [0, 1, 1]])  # thinking 1 ended before b_3
  t, s, train = rl_lib.compute_advantages(rewards, RL, canonical, reused=True)
  # Decoupled: r - mean over the A summaries of the same cut, trained on distinct cuts only.
  np.testing.assert_allclose(s[0, 0], [0.5, -0.5])
  np.testing.assert_allclose(s[1, 1], [-0.5, 0.5])
  assert train[0].all() and train[1, :2].all() and not train[1, 2].any()
  # Thinking, uniform prior, brpo: R_1 of thinking 0 = (0.5 + 1 + 1) / 3.
  r0 = np.array([0.5 + 1 + 1, 1 + 1, 1]) / 3
  r1 = np.array([0 + 0.5 + 0.5, 0.5 + 0.5, 0.5]) / 3
  v2 = (r0 + r1) / 2
  assert t[0, 0] == pytest.approx(r0[0] - v2[0])
  # GRPO summary advantage: only the b_m summary, baseline over the G thinkings.
  grpo = C.RLConfig(**{**RL.__dict__, "summary_advantage": "grpo", "n_summaries": 1})
  _, s, train = rl_lib.compute_advantages(rewards[..., :1], grpo, canonical, reused=True)
  # Thinking 1 ended before b_3: its b_m summary is the one of its b_2 cut, trained there.
  np.testing.assert_allclose(s[:, :, 0], [[0, 0, 0.5], [0, -0.5, 0]])
  np.testing.assert_array_equal(train[:, :, 0], [[0, 0, 1], [0, 1, 0]])


def test_compute_advantages_modes_resampled_summaries():
  """The official layout: b_3 has its own two summaries at the cut it shares with b_2; the
  decoupled baseline pools the four; all summaries are trained; GRPO trains the b_m slot."""
  rewards = np.zeros((1, 2, 3, 2), np.float32)
  rewards[0, 0] = [[1, 0], [1, 1], [1, 1]]
  rewards[0, 1] = [[0, 0], [0, 1], [1, 1]]
  canonical = np.array([[0, 1, 2], [0, 1, 1]])
  t, s, train = rl_lib.compute_advantages(rewards, RL, canonical, reused=False)
  np.testing.assert_allclose(s[0, 0], [0.5, -0.5])
  np.testing.assert_allclose(s[1, 1], [-0.75, 0.25])  # pooled mean of (0, 1, 1, 1) = 0.75
  np.testing.assert_allclose(s[1, 2], [0.25, 0.25])
  assert train.all()
  r1 = np.array([0 + 0.5 + 1, 0.5 + 1, 1]) / 3  # each budget its own mean
  r0 = np.array([0.5 + 1 + 1, 1 + 1, 1]) / 3
  assert t[1, 0] == pytest.approx(r1[0] - (r0[0] + r1[0]) / 2)
  grpo = C.RLConfig(**{**RL.__dict__, "summary_advantage": "grpo", "n_summaries": 1})
  _, s, train = rl_lib.compute_advantages(rewards[..., :1], grpo, canonical, reused=False)
  np.testing.assert_allclose(s[:, :, 0], [[0, 0, 0], [0, 0, 0]])  # both right at b_3
  np.testing.assert_array_equal(train[:, :, 0], [[0, 0, 1], [0, 0, 1]])


def test_config_errors_name_the_flag():
  with pytest.raises(ValueError, match="--group_size=1 with --n_summaries=1: the decoupled"):
    C.RLConfig(group_size=1, n_summaries=1)
  with pytest.raises(ValueError, match="--mini_batch_prompts=3 must divide"):
    C.RLConfig(prompts_per_batch=16, mini_batch_prompts=3)
  with pytest.raises(ValueError, match="strictly increasing"):
    C.RLConfig(budgets=(8, 4))
  with pytest.raises(ValueError, match="sum"):
    C.RLConfig(prior_weights=(0.5, 0.6, 0.0, 0.0))
  with pytest.raises(ValueError, match="--thinking_baseline='nope'"):
    C.RLConfig(thinking_baseline="nope")


def test_compute_advantages_group_of_one():
  """G = 1 is accepted with every thinking baseline: V2 = 0 (the official rule), so brpo keeps
  its V1 share and v2only is the plain return. Hand-worked: uniform prior over (4, 8, 16),
  lambda = 0.5, cut rewards r = (1/2, 1, 1/2) (the mean of A = 2 summaries per cut).
    R = (2/3, 1/2, 1/6); V1 = (0, r_1 * 2/3, (r_1/4 + r_2/2)/(3/4) * 1/3) = (0, 1/3, 5/18)
    brpo V = (0, V1_2 / 3, 2 V1_3 / 3) = (0, 1/9, 5/27) -> A = (2/3, 7/18, -1/54)."""
  rewards = np.array([[[[1, 0], [1, 1], [0, 1]]]], np.float32)  # [N=1, G=1, m=3, A=2]
  canonical = np.array([[0, 1, 2]])
  want = {"brpo": [2 / 3, 7 / 18, -1 / 54], "v2only": [2 / 3, 1 / 2, 1 / 6]}
  for baseline, adv in want.items():
    rl = C.RLConfig(**{**RL.__dict__, "group_size": 1, "prior": "uniform",
                       "thinking_baseline": baseline})
    t, s, train = rl_lib.compute_advantages(rewards, rl, canonical, reused=False)
    np.testing.assert_allclose(t[0], adv, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s[0], [[0.5, -0.5], [0, 0], [-0.5, 0.5]])
    assert train.all()
