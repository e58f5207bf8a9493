"""Sampler and anytime decoding: cached branches equal from-scratch decoding of each cut context,
log-probs equal a full-forward recomputation, left padding and bucketing change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brpo.rollout import anytime as at
from brpo.rollout import sampling as smp
from models import config, decoder as dec, masks

# Fixed here (not the named "tiny", which may be retuned): expected tokens depend on it.
CFG = config.ModelConfig(vocab_size=64, d_model=192, n_layers=2, n_heads=6, n_kv_heads=2,
                         head_dim=32, mlp_dim=512, tie_embeddings=True, max_seq_len=2048)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21, 22]]
# Read off a free greedy run of the model below (checked in `greedy_rollout`): row 0 stops on
# </think> (41) after 6 tokens, row 2 on eos (63) after 3, rows 1 and 3 run to b_max.
TOKS = at.AnytimeTokens(eos_id=63, pad_id=0, think_end_ids=(41,),
                        insert_running=(60, 61, 41, 62, 59), insert_ended=(62, 59))


@pytest.fixture(scope="module")
def params():
  p = dec.init_params(CFG, jax.random.PRNGKey(0))
  # Larger weights than the init so that greedy decoding does not repeat one token forever.
  return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, p)


def full_forward_logprobs(params, context, new, temperature=1.0):
  """Log-probs of tokens `new` after `context` from one uncached forward pass."""
  seq = jnp.asarray([list(context) + list(new)])
  valid = jnp.ones(seq.shape, bool)
  logits = dec.forward(params, CFG, seq, masks.positions_from_valid(valid),
                       masks.causal_mask(valid))[0]
  pred = logits[len(context) - 1:len(context) + len(new) - 1]
  return np.asarray(smp.token_logprobs(pred, jnp.asarray(new), temperature))


def test_greedy_sample_equals_full_forward_greedy(params):
  out = smp.sample(params, CFG, PROMPTS, 10, smp.Greedy(), pad_id=0)
  # Uncached reference: one fixed-length forward per new token (right padding cannot change
  # the causal logits before it, and one length means one compilation).
  fwd = jax.jit(lambda p, t: dec.forward(p, CFG, t, masks.positions_from_valid(t >= 0),
                                         masks.causal_mask(t >= 0)))
  for b, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for _ in range(10):
      padded = jnp.asarray([seq + [0] * (32 - len(seq))])
      seq.append(int(jnp.argmax(fwd(params, padded)[0, len(seq) - 1])))
    assert np.asarray(out.tokens[b]).tolist() == seq[len(prompt):]


@pytest.mark.parametrize("strategy", [smp.Temperature(1.0), smp.Temperature(0.6),
                                      smp.TopP(0.9, 0.6), smp.TopK(5, 1.0)])
def test_sampled_logprobs_equal_full_forward(params, strategy):
  out = smp.sample(params, CFG, PROMPTS, 12, strategy, [[63]], jax.random.PRNGKey(7), pad_id=0)
  for b, prompt in enumerate(PROMPTS):
    n = int(out.lengths[b])
    new = np.asarray(out.tokens[b, :n])
    ref = full_forward_logprobs(params, prompt, new, strategy.temperature)
    np.testing.assert_allclose(out.logprobs[b, :n], ref, atol=1e-5)
    # Masked after the end.
    assert (np.asarray(out.tokens[b, n:]) == 0).all() and (np.asarray(out.logprobs[b, n:]) == 0).all()
    if int(out.stop_reason[b]) == 0:
      assert new[-1] == 63


def test_top_k_and_top_p_restrict_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.PRNGKey(0)
  assert set(np.asarray(smp.TopK(2)(keys, logits)).tolist()) == {0, 1}
  assert set(np.asarray(smp.TopP(0.7)(keys, logits)).tolist()) == {0, 1}
  assert set(np.asarray(smp.TopP(0.85)(keys, logits)).tolist()) == {0, 1, 2}
  assert set(np.asarray(smp.Greedy()(keys, logits)).tolist()) == {0}


def test_stop_sequences_of_several_tokens(params):
  free = smp.sample(params, CFG, PROMPTS[:1], 10, smp.Greedy(), pad_id=0)
  t = np.asarray(free.tokens[0]).tolist()
  stop = t[3:5]  # stop on the two tokens generated at steps 3 and 4
  out = smp.sample(params, CFG, PROMPTS[:1], 10, smp.Greedy(), [[63, 62], stop], pad_id=0)
  first = next(i for i in range(1, 10) if t[i - 1:i + 1] == stop)
  assert int(out.lengths[0]) == first + 1 and int(out.stop_reason[0]) == 1
  assert np.asarray(out.tokens[0, :first + 1]).tolist() == t[:first + 1]


def test_left_padding_and_bucket_invariance(params):
  strategy = smp.Temperature(1.0)
  key = jax.random.PRNGKey(3)
  a = smp.sample(params, CFG, PROMPTS, 8, strategy, [[63]], key, pad_id=0)
  b = smp.sample(params, CFG, PROMPTS, 8, strategy, [[63]], key, pad_id=0, prompt_length=40)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  # A row alone (no left padding) equals the same row in the padded batch, greedily.
  g = smp.sample(params, CFG, PROMPTS, 8, smp.Greedy(), pad_id=0)
  alone = smp.sample(params, CFG, [PROMPTS[1]], 8, smp.Greedy(), pad_id=0, prompt_length=2)
  np.testing.assert_array_equal(g.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(g.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_reproducible_from_seed(params):
  s = smp.Temperature(1.0)
  a = smp.sample(params, CFG, PROMPTS, 8, s, rng=jax.random.PRNGKey(1), pad_id=0)
  b = smp.sample(params, CFG, PROMPTS, 8, s, rng=jax.random.PRNGKey(1), pad_id=0)
  c = smp.sample(params, CFG, PROMPTS, 8, s, rng=jax.random.PRNGKey(2), pad_id=0)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_no_recompilation_within_a_bucket(params):
  s = smp.Temperature(1.0)
  smp.sample(params, CFG, [[1, 2, 3], [4, 5, 6, 7, 8]], 6, s, rng=jax.random.PRNGKey(0), pad_id=0)
  sizes = (smp.prefill_jit._cache_size(), smp.decode_jit._cache_size())
  # Other prompts whose lengths fall in the same bucket (8): same shapes, no new compilation.
  smp.sample(params, CFG, [[9, 9], [1, 2, 3, 4, 5, 6, 7]], 6, s, rng=jax.random.PRNGKey(1),
             pad_id=0)
  assert (smp.prefill_jit._cache_size(), smp.decode_jit._cache_size()) == sizes
  assert smp.bucket_length(5) == 8 and smp.bucket_length(65) == 128


def test_sample_errors(params):
  with pytest.raises(ValueError, match="empty prompt"):
    smp.sample(params, CFG, [[]], 4, pad_id=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    smp.sample(params, CFG, [[1]], CFG.max_seq_len, pad_id=0)
  with pytest.raises(ValueError, match="needs an rng key"):  # never a silent fixed key
    smp.sample(params, CFG, [[1]], 4, smp.Temperature(1.0), pad_id=0)
  with pytest.raises(ValueError, match="stop sequences must be non-empty"):
    smp.stop_array([[1], []])


# ---------------------------------------------------------------------------------------------
# Anytime decoding.


@pytest.fixture(scope="module")
def greedy_rollout(params):
  free = np.asarray(smp.sample(params, CFG, PROMPTS, 16, smp.Greedy(), pad_id=0).tokens)
  assert free[0, 5] == 41 and 41 not in free[0, :5] and 63 not in free[0, :6], free
  assert free[2, 2] == 63 and 41 not in free[2, :3], free
  assert not {41, 63} & set(free[1]) and not {41, 63} & set(free[3]), free
  spec = at.AnytimeConfig(budgets=(4, 8, 16), group_size=1, n_summaries=2, summary_len=6)
  return at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(0),
                            think_strategy=smp.Greedy(), summary_strategy=smp.Greedy())


def test_cut_kinds(greedy_rollout):
  ro = greedy_rollout
  # The cases the fixture was built to cover: ended by </think>, ran to b_max, ended by eos.
  assert np.asarray(ro.thinking_end).tolist() == [at.END_THINK, at.END_BUDGET, at.END_EOS,
                                                   at.END_BUDGET]
  assert np.asarray(ro.thinking_len).tolist() == [6, 16, 3, 16]
  np.testing.assert_array_equal(ro.cuts.length, [[4, 6, 6], [4, 8, 16], [3, 3, 3], [4, 8, 16]])
  np.testing.assert_array_equal(ro.cuts.ended, [[0, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(ro.cuts.canonical, [[0, 1, 1], [0, 1, 2], [0, 0, 0], [0, 1, 2]])
  # The eos-ended thinking gets the running insert, as in the official code; its cut scores 0.
  np.testing.assert_array_equal(ro.cuts.insert_len, [[5, 2, 2], [5, 5, 5], [5, 5, 5], [5, 5, 5]])
  np.testing.assert_array_equal(ro.cuts.eos, [[0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
  # A budget that shares a cut decodes its own summaries (resampled) from the same context:
  # greedy, they equal the first budget's.
  assert not ro.reused
  np.testing.assert_array_equal(ro.summary[0, 2], ro.summary[0, 1])


def test_every_branch_equals_from_scratch_greedy(params, greedy_rollout):
  ro = greedy_rollout
  for r, prompt in enumerate(PROMPTS):
    for j in range(3):
      cut = int(ro.cuts.length[r, j])
      ins = np.asarray(ro.cuts.insert[r, j, :int(ro.cuts.insert_len[r, j])]).tolist()
      context = prompt + np.asarray(ro.thinking[r, :cut]).tolist() + ins
      ref = smp.sample(params, CFG, [context], 6, smp.Greedy(), [[63]], pad_id=0)
      for a in range(2):
        n = int(ro.summary_len[r, j, a])
        assert n == int(ref.lengths[0]), (r, j, a)
        np.testing.assert_array_equal(ro.summary[r, j, a], ref.tokens[0])
        np.testing.assert_allclose(ro.summary_logp[r, j, a, :n], ref.logprobs[0, :n],
                                   atol=1e-5)


def test_sampled_anytime_logprobs_equal_full_forward(params):
  spec = at.AnytimeConfig(budgets=(3, 6, 9), group_size=2, n_summaries=2, summary_len=5)
  ro = at.anytime_rollout(params, CFG, PROMPTS[:2], spec, TOKS, jax.random.PRNGKey(5),
                          think_strategy=smp.Temperature(1.0),
                          summary_strategy=smp.Temperature(0.6))
  rows = [p for p in PROMPTS[:2] for _ in range(2)]
  for r, prompt in enumerate(rows):
    n = int(ro.thinking_len[r])
    think = np.asarray(ro.thinking[r, :n]).tolist()
    np.testing.assert_allclose(ro.thinking_logp[r, :n],
                               full_forward_logprobs(params, prompt, think), atol=1e-5)
    for j in range(3):
      if int(ro.cuts.canonical[r, j]) != j:
        continue
      cut = int(ro.cuts.length[r, j])
      ins = np.asarray(ro.cuts.insert[r, j, :int(ro.cuts.insert_len[r, j])]).tolist()
      for a in range(2):
        k = int(ro.summary_len[r, j, a])
        summ = np.asarray(ro.summary[r, j, a, :k]).tolist()
        ref = full_forward_logprobs(params, prompt + think[:cut] + ins, summ, 0.6)
        np.testing.assert_allclose(ro.summary_logp[r, j, a, :k], ref, atol=1e-5)


def test_anytime_config_errors():
  with pytest.raises(ValueError, match="strictly increasing"):
    at.AnytimeConfig(budgets=(4, 4, 8))
  with pytest.raises(ValueError, match="strictly increasing"):
    at.AnytimeConfig(budgets=(0, 4))


# ---------------------------------------------------------------------------------------------
# Issue #13: filled-only attention, top-p preselection, per-row keys, chunks and compaction.


def test_filled_attention_equals_dense(params):
  # block=8 < the 16 + 12 cache slots: several blocks, a dynamic trip count, left padding.
  for strategy, key in [(smp.Greedy(), None), (smp.Temperature(1.0), jax.random.PRNGKey(4))]:
    new = smp.sample(params, CFG, PROMPTS, 12, strategy, [[63]], key, pad_id=0, block=8,
                     prompt_length=16)
    old = smp.sample(params, CFG, PROMPTS, 12, strategy, [[63]], key, pad_id=0, dense=True,
                     prompt_length=16)
    np.testing.assert_array_equal(new.tokens, old.tokens)
    np.testing.assert_array_equal(new.lengths, old.lengths)
    np.testing.assert_allclose(new.logprobs, old.logprobs, atol=1e-5)


def test_filled_branches_equal_dense(params):
  spec = at.AnytimeConfig(budgets=(3, 6, 9), group_size=2, n_summaries=2, summary_len=5)
  kw = dict(think_strategy=smp.Temperature(1.0), summary_strategy=smp.Temperature(0.6))
  new = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(5), block=8, **kw)
  old = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(5), dense=True,
                           **kw)
  np.testing.assert_array_equal(new.thinking, old.thinking)
  np.testing.assert_array_equal(new.summary, old.summary)
  np.testing.assert_array_equal(new.summary_len, old.summary_len)
  np.testing.assert_allclose(new.summary_logp, old.summary_logp, atol=1e-5)
  np.testing.assert_allclose(new.thinking_logp, old.thinking_logp, atol=1e-5)


def test_decode_block_comes_from_the_model_config(params, monkeypatch):
  """--decode_block (ModelConfig.decode_block) is the key block of the thinking's and the
  branches' decode attention when no `block` is passed: same rollout as block=8 passed."""
  from models import attention as attn
  spec = at.AnytimeConfig(budgets=(3, 6, 9), group_size=2, n_summaries=2, summary_len=5)
  kw = dict(think_strategy=smp.Temperature(1.0), summary_strategy=smp.Temperature(0.6))
  seen = []
  real = attn.decode_attention

  def recording(*a, block, **k):
    seen.append(block)
    return real(*a, block=block, **k)

  monkeypatch.setattr(attn, "decode_attention", recording)
  cfg8 = CFG.replace(decode_block=8)
  got = at.anytime_rollout(params, cfg8, PROMPTS, spec, TOKS, jax.random.PRNGKey(5), **kw)
  assert seen and set(seen) == {8}, seen  # traced for this config: thinking and branches
  want = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, jax.random.PRNGKey(5), block=8,
                            **kw)
  for f in ("thinking", "thinking_logp", "summary", "summary_logp", "summary_len"):
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
  with pytest.raises(ValueError, match="decode_block=0: must be >= 1"):
    CFG.replace(decode_block=0)


def test_top_p_preselection_equals_sort():
  rng = np.random.default_rng(0)
  # Peaked rows (nucleus of a few tokens) and one flat row whose nucleus is not in the top 64.
  logits = rng.normal(size=(64, 1000)).astype(np.float32) * rng.uniform(0.5, 8, (64, 1))
  logits[-1] = rng.normal(size=1000) * 0.01
  logits = jnp.asarray(logits)
  for p, t in [(0.9, 0.6), (0.5, 1.0), (0.95, 1.0)]:
    fast, exact = smp.TopP(p, t, k=64), smp.TopP(p, t, k=0)
    np.testing.assert_array_equal(fast.threshold(logits[:-1] / t),
                                  exact.threshold(logits[:-1] / t))
    for seed in range(3):
      key = jax.random.PRNGKey(seed)
      np.testing.assert_array_equal(fast(key, logits[:-1]), exact(key, logits[:-1]))
      np.testing.assert_array_equal(fast(key, logits), exact(key, logits))  # fallback path
  # Log-probs: the fused form equals log_softmax.
  tok = jnp.argmax(logits, -1)
  ref = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7), tok[:, None], -1)[:, 0]
  np.testing.assert_allclose(smp.token_logprobs(logits, tok, 0.7), ref, atol=1e-6)


def test_chunks_and_compaction_do_not_change_rows(params):
  spec = at.AnytimeConfig(budgets=(4, 8, 12), group_size=2, n_summaries=2, summary_len=4)
  kw = dict(think_strategy=smp.Temperature(1.0), summary_strategy=smp.Temperature(1.0))
  key = jax.random.PRNGKey(9)
  whole = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, key, rollout_batch=8, **kw)
  parts = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, key, rollout_batch=3, **kw)
  packed = at.anytime_rollout(params, CFG, PROMPTS, spec, TOKS, key, compact_every=3, **kw)
  assert len(set(np.asarray(whole.thinking_len).tolist())) > 1  # rows stop at different steps
  for other in (parts, packed):
    for f in ("thinking", "thinking_len", "summary", "summary_len"):
      np.testing.assert_array_equal(getattr(other, f), getattr(whole, f), err_msg=f)
    np.testing.assert_allclose(other.thinking_logp, whole.thinking_logp, atol=1e-5)
    np.testing.assert_allclose(other.summary_logp, whole.summary_logp, atol=1e-5)
  with pytest.raises(ValueError, match="per-row keys"):
    smp.sample(params, CFG, PROMPTS, 4, smp.Temperature(1.0), rng=key, pad_id=0,
               compact_every=2)


def test_compaction_with_row_limits(params):
  # Per-row limits stand in for stop tokens; the cache of every row must come back complete.
  keys = smp.row_keys(jax.random.PRNGKey(2), np.arange(4))
  limit = np.array([2, 11, 5, 3])
  kw = dict(pad_id=0, limit=limit, write_last=True, return_state=True)
  one, s1 = smp.sample(params, CFG, PROMPTS, 11, smp.Temperature(1.0), rng=keys, **kw)
  comp, s2 = smp.sample(params, CFG, PROMPTS, 11, smp.Temperature(1.0), rng=keys,
                        compact_every=2, min_bucket=1, **kw)
  np.testing.assert_array_equal(one.lengths, limit)
  np.testing.assert_array_equal(comp.tokens, one.tokens)
  np.testing.assert_allclose(comp.logprobs, one.logprobs, atol=1e-5)
  p = s1.cache.length - 11
  for r, n in enumerate(limit):
    np.testing.assert_allclose(s2.cache.k[1][r, :, :p + n], s1.cache.k[1][r, :, :p + n], atol=1e-5)
  assert smp.bucket_rows(3, 64) == 8 and smp.bucket_rows(9, 64) == 16 and smp.bucket_rows(9, 12) == 12


def test_sharded_rollout_equals_single_device(params, monkeypatch):
  """On the (1, 4, 2) mesh of 8 devices (parameters fsdp x tensor, rows over fsdp): the KV cache
  is laid out explicitly (rows over fsdp, kv heads over tensor), and the sampler, the chunked and
  compacted rollout give the rows of one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from brpo import rows as rows_lib
  from models import sharding as shd

  mesh = shd.make_mesh((1, 4, 2))
  sp = shd.shard_tree(params, dec.param_axes(CFG), mesh)
  rows = [p for p in PROMPTS for _ in range(2)]
  tokens, valid = smp.pad_prompts(rows, 0)
  assert tokens.shape[1] == 16
  put = lambda x: jax.device_put(x, rows_lib.row_sharding(mesh, x.shape[0], x.ndim))
  keys = smp.row_keys(jax.random.PRNGKey(4), np.arange(len(rows)))
  # Row limits stand in for stops: 3 rows still run after 6 steps, so compaction (every 3 steps)
  # moves them into 4 rows, min_bucket=1 rounded up to one row per fsdp device.
  kw = dict(pad_id=0, write_last=True, return_state=True, limit=np.array([2, 10, 5, 3, 10, 4, 1, 7]))
  cache_layout = NamedSharding(mesh, P("fsdp", "tensor", None, None))
  one, s1 = smp.sample_padded(params, CFG, tokens, valid, 10, smp.Temperature(1.0), rng=keys,
                              **kw)
  gathered = []
  gather = smp._gather_rows
  monkeypatch.setattr(smp, "_gather_rows", lambda *a: gathered.append(gather(*a)) or gathered[-1])
  for compact in (0, 3):
    got, s2 = smp.sample_padded(sp, CFG, put(tokens), put(valid), 10, smp.Temperature(1.0),
                                rng=put(keys), compact_every=compact, min_bucket=1, **kw)
    assert s2.cache.k[0].sharding.is_equivalent_to(cache_layout, 4), compact
    np.testing.assert_array_equal(got.tokens, one.tokens)
    np.testing.assert_allclose(got.logprobs, one.logprobs, atol=1e-5)
    for r, n in enumerate(kw["limit"]):  # Slots past a row's end are never read.
      np.testing.assert_allclose(s2.cache.v[1][r, :, :16 + n], s1.cache.v[1][r, :, :16 + n], atol=1e-5)
  assert [g.lengths.shape[0] for g in gathered] == [4]
  assert gathered[0].cache.v[0].sharding.is_equivalent_to(cache_layout, 4)
  spec = at.AnytimeConfig(budgets=(4, 8, 12), group_size=2, n_summaries=2, summary_len=4)
  kw = dict(think_strategy=smp.Temperature(1.0), summary_strategy=smp.Temperature(1.0))
  key = jax.random.PRNGKey(9)
  ref = at.rollout_rows(params, CFG, tokens, valid, spec, TOKS, key, rollout_batch=8, **kw)
  for extra in (dict(rollout_batch=4), dict(rollout_batch=4, compact_every=3)):
    got = at.rollout_rows(sp, CFG, put(tokens), put(valid), spec, TOKS, key, **extra, **kw)
    assert got.thinking.sharding.spec[0] == "fsdp", extra  # the batch's layout comes back
    for f in ("thinking", "thinking_len", "summary", "summary_len"):
      np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f"{f} {extra}")
    np.testing.assert_allclose(got.summary_logp, ref.summary_logp, atol=1e-5)


def test_decoding_params_in_the_compute_dtype_change_nothing(params):
  """for_decoding casts the weight matrices of a bfloat16-compute, float32-parameter model to
  bfloat16 once (half the bytes each decode step reads): the same tokens and log-probs as the
  float32 parameters cast at every use, from a scanned model too."""
  from models import params as params_lib

  cfg = CFG.replace(dtype="bfloat16", scan_layers=True, remat="full")
  stacked = params_lib.stack_layers(params)
  dparams, dcfg = params_lib.for_decoding(stacked, cfg)
  assert dparams["layers"][0]["wq"].dtype == jnp.bfloat16 and dparams["embed"].dtype == jnp.bfloat16
  assert dparams["layers"][0]["attn_norm"].dtype == jnp.float32  # norms are used in float32
  assert not dcfg.scan_layers and dcfg.remat == "none"
  plain = cfg.replace(scan_layers=False, remat="none")
  key = jax.random.PRNGKey(3)
  want = smp.sample(params, plain, PROMPTS, 8, smp.Temperature(1.0), [[63]], key, pad_id=0)
  got = smp.sample(dparams, dcfg, PROMPTS, 8, smp.Temperature(1.0), [[63]], key, pad_id=0)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.logprobs, want.logprobs)
  abstract = params_lib.for_decoding(jax.eval_shape(lambda: stacked), cfg)[0]
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), dparams)


def _transposed_cache_blocks(hlo: str, shape) -> list[str]:
  """Instructions of a compiled HLO text that make a [B, K, bs, Dh] array (a block of cache
  slots as the attention's matmuls read it) in a transposing fusion or op."""
  dims = "f32[" + ",".join(map(str, shape)) + "]"
  return [line.strip()[:160] for line in hlo.splitlines()
          if "= " + dims in line and "transpose" in line.split("=", 1)[0]]


def test_decode_loop_reads_cache_blocks_without_transposes(params):
  """The KV cache is heads-major ([B, K, S, Dh]): a block of slots is read in the layout of the
  attention's (row, kv head)-batched matmuls, so the compiled decode loop copies no block
  through a transpose (the slots-major cache of before made two per layer and step)."""
  b, n_new = 4, 24
  tokens, valid = smp.pad_prompts(PROMPTS, 0)
  stops = smp.stop_array([[-2]])
  state = smp.prefill_jit(params, CFG, tokens, valid, stops, jax.random.PRNGKey(0), n_new=n_new,
                          strategy=smp.Greedy(), pad_id=0)
  assert state.cache.k[0].shape == (b, CFG.n_kv_heads, tokens.shape[1] + n_new, CFG.head_dim)
  hlo = smp.decode_jit.lower(params, CFG, state, stops, strategy=smp.Greedy(), pad_id=0,
                             write_last=False).compile().as_text()
  block = (b, CFG.n_kv_heads, state.cache.length, CFG.head_dim)  # one block: the whole cache
  assert f"f32[{b},{CFG.n_kv_heads},{block[2]},{CFG.head_dim}]" in hlo
  assert _transposed_cache_blocks(hlo, block) == []


def test_chunked_branch_sampling_equals_whole(params):
  """Issue #24: the branches' logits, draws and log-probs computed C / n at a time (`lax.map`;
  the paper shape's float32 logits are 0.6 GB per device) give the summaries of all C at once,
  on one device and with rows over fsdp: per-branch keys make each draw independent of its
  batch."""
  from brpo import rows as rows_lib
  from brpo.rollout import branches as br
  from models import sharding as shd

  rows, c, n_new, s_len = [p for p in PROMPTS for _ in range(2)], 4, 8, 5
  keys = smp.row_keys(jax.random.PRNGKey(3), np.arange(len(rows)))
  _, state = smp.sample(params, CFG, rows, n_new, smp.Temperature(1.0), rng=keys, pad_id=0,
                        write_last=True, return_state=True)
  rng = np.random.default_rng(0)
  r = len(rows)
  cut = jnp.asarray(rng.integers(0, n_new + 1, (r, c)), jnp.int32)
  insert = jnp.asarray(rng.integers(1, 63, (r, c, 2)), jnp.int32)
  insert_len = jnp.asarray(rng.integers(1, 3, (r, c)), jnp.int32)
  active = jnp.asarray(rng.random((r, c)) > 0.2)
  br_keys = jax.vmap(lambda k: smp.row_keys(k, np.arange(c)))(
      smp.row_keys(jax.random.PRNGKey(7), np.arange(r)))  # [R, C, 2]
  args = (CFG, state.cache, state.start, state.n_prompt, cut, insert, insert_len, active)

  def run(p, args, keys, strategy, n, mesh=None, rows_here=r):
    """decode_branches in n chunks: the float32 logits of C / n branches of the device's rows
    are the most `logits_bytes` allows."""
    limit = rows_here * (c // n) * CFG.vocab_size * 4
    assert br.logit_chunks(rows_here, c, CFG.vocab_size, limit) == n
    return br.decode_branches(p, *args, keys, prompt_len=state.cache.length - n_new,
                              summary_len=s_len, strategy=strategy, eos_id=63, pad_id=0,
                              mesh=mesh, logits_bytes=limit)

  for strategy in (smp.Temperature(0.7), smp.TopP(0.9, 1.0, k=8)):
    whole = run(params, args, br_keys, strategy, 1)
    assert int(whole[2].sum()) > r, "fixture: the branches should decode summaries"
    for n in (2, c):
      got = run(params, args, br_keys, strategy, n)
      np.testing.assert_array_equal(got[0], whole[0], err_msg=f"{strategy} chunks={n}")
      np.testing.assert_array_equal(got[2], whole[2])
      np.testing.assert_allclose(got[1], whole[1], atol=1e-5)
  assert br.logit_chunks(64, 16, 151936) == 2  # v4-8 at 256 rows: 64 rows per device
  assert br.logit_chunks(32, 16, 151936) == 1 and br.logit_chunks(1, 3, 10, 1) == 3
  # Rows over fsdp (2 per device of the (1, 4, 2) mesh), 2 chunks of 2 branches.
  mesh = shd.make_mesh((1, 4, 2))
  put = lambda x: jax.device_put(x, rows_lib.row_sharding(mesh, x.shape[0], x.ndim))
  sp = shd.shard_tree(params, dec.param_axes(CFG), mesh)
  sargs = (CFG, jax.tree.map(put, state.cache), *map(put, args[2:]))
  whole = run(params, args, br_keys, smp.Temperature(0.7), 1)
  got = run(sp, sargs, put(br_keys), smp.Temperature(0.7), 2, mesh=mesh, rows_here=r // 4)
  np.testing.assert_array_equal(got[0], whole[0])
  np.testing.assert_allclose(got[1], whole[1], atol=1e-5)
  with pytest.raises(ValueError, match="per-branch keys"):
    br.sample_branches(params, CFG, jnp.zeros((2, 4, CFG.d_model)), jax.random.PRNGKey(0),
                       smp.Temperature(1.0), chunks=2)
